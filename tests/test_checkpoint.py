"""Tests for nanochat_jax/checkpoint.py: bit-exact round trips of a tiny GPT's params (bf16 embeddings), its
optax state and nested JSON meta; resharding on restore over 8 simulated devices; pruning, latest-step logic,
async saves, uncommitted (tmp) saves being ignored; clear errors; and load_model picking the largest d<N> tag
and giving a model whose forward pass matches the original."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax import checkpoint as ck
from nanochat_jax import gpt, optim
from nanochat_jax.common import get_base_dir

TINY = dict(sequence_len=32, vocab_size=300, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, head_dim=16)


def tiny_cfg(**kw) -> gpt.GPTConfig:
    return gpt.GPTConfig(**{**TINY, **kw})


def random_grads(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


@pytest.fixture(scope="module")
def trained():
    """Tiny GPT params + optimizer state after one update with random gradients (non-zero moments everywhere)."""
    cfg = tiny_cfg()
    params = gpt.init_params(cfg, jax.random.key(int(np.random.default_rng().integers(1 << 30))))
    tx = optim.build_optimizer(params, optim.OptimConfig(num_iterations=10, model_dim=cfg.n_embd))
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    updates, opt_state = update(random_grads(params, 1), opt_state, params)
    params = optax.apply_updates(params, updates)
    return cfg, params, update, opt_state


def abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def assert_bit_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def small_tree(value: float):
    return {"w": jnp.full((4, 3), value, jnp.float32), "e": {"b": jnp.full((5,), value, jnp.bfloat16)}}


# ----------------------------------------------------------------------------------------------

def test_checkpoint_dir():
    base = get_base_dir()
    assert ck.checkpoint_dir("base", "d12") == base / "base_checkpoints" / "d12"
    assert ck.checkpoint_dir("mid", "d4") == base / "mid_checkpoints" / "d4"
    assert ck.checkpoint_dir("sft", "d20") == base / "chatsft_checkpoints" / "d20"
    assert ck.checkpoint_dir("rl", "x") == base / "chatrl_checkpoints" / "x"
    with pytest.raises(ValueError, match="unknown checkpoint phase 'pretrain'"):
        ck.checkpoint_dir("pretrain", "d12")


def test_round_trip_params_opt_state_meta(tmp_path, trained):
    cfg, params, update, opt_state = trained
    assert params["wte"].dtype == jnp.bfloat16  # the embedding really is bf16, so dtype preservation is tested
    meta = {"model_config": cfg.to_dict(), "user_config": {"depth": 2, "tags": ["a", "b"]},
            "loader": {"pq_idx": 3, "rg_idx": 7, "epoch": 1},
            "loop_state": {"min_val_bpb": float("inf"), "smooth_train_loss": np.float32(2.5),
                           "total_training_time": 12.25}, "val_bpb": 1.125}
    with ck.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(7, params=params, opt_state=opt_state, meta=meta)
        p2, s2, meta2 = ckpt.restore(abstract_params=abstract(params), abstract_opt_state=abstract(opt_state))
    assert_bit_identical(params, p2)
    assert_bit_identical(opt_state, s2)
    assert type(s2).__name__ == "PartitionState"
    assert meta2 == {**meta, "loop_state": {**meta["loop_state"], "smooth_train_loss": 2.5}, "step": 7}
    assert meta2["loop_state"]["min_val_bpb"] == float("inf")
    # The restored optimizer state continues training exactly like the original.
    g = random_grads(params, 2)
    u1, _ = update(g, opt_state, params)
    u2, _ = update(g, s2, p2)
    assert_bit_identical(u1, u2)


def test_restore_into_a_different_sharding(tmp_path, trained):
    _, params, _, _ = trained
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def spec(path, x):  # shard the first axis divisible by 8, like FSDP would
        name = jax.tree_util.keystr(path)
        for axis, n in enumerate(x.shape):
            if n % 8 == 0 and "lambda" not in name:
                return P(*([None] * axis + ["data"] + [None] * (x.ndim - axis - 1)))
        return P()

    specs = jax.tree_util.tree_map_with_path(spec, params)
    sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    assert sharded["wte"].sharding.spec == P("data", None)
    assert sharded["blocks"]["attn"]["wq"].sharding.spec == P(None, "data", None)
    replicated = NamedSharding(mesh, P())
    with ck.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, params=sharded, meta={})
        restored, opt, _ = ckpt.restore(abstract_params=ck.with_sharding(abstract(params), replicated))
        assert opt is None
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
            assert y.sharding == replicated and y.dtype == x.dtype
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
        # ...and the other way round: saved replicated, restored sharded.
        ckpt.save(2, params=restored, meta={})
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                              params, specs)
        back, _, _ = ckpt.restore(2, abstract_params=target)
    for x, y, t in zip(jax.tree.leaves(params), jax.tree.leaves(back), jax.tree.leaves(target)):
        assert y.sharding == t.sharding
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_restore_casts_to_target_dtype(tmp_path):
    host = np.random.default_rng().standard_normal((6, 8)).astype(np.float32)
    saved = {"e": jnp.asarray(host, jnp.bfloat16)}
    with ck.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, params=saved, meta={})
        target = {"e": jax.ShapeDtypeStruct(host.shape, jnp.float32, sharding=ck._as_sharding(None))}
        out, _, _ = ckpt.restore(abstract_params=target)
    assert out["e"].dtype == jnp.float32
    assert np.array_equal(np.asarray(out["e"]), np.asarray(saved["e"]).astype(np.float32))  # exact upcast


def test_keep_prunes_and_latest_step(tmp_path):
    directory = tmp_path / "ckpt"
    with ck.Checkpointer(directory, keep=2) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        for step in (10, 20, 30, 40):
            ckpt.save(step, params=small_tree(step / 10), meta={"v": step})
        ckpt.wait()
        assert ckpt.all_steps() == [30, 40] and ckpt.latest_step() == 40
    assert sorted(p.name for p in directory.iterdir()) == ["30", "40"]
    with ck.Checkpointer(directory) as ckpt:  # a fresh manager sees the same steps; step=None means latest
        params, _, meta = ckpt.restore(abstract_params=abstract(small_tree(0.0)))
        assert meta == {"v": 40, "step": 40} and float(params["w"][0, 0]) == 4.0
        params, _, meta = ckpt.restore(30, abstract_params=abstract(small_tree(0.0)))
        assert meta["v"] == 30 and float(params["e"]["b"][0]) == 3.0
        assert ckpt.read_meta() == {"v": 40, "step": 40} and ckpt.read_meta(30)["v"] == 30


def test_async_save_then_wait_and_donation_safe(tmp_path):
    rng = np.random.default_rng()
    host = rng.standard_normal((512, 256)).astype(np.float32)
    tree = {"x": jnp.asarray(host)}
    with ck.Checkpointer(tmp_path / "ckpt") as ckpt:
        t0 = time.perf_counter()
        ckpt.save(3, params=tree, meta={"k": 1})
        tree["x"].delete()  # like a donated buffer: save has already copied it to host
        ckpt.wait()
        assert time.perf_counter() - t0 < 30
        assert ckpt.latest_step() == 3
        out, _, _ = ckpt.restore(abstract_params={"x": jax.ShapeDtypeStruct(host.shape, host.dtype,
                                                                             sharding=ck._as_sharding(None))})
    assert np.array_equal(np.asarray(out["x"]), host)


def test_uncommitted_save_is_ignored(tmp_path):
    directory = tmp_path / "ckpt"
    with ck.Checkpointer(directory) as ckpt:
        ckpt.save(5, params=small_tree(5.0), meta={})
    # What an interrupted save leaves behind: orbax 0.12.8 writes to "<step>.orbax-checkpoint-tmp" (older
    # versions add "-<timestamp>") and renames it to "<step>" on commit.
    for name in ("9.orbax-checkpoint-tmp", "11.orbax-checkpoint-tmp-1700000000000"):
        (directory / name / "params").mkdir(parents=True)
        (directory / name / "params" / "junk").write_bytes(b"half written")
        (directory / name / "_CHECKPOINT_METADATA").write_text("{}")
    with ck.Checkpointer(directory) as ckpt:
        assert ckpt.all_steps() == [5] and ckpt.latest_step() == 5
        _, _, meta = ckpt.restore(abstract_params=abstract(small_tree(0.0)))
        assert meta["step"] == 5
        # A later real save of the same step replaces the debris.
        ckpt.save(9, params=small_tree(9.0), meta={})
        params, _, meta = ckpt.restore(abstract_params=abstract(small_tree(0.0)))
        assert meta["step"] == 9 and float(params["w"][0, 0]) == 9.0


def test_save_older_step_needs_overwrite(tmp_path):
    with ck.Checkpointer(tmp_path / "ckpt") as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, params=small_tree(step), meta={})
        with pytest.raises(FileExistsError, match=r"steps \[2, 3\]"):
            ckpt.save(2, params=small_tree(9.0), meta={})
        ckpt.save(2, params=small_tree(9.0), meta={}, overwrite=True)
        assert ckpt.all_steps() == [1, 2]
        params, _, _ = ckpt.restore(abstract_params=abstract(small_tree(0.0)))
        assert float(params["w"][1, 1]) == 9.0
        with pytest.raises(ValueError, match="meta\\['step'\\]=4"):
            ckpt.save(5, params=small_tree(1.0), meta={"step": 4})
        with pytest.raises(TypeError, match="not JSON-serialisable"):
            ckpt.save(6, params=small_tree(1.0), meta={"bad": object()})


def test_restore_errors(tmp_path):
    target = abstract(small_tree(0.0))
    empty = tmp_path / "nothing_here"
    with ck.Checkpointer(empty) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoints in .*nothing_here.*pretrain.py"):
            ckpt.restore(abstract_params=target)
        with pytest.raises(FileNotFoundError):
            ckpt.read_meta()
    with ck.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(4, params=small_tree(1.0), meta={})
        with pytest.raises(FileNotFoundError, match=r"step 3 .*available steps: \[4\]"):
            ckpt.restore(3, abstract_params=target)
        with pytest.raises(ValueError, match="no optimizer state"):
            ckpt.restore(abstract_params=target, abstract_opt_state=target)
        bad = {"w": jax.ShapeDtypeStruct((4, 5), jnp.float32, sharding=ck._as_sharding(None)),
               "e": {"b": target["e"]["b"]}, "extra": target["w"]}
        with pytest.raises(ValueError, match=r"(?s)w: checkpoint \(4, 3\), target \(4, 5\).*extra: in the target"):
            ckpt.restore(abstract_params=bad)
        no_sharding = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), target)
        with pytest.raises(ValueError, match="has no sharding"):
            ckpt.restore(abstract_params=no_sharding)


# ----------------------------------------------------------------------------------------------
# load_model

def save_model(tag: str, step: int, cfg, params, phase: str = "base", **meta):
    with ck.Checkpointer(ck.checkpoint_dir(phase, tag)) as ckpt:
        ckpt.save(step, params=params, meta={"model_config": cfg.to_dict(), **meta})


def test_find_largest_model(tmp_path):
    for tag in ("d2", "d10", "d9", "other"):
        (tmp_path / tag).mkdir()
    assert ck.find_largest_model(tmp_path) == "d10"  # numeric, not lexicographic
    other = tmp_path / "other_phase"
    for i, tag in enumerate(("run_b", "run_a", "run_c")):
        (other / tag).mkdir(parents=True)
        os.utime(other / tag, (1_000_000 + 100 * i, 1_000_000 + 100 * i))
    assert ck.find_largest_model(other) == "run_c"
    os.utime(other / "run_a", (2_000_000, 2_000_000))
    assert ck.find_largest_model(other) == "run_a"


def test_load_model_largest_tag_and_latest_step(trained):
    cfg, params, _, opt_state = trained
    other_cfg = tiny_cfg(n_layer=3)
    save_model("d2", 50, other_cfg, gpt.init_params(other_cfg, jax.random.key(1)))
    old = jax.tree.map(lambda x: x * 0.5, params)
    with ck.Checkpointer(ck.checkpoint_dir("base", "d10")) as ckpt:
        ckpt.save(10, params=old, opt_state=opt_state, meta={"model_config": cfg.to_dict()})
        ckpt.save(20, params=params, opt_state=opt_state, meta={"model_config": cfg.to_dict(), "val_bpb": 0.9})
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    loaded, cfg2, meta = ck.load_model(mesh_or_sharding=mesh)
    assert cfg2 == cfg and meta["step"] == 20 and meta["val_bpb"] == 0.9
    assert_bit_identical(params, loaded)
    assert all(x.sharding == NamedSharding(mesh, P()) for x in jax.tree.leaves(loaded))
    idx = jnp.asarray(np.random.default_rng().integers(0, cfg.vocab_size, (2, cfg.sequence_len)), jnp.int32)
    single = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), loaded)
    assert np.array_equal(np.asarray(gpt.forward(params, idx, cfg)), np.asarray(gpt.forward(single, idx, cfg2)))
    # Explicit tag and step; the default placement is one local device.
    loaded, cfg3, meta = ck.load_model("base", "d10", step=10)
    assert meta["step"] == 10 and cfg3 == cfg
    assert_bit_identical(old, loaded)
    loaded, cfg4, _ = ck.load_model("base", "d2")
    assert cfg4.n_layer == 3 and loaded["blocks"]["attn"]["wq"].shape[0] == 3
    loaded, cfg5, _ = ck.load_model("base", "d10", config_overrides={"remat": True})
    assert cfg5.remat and not cfg.remat


def test_load_model_errors(trained):
    cfg, params, _, _ = trained
    with pytest.raises(FileNotFoundError, match="no sft checkpoints.*chatsft_checkpoints.*sft.py"):
        ck.load_model("sft")
    save_model("d2", 1, cfg, params)
    with pytest.raises(FileNotFoundError, match=r"d7 \(model tags there: \['d2'\]\)"):
        ck.load_model("base", "d7")
    ck.checkpoint_dir("base", "d3").mkdir()
    with pytest.raises(FileNotFoundError, match="no finished checkpoints"):
        ck.load_model("base", "d3")
    # meta whose config does not describe the saved arrays
    save_model("d4", 1, tiny_cfg(n_layer=3), params)
    expected = r"(?s)does not describe its arrays.*blocks/attn/wq: checkpoint \(2, 64, 64\), target \(3, 64, 64\)"
    with pytest.raises(ValueError, match=expected):
        ck.load_model("base", "d4")
    with ck.Checkpointer(ck.checkpoint_dir("base", "d5")) as ckpt:
        ckpt.save(1, params=params, meta={})
    with pytest.raises(ValueError, match="no 'model_config'"):
        ck.load_model("base", "d5")
