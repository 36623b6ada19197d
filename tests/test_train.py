"""The train step: sharded equals single-device, gradient accumulation, learning; bpb; flag validation."""

import collections
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax import gpt, optim, pretrain, sharding, train
from nanochat_jax.loss_eval import make_bpb_fn, numpy_bpb

CFG = gpt.GPTConfig.from_depth(2, aspect_ratio=64, head_dim=32, max_seq_len=32, vocab_size=300, short_window=16,
                               embed_dtype="float32", compute_dtype="float32")  # bf16 rounding would dominate


@functools.cache
def _compiled(n_devices, cfg, A, B, fsdp):
    """The compiled step and state initialiser of one setup, compiled once per test process (compiling is most of
    these tests' time; the 8-device step serves two of them)."""
    shapes = gpt.param_shapes(cfg)
    tx = optim.build_optimizer(shapes, optim.OptimConfig(num_iterations=10, model_dim=cfg.n_embd, warmup_steps=0,
                                                            muon_ortho_dtype="float32"))
    st_shapes = jax.eval_shape(lambda k: train.init_state(cfg, tx, k), jax.random.key(0))
    mesh = sharding.make_mesh(n_devices)
    fn, sh, _ = train.compile_train_step(cfg, tx, mesh, st_shapes, (A, B, cfg.sequence_len), shard_params=fsdp)
    return mesh, fn, jax.jit(lambda k: _perturbed_state(cfg, tx, k), out_shardings=sh)


def _setup(n_devices, cfg=CFG, A=2, B=16, fsdp=True):
    """(mesh, compiled step, a fresh perturbed state): every call starts from the same state."""
    mesh, fn, init = _compiled(n_devices, cfg, A, B, fsdp)
    return mesh, fn, init(jax.random.key(1))


def _perturbed_state(cfg, tx, key):
    """The reference init zeroes the output projections, which makes some gradients exactly degenerate at step 0;
    perturb every parameter so each one gets a well-defined gradient."""
    params = gpt.init_params(cfg, key)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    params = jax.tree.unflatten(treedef, [p + (0.02 * jax.random.normal(k, p.shape)).astype(p.dtype)
                                          for p, k in zip(leaves, keys)])
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def _batches(n, A=2, B=16, T=32, V=300, seed=0):
    rng = np.random.default_rng(seed)
    # a learnable stream: each target is a fixed function of the input token
    out = []
    for _ in range(n):
        x = rng.integers(0, V, (A, B, T)).astype(np.int32)
        out.append({"inputs": x, "targets": ((x * 7 + 3) % V).astype(np.int32)})
    return out


def _run(mesh, fn, state, batches):
    losses = []
    for b in batches:
        state, m = fn(state, {k: sharding.global_batch(v, mesh, batch_axis=1) for k, v in b.items()})
        losses.append(float(m["loss"]))
    return state, losses


def test_sharded_step_matches_single_device():
    assert jax.device_count() == 8
    batches = _batches(3)
    mesh1, fn1, s1 = _setup(1)
    mesh8, fn8, s8 = _setup(8)
    # some parameters really are sharded over the 8 devices
    specs = {sharding.path_str(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(s8["params"])}
    assert specs["wte"] == jax.P("data", None) and specs["value_embeds"] == jax.P(None, "data", None)
    assert any("data" in str(x.sharding.spec) for x in jax.tree.leaves(s8["opt_state"]))
    s1, l1 = _run(mesh1, fn1, s1, batches)
    s8, l8 = _run(mesh8, fn8, s8, batches)
    # Same math in fp32 (compute, tables and the Muon orthogonaliser), different reduction order over 8 devices:
    # agreement to fp32 rounding, amplified a little by three optimizer steps.
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    p1, p8 = jax.device_get(s1["params"]), jax.device_get(s8["params"])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p8)):
        if sharding.path_str(path) == "backout_lambda":
            continue  # its gradient is ~1e-9 here (exactly 0 with the reference init): AdamW's step sign is noise
        # Typical elements agree to ~1e-6; the orthogonaliser's 5 polynomial steps can amplify a reduction-order
        # difference in a rare element to ~5e-4, still well under one step's update (~8e-3 here).
        np.testing.assert_allclose(a, b, atol=2e-3, err_msg=sharding.path_str(path))
        assert np.abs(np.asarray(a) - np.asarray(b)).mean() < 2e-5, sharding.path_str(path)


def test_gradients_sharded_match_single_device():
    mesh8 = sharding.make_mesh(8)
    params = gpt.init_params(CFG, jax.random.key(3))
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(4), p.shape, p.dtype), params)
    b = _batches(1, A=1)[0]
    loss = lambda p, x, y: gpt.forward(p, x, CFG, targets_BT=y)  # noqa: E731
    g1 = jax.jit(jax.grad(loss))(params, b["inputs"][0], b["targets"][0])
    sh = sharding.tree_shardings(params, mesh8, gpt.param_sharding_axes(CFG))
    g8 = jax.jit(jax.grad(loss), in_shardings=(sh, sharding.batch_sharding(mesh8), sharding.batch_sharding(mesh8)))(
        jax.device_put(params, sh), b["inputs"][0], b["targets"][0])
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        a, c = np.asarray(a, np.float32), np.asarray(c, np.float32)
        np.testing.assert_allclose(a, c, atol=1e-6 + 2e-2 * np.abs(a).max())


def test_grad_accumulation_equals_one_big_batch():
    # 2 micro-batches of 8 rows == 1 micro-batch of 16 rows (every target valid, so mean of means == mean)
    b = _batches(1, A=2, B=8)[0]
    big = {k: v.reshape(1, 16, 32) for k, v in b.items()}
    m1, fn_a, s_a = _setup(1, A=2, B=8)
    _, fn_b, s_b = _setup(1, A=1, B=16)
    s_a, la = _run(m1, fn_a, s_a, [b])
    s_b, lb = _run(m1, fn_b, s_b, [big])
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    np.testing.assert_allclose(s_a["params"]["blocks"]["mlp"]["w_fc"], s_b["params"]["blocks"]["mlp"]["w_fc"],
                               atol=1e-4)


def test_training_reduces_the_loss():
    mesh, fn, state = _setup(8)
    _, losses = _run(mesh, fn, state, _batches(12, seed=5))
    assert losses[-1] < losses[0] - 0.5, losses


def test_bpb_matches_numpy():
    params = gpt.init_params(CFG, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 300, (4, 32)).astype(np.int32)
    y = rng.integers(0, 300, (4, 32)).astype(np.int32)
    y[0, :5] = -1  # ignored targets
    token_bytes = rng.integers(1, 6, 300).astype(np.int32)
    token_bytes[-9:] = 0  # specials count for nothing
    y[1, :3] = 295
    nats, nbytes = jax.jit(make_bpb_fn(CFG))(params, x, y, jnp.asarray(token_bytes))
    per_token = np.asarray(gpt.forward(params, x, CFG, targets_BT=y, loss_reduction="none"))
    want = numpy_bpb(per_token, y, token_bytes)
    assert abs(float(nats) / (np.log(2) * float(nbytes)) - want) < 1e-5 * want
    counted = (y >= 0) & (token_bytes[np.maximum(y, 0)] > 0)
    assert float(nbytes) == token_bytes[y[counted]].sum()


def test_plan_horizon_and_validation():
    cfg = pretrain.PretrainConfig(depth=2, max_seq_len=32, device_batch_size=4, total_batch_size=4 * 32 * 8 * 3,
                               num_iterations=7)
    plan = pretrain.plan_horizon(cfg, pretrain.build_model_config(cfg, 300, on_gpu=False), n_devices=8)
    assert plan["grad_accum"] == 3 and plan["num_iterations"] == 7
    bad = dataclasses.replace(cfg, total_batch_size=1000)
    with pytest.raises(ValueError, match="not a multiple"):
        pretrain.plan_horizon(bad, pretrain.build_model_config(bad, 300, on_gpu=False), n_devices=8)
    # reference speedrun d24: ratio 8 → 5,568 steps at B = 2^20 on 8 devices × 16 rows × 2048
    ref = pretrain.PretrainConfig(depth=24, target_param_data_ratio=8, device_batch_size=16)
    plan = pretrain.plan_horizon(ref, pretrain.build_model_config(ref, 32768, on_gpu=True), n_devices=8)
    assert plan["total_batch_size"] == 2**20 and plan["num_iterations"] == 5568 and plan["grad_accum"] == 4
    for kwargs, msg in [({"depth": 0}, "--depth"), ({"attention": "flash"}, "--attention"),
                        ({"profile_steps": "5"}, "START:STOP"), ({"device_batch_size": 0}, "device-batch-size"),
                        ({"lr_schedule": "cosine"}, "--lr-schedule must be one of reference|constant"),
                        ({"adamw_style": "torch"}, "--adamw-style")]:
        with pytest.raises(ValueError, match=msg):
            pretrain.PretrainConfig(**kwargs)
    with pytest.raises(ValueError, match="--mesh=16"):
        sharding.make_mesh(16)


@pytest.mark.slow  # a subprocess end to end: ~30-50 s on a shared 2-core box
def test_bench_train_script_runs(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO_ROOT

    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench_train.py"), "--depth=1", "--head-dim=32",
                          "--aspect-ratio=64", "--max-seq-len=64", "--device-batch-size=2", "--vocab-size=512",
                          "--steps=3", "--warmup-steps=1", "--mesh=2", f"--profile-dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2 and result["tokens_per_step"] == 2 * 2 * 64 and result["tokens_per_s"] > 0
    assert result["step_seconds_min"] <= result["step_seconds_median"] <= 3 * result["step_seconds"]
    top = out.stdout.split("top ops (ms/step")[1].splitlines()[1:4]  # the profiled steps' busiest ops, named
    assert len(top) == 3 and all(float(line.split()[0]) >= 0 for line in top), out.stdout[-2000:]


def hlo_ops(compiled) -> collections.Counter:
    """How often each HLO instruction occurs in a compiled program ("%name = type opcode(operands)" lines)."""
    return collections.Counter(re.findall(r"^\s*(?:ROOT )?%[\w.-]+ = .*? ([a-z][\w-]*)\(", compiled.as_text(), re.M))


@pytest.mark.parametrize("depth", [4, pytest.param(20, marks=pytest.mark.slow)])
def test_compiled_train_step_has_no_conditionals(depth):
    """Every layer's window is static ("SSSL": the scan steps over groups of 4 layers), so the compiled step holds
    no XLA conditional (on a GPU each one waits for its branch index on the host)."""
    cfg = gpt.GPTConfig.from_depth(depth, max_seq_len=256, vocab_size=32768, compute_dtype="float32")
    assert cfg.window_pattern == "SSSL" and len(set(gpt.layer_windows(cfg))) == 2
    shapes = gpt.param_shapes(cfg)
    tx = optim.build_optimizer(shapes, optim.OptimConfig(num_iterations=10, model_dim=cfg.n_embd))
    st_shapes = jax.eval_shape(lambda k: train.init_state(cfg, tx, k), jax.random.key(0))
    compiled, _, _ = train.compile_train_step(cfg, tx, sharding.make_mesh(1), st_shapes, (1, 1, cfg.sequence_len))
    ops = hlo_ops(compiled)
    assert ops["conditional"] == 0
    assert ops["while"] >= (1 if depth == 20 else 0)  # d20's layer scan (5 groups) stays a loop; d4's 1 is inlined
