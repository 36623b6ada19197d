"""nanochat <-> nanochat-jax checkpoint conversion (NumPy only, no torch).

The reference is a float64 NumPy forward written from nanochat/gpt.py (`GPT.forward`) that reads a nanochat
state dict in torch layout (Linear y = x @ W.T) directly; converted params run through gpt.forward must agree.
Key names are spelled out by hand from nanochat's gpt.py (current, 92d63d4, and the October 2025 commit 3a5e0bc).
"""

import math
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from nanochat_jax import convert, gpt
from nanochat_jax.common import UserError
from nanochat_jax.gpt import GPTConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
F32 = dict(compute_dtype="float32", embed_dtype="float32")


# ----------------------------------------------------------------------------------------------
# Fixtures: nanochat-style state dicts and metas built by hand

def head_meta(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, vocab_size=100, sequence_len=1024, window_pattern="SL"):
    return {"step": 7, "val_bpb": 1.23, "model_config": dict(
        sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
        n_embd=n_embd, window_pattern=window_pattern)}


def classic_meta(n_layer=2, n_head=2, n_kv_head=1, n_embd=64, vocab_size=100, sequence_len=256):
    return {"step": 5, "model_config": dict(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer,
                                            n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)}


def make_state_dict(mc, head: bool, rng, embed_dtype=np.float32):
    """Random weights in nanochat's torch layout (out, in), with nonzero projections so every path matters."""
    L, H, K, D, V = mc["n_layer"], mc["n_head"], mc["n_kv_head"], mc["n_embd"], mc["vocab_size"]
    hd = D // H
    rows = -(-V // 64) * 64 if head else V
    r = lambda *shape, s=1.0: (s * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    sd = {"transformer.wte.weight": r(rows, D).astype(embed_dtype), "lm_head.weight": r(rows, D, s=0.3)}
    for i in range(L):
        p = f"transformer.h.{i}."
        sd[p + "attn.c_q.weight"] = r(H * hd, D, s=D ** -0.5)
        sd[p + "attn.c_k.weight"] = r(K * hd, D, s=D ** -0.5)
        sd[p + "attn.c_v.weight"] = r(K * hd, D, s=D ** -0.5)
        sd[p + "attn.c_proj.weight"] = r(D, H * hd, s=0.5 * D ** -0.5)
        sd[p + "mlp.c_fc.weight"] = r(4 * D, D, s=D ** -0.5)
        sd[p + "mlp.c_proj.weight"] = r(D, 4 * D, s=0.5 * (4 * D) ** -0.5)
        if head and i % 2 == (L - 1) % 2:
            sd[p + "attn.ve_gate.weight"] = r(K, 12)
            sd[f"value_embeds.{i}.weight"] = r(rows, K * hd).astype(embed_dtype)
    if head:
        sd["resid_lambdas"] = (1.0 + r(L, s=0.1))
        sd["x0_lambdas"] = r(L, s=0.2)
        sd["smear_gate.weight"] = r(1, 24)
        sd["smear_lambda"] = r(1, s=0.5)
        sd["backout_lambda"] = r(1, s=0.3)
    return sd


# ----------------------------------------------------------------------------------------------
# Independent float64 reference forward (reads the torch-layout state dict)

EPS = 2.0 ** -23  # torch rms_norm eps for fp32 inputs


def ref_forward(sd, mc, head: bool, idx):
    sd = {k.removeprefix("_orig_mod."): np.asarray(v, np.float64) for k, v in sd.items()}
    L, H, K, D, V, T = mc["n_layer"], mc["n_head"], mc["n_kv_head"], mc["n_embd"], mc["vocab_size"], idx.shape[1]
    hd = D // H
    lin = lambda x, k: x @ sd[k].T  # noqa: E731  (torch Linear)
    norm = lambda x: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)  # noqa: E731

    base = 100_000.0 if head else 10_000.0
    inv = 1.0 / base ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    if not head:  # the classic model's RoPE tables are bf16 (its forward asserts it), whatever the compute dtype
        cos, sin = (t.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64) for t in (cos, sin))

    def rope(x):
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)

    seq = mc["sequence_len"]
    pattern = mc.get("window_pattern", "L")
    short = -(-seq // 4 // 128) * 128
    windows = [short if pattern[i % len(pattern)] == "S" else seq for i in range(L)]
    windows[-1] = seq

    x = norm(sd["transformer.wte.weight"][idx])
    if head:
        gate = sd["smear_lambda"][0] * (1 / (1 + np.exp(-lin(x[:, 1:, :24], "smear_gate.weight"))))
        x = np.concatenate([x[:, :1], x[:, 1:] + gate * x[:, :-1]], 1)
    x0, x_back = x, None
    B = idx.shape[0]
    row, col = np.arange(T)[:, None], np.arange(T)[None, :]
    for i in range(L):
        p = f"transformer.h.{i}."
        if head:
            x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = norm(x)
        q = lin(h, p + "attn.c_q.weight").reshape(B, T, H, hd)
        k = lin(h, p + "attn.c_k.weight").reshape(B, T, K, hd)
        v = lin(h, p + "attn.c_v.weight").reshape(B, T, K, hd)
        if head and f"value_embeds.{i}.weight" in sd:
            g = 3 / (1 + np.exp(-lin(h[..., :12], p + "attn.ve_gate.weight")))
            v = v + g[..., None] * sd[f"value_embeds.{i}.weight"][idx].reshape(B, T, K, hd)
        q, k = norm(rope(q)), norm(rope(k))
        if head:
            q, k = q * 1.2, k * 1.2
        rep = H // K  # GQA: query head j reads kv head j // rep
        k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
        s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        mask = (col <= row) & (row - col <= windows[i])
        s = np.where(mask, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        y = np.einsum("bhts,bshd->bthd", a, v).reshape(B, T, D)
        x = x + lin(y, p + "attn.c_proj.weight")
        x = x + lin(np.maximum(lin(norm(x), p + "mlp.c_fc.weight"), 0) ** 2, p + "mlp.c_proj.weight")
        if head and i == L // 2:
            x_back = x
    if head:
        x = x - sd["backout_lambda"][0] * x_back
    logits = lin(norm(x), "lm_head.weight")[..., :V]
    return 15 * np.tanh(logits / 15)


def our_logits(params, cfg, idx):
    return np.asarray(jax.jit(gpt.forward, static_argnums=2)(params, idx, cfg))


# ----------------------------------------------------------------------------------------------
# Forward equivalence

def test_head_logits_match_reference():
    rng = np.random.default_rng(0)
    meta = head_meta()  # 3 layers: VE on 0 and 2, GQA 4/2, "SL" windows (S = 256 at sequence_len 1024)
    sd = make_state_dict(meta["model_config"], True, rng)
    sd = {"_orig_mod." + k: v for k, v in sd.items()}  # as saved from a torch.compile'd model
    cfg = convert.config_from_nanochat(meta, sd.keys(), **F32)
    assert (cfg.use_value_embeds, cfg.use_lambdas, cfg.use_smear, cfg.use_backout) == (True,) * 4
    assert gpt.value_embed_layers(cfg) == (0, 2) and gpt.layer_windows(cfg) == (256, 1024, 1024)
    assert cfg.padded_vocab == 128 and cfg.head_dim == 16
    params = convert.params_from_state_dict(sd, cfg)
    idx = rng.integers(0, 100, size=(2, 300))  # T > 256, so the short window bites
    want = ref_forward(sd, meta["model_config"], True, idx)
    got = our_logits(params, cfg, idx)
    assert got.shape == (2, 300, 100)
    assert np.abs(want).max() > 1.0  # non-trivial logits
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_classic_logits_match_reference():
    rng = np.random.default_rng(1)
    meta = classic_meta()  # MQA (2 query heads, 1 kv head), unpadded vocab of 100 rows
    sd = make_state_dict(meta["model_config"], False, rng)
    cfg = convert.config_from_nanochat(meta, sd.keys(), **F32)
    assert cfg.window_pattern == "L" and cfg.rope_base == 10_000.0 and cfg.qk_scale == 1.0
    assert not (cfg.use_value_embeds or cfg.use_lambdas or cfg.use_smear or cfg.use_backout)
    params = convert.params_from_state_dict(sd, cfg)
    assert params["wte"].shape == (128, 64) and not params["wte"][100:].any()  # zero-padded rows
    idx = rng.integers(0, 100, size=(2, 40))
    np.testing.assert_allclose(our_logits(params, cfg, idx), ref_forward(sd, meta["model_config"], False, idx),
                               rtol=2e-4, atol=2e-4)


def test_even_depth_head_from_init_params_round_trip():
    """init_params -> state dict -> params is the identity and gives identical logits (even depth: VE on 1, 3)."""
    cfg = GPTConfig(sequence_len=64, vocab_size=70, n_layer=4, n_head=2, n_kv_head=1, n_embd=32, head_dim=16,
                    window_pattern="SSL", **F32)
    params = jax.tree.map(np.asarray, gpt.init_params(cfg, jax.random.key(3)))
    sd = convert.state_dict_from_params(params, cfg)
    assert sd["transformer.wte.weight"].shape == (128, 32)
    assert sd["transformer.h.1.attn.ve_gate.weight"].shape == (1, 12) and "value_embeds.0.weight" not in sd
    back = convert.params_from_state_dict(sd, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    idx = np.random.default_rng(2).integers(0, 70, size=(2, 20))
    np.testing.assert_array_equal(our_logits(back, cfg, idx), our_logits(params, cfg, idx))
    # And the reference reads the exported state dict the same way.
    meta = {"model_config": convert.nanochat_model_config(cfg)}
    np.testing.assert_allclose(our_logits(params, cfg, idx), ref_forward(sd, meta["model_config"], True, idx),
                               rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------------------------------------------
# Exact round trips and key names

@pytest.mark.parametrize("head", [True, False])
def test_state_dict_round_trip_exact(head):
    rng = np.random.default_rng(4)
    meta = head_meta() if head else classic_meta()
    sd = make_state_dict(meta["model_config"], head, rng, embed_dtype=ml_dtypes.bfloat16)  # nanochat's bf16 tables
    cfg = convert.config_from_nanochat(meta, sd.keys())  # default embed_dtype bf16
    back = convert.state_dict_from_params(convert.params_from_state_dict(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype, k
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_head_key_names_match_nanochat():
    cfg = GPTConfig(sequence_len=64, vocab_size=100, n_layer=3, n_head=2, n_kv_head=2, n_embd=32, head_dim=16)
    sd = convert.state_dict_from_params(jax.tree.map(np.asarray, gpt.init_params(cfg, jax.random.key(0))), cfg)
    want = {"transformer.wte.weight": (128, 32), "lm_head.weight": (128, 32), "resid_lambdas": (3,),
            "x0_lambdas": (3,), "smear_gate.weight": (1, 24), "smear_lambda": (1,), "backout_lambda": (1,),
            "value_embeds.0.weight": (128, 32), "value_embeds.2.weight": (128, 32),
            "transformer.h.0.attn.ve_gate.weight": (2, 12), "transformer.h.2.attn.ve_gate.weight": (2, 12)}
    for i in range(3):
        want.update({f"transformer.h.{i}.attn.c_q.weight": (32, 32),
                     f"transformer.h.{i}.attn.c_k.weight": (32, 32),
                     f"transformer.h.{i}.attn.c_v.weight": (32, 32), f"transformer.h.{i}.attn.c_proj.weight": (32, 32),
                     f"transformer.h.{i}.mlp.c_fc.weight": (128, 32),
                     f"transformer.h.{i}.mlp.c_proj.weight": (32, 128)})
    assert {k: v.shape for k, v in sd.items()} == want
    assert sd["transformer.wte.weight"].dtype == ml_dtypes.bfloat16 and sd["lm_head.weight"].dtype == np.float32
    mc = convert.nanochat_model_config(cfg)
    assert mc == dict(sequence_len=64, vocab_size=100, n_layer=3, n_head=2, n_kv_head=2, n_embd=32,
                      window_pattern="SSSL")


def test_classic_key_names_and_unpadded_vocab():
    cfg = GPTConfig.classic(depth=2, vocab_size=100, sequence_len=64)
    sd = convert.state_dict_from_params(jax.tree.map(np.asarray, gpt.init_params(cfg, jax.random.key(0))), cfg)
    want = {"transformer.wte.weight", "lm_head.weight"} | {
        f"transformer.h.{i}.{m}.weight" for i in range(2)
        for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(sd) == want
    assert sd["transformer.wte.weight"].shape == (100, 128) and sd["lm_head.weight"].shape == (100, 128)
    assert "window_pattern" not in convert.nanochat_model_config(cfg)  # the classic GPTConfig has no such field


# ----------------------------------------------------------------------------------------------
# Configs and errors

def test_config_from_meta_only():
    cfg = convert.config_from_nanochat_meta(head_meta(window_pattern="SSSL"))
    assert cfg.window_pattern == "SSSL" and cfg.use_smear and cfg.rope_base == 100_000.0
    cfg = convert.config_from_nanochat_meta(classic_meta()["model_config"])  # bare model_config works too
    assert cfg.window_pattern == "L" and not cfg.use_value_embeds and cfg.init == "classic"
    assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (2, 1, 32)


def test_missing_unexpected_and_misshaped_keys_are_named():
    rng = np.random.default_rng(5)
    meta = head_meta()
    sd = make_state_dict(meta["model_config"], True, rng)
    cfg = convert.config_from_nanochat(meta, sd.keys())
    broken = dict(sd)
    del broken["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['transformer.h.1.mlp.c_fc.weight'\]"):
        convert.params_from_state_dict(broken, cfg)
    with pytest.raises(ValueError, match=r"unexpected keys \['value_embeds.1.weight'\]"):
        convert.params_from_state_dict({**sd, "value_embeds.1.weight": sd["value_embeds.0.weight"]}, cfg)
    with pytest.raises(ValueError, match=r"'transformer.h.2.attn.c_k.weight' has shape \(16, 64\)"):
        convert.params_from_state_dict({**sd, "transformer.h.2.attn.c_k.weight": np.zeros((16, 64), np.float32)}, cfg)
    with pytest.raises(ValueError, match=r"'transformer.wte.weight' has shape \(99, 64\)"):
        convert.params_from_state_dict({**sd, "transformer.wte.weight": np.zeros((99, 64), np.float32)}, cfg)


def test_intermediate_architecture_is_refused():
    sd = make_state_dict(head_meta()["model_config"], True, np.random.default_rng(6))
    del sd["smear_gate.weight"], sd["smear_lambda"], sd["backout_lambda"]  # like the Feb 2026 model
    with pytest.raises(ValueError, match="neither the current .* nor the classic"):
        convert.config_from_nanochat(head_meta(), sd.keys())


def test_export_refuses_configs_nanochat_cannot_hold():
    cfg = GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, head_dim=16,
                    use_smear=False)
    params = jax.tree.map(np.asarray, gpt.init_params(cfg, jax.random.key(0)))
    with pytest.raises(ValueError, match="only the all-on"):
        convert.state_dict_from_params(params, cfg)
    cfg = GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, head_dim=16,
                    short_window=8)
    with pytest.raises(ValueError, match="short_window"):
        convert.state_dict_from_params(jax.tree.map(np.asarray, gpt.init_params(cfg, jax.random.key(0))), cfg)


def test_torch_io_without_torch_says_how_to_install(tmp_path, monkeypatch):
    """Reading needs no torch (a corrupt file is a one-line UserError naming it); writing still does."""
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    (tmp_path / "model_000010.pt").write_bytes(b"")
    (tmp_path / "meta_000010.json").write_text("{}")
    with pytest.raises(UserError, match=r"model_000010.pt: not a torch.save zip archive"):
        convert.load_nanochat_checkpoint(tmp_path)
    cfg = GPTConfig.classic(depth=2, vocab_size=100, sequence_len=64)
    with pytest.raises(ImportError, match="pip install torch"):
        convert.save_nanochat_checkpoint(tmp_path, 1, {}, cfg)
    assert convert.find_nanochat_steps(tmp_path) == [10]
    with pytest.raises(FileNotFoundError, match="model_000011.pt"):
        convert.read_nanochat_checkpoint(tmp_path, 11)


def test_script_import_then_export_through_our_checkpoints(monkeypatch, tmp_path):
    """scripts/convert_checkpoint.py with the torch file I/O stubbed: import writes an orbax checkpoint that
    load_model reads back exactly; export hands the same params and config to the .pt writer."""
    import importlib.util

    from nanochat_jax.checkpoint import load_model

    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO_ROOT / "scripts" / "convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    meta = head_meta()
    sd = make_state_dict(meta["model_config"], True, np.random.default_rng(7), embed_dtype=ml_dtypes.bfloat16)
    monkeypatch.setattr(convert, "read_nanochat_checkpoint", lambda d, step: (sd, meta, 7))
    script.main(script.ConvertConfig(direction="import", source_dir=str(tmp_path), model_tag="d3"))
    params, cfg, our_meta = load_model("base", "d3")
    assert our_meta["step"] == 7 and our_meta["nanochat_meta"]["val_bpb"] == 1.23
    back = convert.state_dict_from_params(jax.tree.map(np.asarray, params), cfg)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)

    saved = {}
    monkeypatch.setattr(convert, "save_nanochat_checkpoint",
                        lambda d, step, p, c, m: saved.update(dir=d, step=step, params=p, cfg=c, meta=m) or d)
    script.main(script.ConvertConfig(direction="export", source_dir=str(tmp_path / "out"), model_tag="d3"))
    assert saved["step"] == 7 and saved["cfg"] == cfg and saved["meta"] == {"val_bpb": 1.23}
    jax.tree.map(np.testing.assert_array_equal, saved["params"], params)
