"""Tests for nanochat_jax/gpt.py: exact parameter counts and FLOPs from the reference table (eval_shape only),
the forward pass against an independent NumPy float64 implementation, causality, windows, GQA, loss,
gradients, init statistics and the config round trip."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanochat_jax import gpt
from nanochat_jax.gpt import GPTConfig

# A tiny config with every feature on: GQA, windows shorter than T, VE on layers 1 and 3, backout at 2.
TINY = dict(sequence_len=64, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, head_dim=16,
            short_window=8, compute_dtype="float32", embed_dtype="float32")


def tiny(**kw) -> GPTConfig:
    return GPTConfig(**{**TINY, **kw})


def random_params(cfg: GPTConfig, seed: int = 0):
    """Fresh random values for every leaf (no zero projections, non-trivial scalars) so every path matters."""
    rng = np.random.default_rng(seed)
    shapes = gpt.param_shapes(cfg)
    D, hd, H = cfg.n_embd, cfg.head_dim, cfg.n_head
    scale = {"wte": 1.0, "lm_head": 2.0 / math.sqrt(D), "value_embeds": 1.0, "ve_gate": 1.0, "smear_gate": 1.0,
             "wq": 1 / math.sqrt(D), "wk": 1 / math.sqrt(D), "wv": 1 / math.sqrt(D), "wo": 0.5 / math.sqrt(H * hd),
             "w_fc": 1 / math.sqrt(D), "w_proj": 0.5 / math.sqrt(4 * D)}

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        if name == "resid_lambdas":
            value = rng.uniform(0.8, 1.2, leaf.shape)
        elif name == "x0_lambdas":
            value = rng.uniform(0.0, 0.4, leaf.shape)
        elif name == "smear_lambda":
            value = np.array(0.7)
        elif name == "backout_lambda":
            value = np.array(0.3)
        else:
            value = scale[name] * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


# ----------------------------------------------------------------------------------------------
# NumPy float64 reference forward, written from the reference description (loops, explicit softmax/RoPE)

def np_forward(p, idx, cfg: GPTConfig):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    B, T = idx.shape
    L, H, K, hd = cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    eps = float(np.finfo(np.float32).eps)

    def rms(x):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    def rope(x):  # x (B, T, nh, hd); explicit per position and frequency
        out = np.empty_like(x)
        d = hd // 2
        for t in range(T):
            for m in range(d):
                theta = t / cfg.rope_base ** (2 * m / hd)
                c, s = math.cos(theta), math.sin(theta)
                a, b = x[:, t, :, m], x[:, t, :, m + d]
                out[:, t, :, m] = a * c + b * s
                out[:, t, :, m + d] = -a * s + b * c
        return out

    short = cfg.short_window if cfg.short_window is not None else -(-cfg.sequence_len // 512) * 128
    windows = [short if cfg.window_pattern[i % len(cfg.window_pattern)] == "S" else cfg.sequence_len
               for i in range(L)]
    windows[-1] = cfg.sequence_len
    ve_layers = [i for i in range(L) if i % 2 == (L - 1) % 2] if cfg.use_value_embeds else []

    x = rms(p["wte"][idx])
    if cfg.use_smear:
        gate = p["smear_lambda"] * sigmoid(x[:, 1:, :24] @ p["smear_gate"])
        x = np.concatenate([x[:, :1], x[:, 1:] + gate * x[:, :-1]], axis=1)
    x0 = x.copy()
    x_backout = None
    for i in range(L):
        a, m = {k: v[i] for k, v in p["blocks"]["attn"].items()}, {k: v[i] for k, v in p["blocks"]["mlp"].items()}
        if cfg.use_lambdas:
            x = p["resid_lambdas"][i] * x + p["x0_lambdas"][i] * x0
        h = rms(x)
        q = (h @ a["wq"]).reshape(B, T, H, hd)
        k = (h @ a["wk"]).reshape(B, T, K, hd)
        v = (h @ a["wv"]).reshape(B, T, K, hd)
        if i in ve_layers:
            j = ve_layers.index(i)
            ve = p["value_embeds"][j][idx].reshape(B, T, K, hd)
            v = v + 3 * sigmoid(h[..., :12] @ p["ve_gate"][j])[..., None] * ve
        q, k = rms(rope(q)) * cfg.qk_scale, rms(rope(k)) * cfg.qk_scale
        y = np.zeros((B, T, H, hd))
        for head in range(H):
            kv = head // (H // K)
            for b in range(B):
                for t in range(T):
                    keys = [s for s in range(T) if s <= t and t - s <= windows[i]]
                    scores = np.array([q[b, t, head] @ k[b, s, kv] for s in keys]) / math.sqrt(hd)
                    w = np.exp(scores - scores.max())
                    w /= w.sum()
                    y[b, t, head] = sum(wi * v[b, s, kv] for wi, s in zip(w, keys))
        x = x + y.reshape(B, T, H * hd) @ a["wo"]
        x = x + np.maximum(rms(x) @ m["w_fc"], 0) ** 2 @ m["w_proj"]
        if i == L // 2:
            x_backout = x.copy()
    if cfg.use_backout:
        x = x - p["backout_lambda"] * x_backout
    logits = (rms(x) @ p["lm_head"])[..., :cfg.vocab_size]
    return cfg.softcap * np.tanh(logits / cfg.softcap) if cfg.softcap else logits


def np_cross_entropy(logits, targets):
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, np.maximum(targets, 0)[..., None], -1)[..., 0]
    return np.where(targets >= 0, nll, 0.0)


# ----------------------------------------------------------------------------------------------
# Counts and FLOPs (nanochat/gpt.py, `GPT.num_scaling_params` and `GPT.estimate_flops`), never allocated

@pytest.mark.parametrize("depth, counts, scaling", [
    (12, dict(total=286_261_730, wte=25_165_824, value_embeds=150_994_944, lm_head=25_165_824,
              transformer_matrices=84_935_088), 110_100_912),
    (24, dict(total=1_384_122_122, wte=50_331_648, value_embeds=603_979_776, lm_head=50_331_648,
              transformer_matrices=679_478_976), 729_810_624),
])
def test_param_counts_match_reference_table(depth, counts, scaling):
    n = gpt.num_params(GPTConfig.from_depth(depth))
    for key, value in counts.items():
        assert n[key] == value, key
    assert n["scaling"] == scaling
    assert n["total"] == n["wte"] + n["value_embeds"] + n["lm_head"] + n["transformer_matrices"] + n["scalars"]


@pytest.mark.parametrize("depth, total", [(8, 125_829_354), (16, 536_871_738), (20, 896_533_746),
                                          (26, 1_681_786_938), (32, 2_818_575_450)])
def test_param_totals_other_depths(depth, total):
    assert gpt.num_params(GPTConfig.from_depth(depth))["total"] == total


def test_flops_per_token():
    assert f"{gpt.flops_per_token(GPTConfig.from_depth(24)):.3e}" == "4.775e+09"
    assert f"{gpt.flops_per_token(GPTConfig.from_depth(12)):.2e}" == "7.60e+08"
    # d12 with full attention everywhere: the logged "~887M"
    assert round(gpt.flops_per_token(GPTConfig.from_depth(12, window_pattern="L")) / 1e6) == 887
    assert gpt.flops_per_token(GPTConfig.classic()) == pytest.approx(3.491758e9, rel=1e-6)
    assert gpt.flops_per_token(GPTConfig.classic(34)) == pytest.approx(1.426509e10, rel=1e-6)


@pytest.mark.parametrize("depth, total", [(20, 560_988_160), (26, 1_081_999_360), (32, 1_879_048_192),
                                          (34, 2_217_082_880)])
def test_classic_param_counts(depth, total):
    n = gpt.num_params(GPTConfig.classic(depth))
    assert n["total"] == total and n["value_embeds"] == 0 and n["scalars"] == 0


def test_layer_windows():
    w = gpt.layer_windows(GPTConfig.from_depth(24))
    assert w.count(512) == 18 and w.count(2048) == 6 and w[-1] == 2048 and w[:4] == (512, 512, 512, 2048)
    assert gpt.layer_windows(GPTConfig.from_depth(6, window_pattern="S"))[-1] == 2048
    assert gpt.layer_windows(GPTConfig.from_depth(2, max_seq_len=1000)) == (256, 1000)  # ceil(250 to 128)
    assert gpt.layer_windows(tiny()) == (8, 8, 8, 64)
    assert gpt.value_embed_layers(tiny()) == (1, 3)
    assert gpt.value_embed_layers(tiny(n_layer=3)) == (0, 2)


# ----------------------------------------------------------------------------------------------
# Forward numerics

@pytest.mark.parametrize("overrides", [
    {},                                                           # all current features, GQA, windows
    dict(n_layer=3, n_kv_head=4, window_pattern="SL", qk_scale=1.0, softcap=0.0),   # odd depth (VE on 0, 2)
    dict(window_pattern="L", rope_base=10_000.0, use_value_embeds=False, use_lambdas=False, use_smear=False,
         use_backout=False, qk_scale=1.0, n_kv_head=1),            # classic features, MQA
    dict(n_layer=1),                                              # one (lone VE) layer, backout at layer 0
    dict(n_layer=2, window_pattern="S"),
])
def test_forward_matches_numpy_reference(overrides):
    cfg = tiny(**overrides)
    params = random_params(cfg, seed=1)
    idx = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 24))
    got = np.asarray(jax.jit(lambda p, i: gpt.forward(p, i, cfg))(params, jnp.asarray(idx)))
    want = np_forward(params, idx, cfg)
    assert got.shape == (2, 24, cfg.vocab_size) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_causality_and_rope_relative_positions():
    cfg = tiny()
    params = random_params(cfg, seed=3)
    f = jax.jit(lambda p, i, off: gpt.forward(p, i, cfg, pos_offset=off))
    idx = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 40))
    base = np.asarray(f(params, jnp.asarray(idx), 0))
    for t in (0, 17, 39):
        changed = idx.copy()
        changed[0, t] = (changed[0, t] + 1) % cfg.vocab_size
        out = np.asarray(f(params, jnp.asarray(changed), 0))
        np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert np.abs(out[:, t] - base[:, t]).max() > 1e-3
    # RoPE only encodes relative positions: shifting all positions leaves the logits unchanged.
    np.testing.assert_allclose(np.asarray(f(params, jnp.asarray(idx), 7)), base, atol=2e-4)


def test_embed_smear_with_previous_token_matches_full_sequence():
    cfg = tiny()
    params = random_params(cfg, seed=5)
    idx = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 10)))
    full = gpt.embed(params, idx, cfg)
    prev = gpt.rms_norm(jnp.take(params["wte"], idx[:, 4:5], axis=0))
    tail = gpt.embed(params, idx[:, 5:], cfg, x_prev_B1D=prev)
    np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, 5:]), rtol=1e-6, atol=1e-6)


def _np_attention(q, k, v, window):
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    t, u = np.arange(T)[:, None], np.arange(T)[None]
    mask = (u <= t) & ((t - u <= window) if window is not None else True)
    s = np.where(mask, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("window", [None, 0, 5])
def test_attention_gqa_and_window(window):
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(2, 20, 6, 8), (2, 20, 2, 8), (2, 20, 2, 8)])
    out = np.asarray(gpt.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window=window))
    np.testing.assert_allclose(out, _np_attention(q, k, v, window), rtol=1e-5, atol=1e-5)
    # GQA equals MHA on repeated K/V.
    mha = gpt.attention(jnp.asarray(q), jnp.repeat(jnp.asarray(k), 3, 2), jnp.repeat(jnp.asarray(v), 3, 2),
                        window=window)
    np.testing.assert_allclose(out, np.asarray(mha), rtol=1e-6, atol=1e-6)
    # Independent check against JAX's own implementation (left window, causal).
    ref = jax.nn.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True,
                                       local_window_size=None if window is None else (window, 0))
    np.testing.assert_allclose(out, np.asarray(ref), rtol=1e-5, atol=1e-5)
    # Influence: key j reaches query i only if 0 <= i - j <= window.
    j = 6
    k2, v2 = k.copy(), v.copy()
    k2[:, j] += 1.0
    v2[:, j] += 1.0
    out2 = np.asarray(gpt.attention(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v2), window=window))
    changed = np.abs(out2 - out).max(axis=(0, 2, 3)) > 1e-6
    reach = np.array([0 <= i - j <= (window if window is not None else 10**9) for i in range(20)])
    np.testing.assert_array_equal(changed, reach)


def test_attention_traced_window_and_q_offset():
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 12, 2, 8)), jnp.float32) for _ in range(3))
    full = gpt.attention(q, k, v, window=3)
    traced = jax.jit(lambda w: gpt.attention(q, k, v, window=w))(jnp.int32(3))
    np.testing.assert_allclose(np.asarray(traced), np.asarray(full), rtol=1e-6)
    # The last 4 queries against all 12 keys (chunked prefill) equal the tail of the full computation.
    tail = gpt.attention(q[:, 8:], k, v, window=3, q_offset=8)
    np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, 8:]), rtol=1e-6, atol=1e-6)


def test_kernel_backend_gets_static_windows_per_layer(monkeypatch):
    """Kernel backends need Python-int windows: the scan switches between one branch per distinct window.
    Stand in for cuDNN with the xla path (asserting a static window) and compare with the xla model."""
    real, seen = gpt.attention, set()

    def fake_kernel(q, k, v, *, window=None, backend="xla", **kw):
        if backend == "cudnn":
            assert isinstance(window, int)
            seen.add(window)
            backend = "xla"
        return real(q, k, v, window=window, backend=backend, **kw)

    monkeypatch.setattr(gpt, "attention", fake_kernel)
    cfg = tiny()
    params = random_params(cfg, seed=15)
    idx = jnp.asarray(np.random.default_rng(16).integers(0, cfg.vocab_size, (1, 20)))
    want = gpt.forward(params, idx, cfg)
    got = gpt.forward(params, idx, tiny(attn_backend="cudnn"))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert seen == {8, 64}


def test_layer_plan():
    """Groups of P layers whose windows (static plan) and value-embedding flags repeat, and an unrolled tail."""
    d20 = GPTConfig.from_depth(20)
    assert gpt.layer_plan(d20) == (4, 5, ()) and gpt.layer_plan(d20, static_windows=False) == (2, 10, ())
    assert gpt.layer_plan(tiny(n_layer=5)) == (4, 1, (4,))  # layer 4 would be S: the forced-long last layer
    assert gpt.layer_plan(tiny(n_layer=5), static_windows=False) == (2, 2, (4,))
    assert gpt.layer_plan(tiny(n_layer=6, use_value_embeds=False)) == (4, 1, (4, 5))
    assert gpt.layer_plan(tiny(n_layer=7, window_pattern="SSL")) == (6, 1, (6,))
    assert gpt.layer_plan(tiny(n_layer=2)) == (4, 0, (0, 1))


@pytest.mark.parametrize("overrides", [dict(n_layer=5), dict(n_layer=6, use_value_embeds=False),
                                       dict(n_layer=7, window_pattern="SSL"), dict(n_layer=2)])
def test_static_window_groups_match_numpy_reference(overrides, monkeypatch):
    """A kernel backend gets every window as a Python int, through the grouped scan plus its tail: the result is
    the reference's at depths and patterns that leave a tail. (cuDNN is stood in for by the xla path.)"""
    real, seen = gpt.attention, []

    def fake_kernel(q, k, v, *, window=None, backend="xla", **kw):
        assert isinstance(window, int) and backend == "cudnn"
        seen.append(window)
        return real(q, k, v, window=window, backend="xla", **kw)

    monkeypatch.setattr(gpt, "attention", fake_kernel)
    cfg = tiny(attn_backend="cudnn", **overrides)
    params = random_params(cfg, seed=21)
    idx = np.random.default_rng(22).integers(0, cfg.vocab_size, (2, 20))
    got = np.asarray(gpt.forward(params, jnp.asarray(idx), cfg))
    np.testing.assert_allclose(got, np_forward(params, idx, cfg), rtol=1e-4, atol=1e-4 * np.abs(got).max())
    assert set(seen) == set(gpt.layer_windows(cfg))


def test_attention_backend_errors():
    x = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="q_offset=k_offset=0 only"):
        gpt.attention(x, x, x, backend="pallas", q_offset=3)
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
            gpt.attention(x, x, x, backend="cudnn")
    with pytest.raises(ValueError, match="unknown attention backend"):
        gpt.attention(x, x, x, backend="flash")


# ----------------------------------------------------------------------------------------------
# Loss and gradients

def test_loss_ignore_index_and_reductions():
    cfg = tiny()
    params = random_params(cfg, seed=9)
    rng = np.random.default_rng(10)
    idx = rng.integers(0, cfg.vocab_size, (2, 16))
    targets = rng.integers(0, cfg.vocab_size, (2, 16))
    targets[0, :5] = -1
    targets[1, 9] = -1
    logits = np.asarray(gpt.forward(params, jnp.asarray(idx), cfg), np.float64)
    want = np_cross_entropy(logits, targets)
    per_tok = np.asarray(gpt.forward(params, jnp.asarray(idx), cfg, targets_BT=jnp.asarray(targets),
                                     loss_reduction="none"))
    assert per_tok.shape == (2, 16) and (per_tok[targets < 0] == 0).all()
    np.testing.assert_allclose(per_tok, want, rtol=1e-5, atol=1e-5)
    mean = float(gpt.forward(params, jnp.asarray(idx), cfg, targets_BT=jnp.asarray(targets)))
    assert mean == pytest.approx(want[targets >= 0].mean(), rel=1e-5)
    assert float(gpt.cross_entropy(jnp.asarray(logits), -jnp.ones((2, 16), jnp.int32))) == 0.0
    with pytest.raises(ValueError, match="loss_reduction"):
        gpt.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), "avg")


def test_grad_bf16_finite_and_reaches_every_param():
    cfg = tiny(compute_dtype="bfloat16", embed_dtype="bfloat16")
    params = random_params(cfg, seed=11)
    idx = jnp.asarray(np.random.default_rng(12).integers(0, cfg.vocab_size, (2, 32)))
    loss_fn = lambda p: gpt.forward(p, idx, cfg, targets_BT=jnp.roll(idx, -1, axis=1))  # noqa: E731
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert np.isfinite(float(loss))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g, np.float32)
        assert np.isfinite(g).all(), path
        assert np.abs(g).max() > 0, path
    assert grads["wte"].dtype == jnp.bfloat16 and grads["blocks"]["attn"]["wq"].dtype == jnp.float32
    # Logits stay fp32 in bf16 compute, and close to the fp32 model.
    lo_bf16 = gpt.forward(params, idx, cfg)
    lo_f32 = gpt.forward(params, idx, tiny(embed_dtype="bfloat16"))
    assert lo_bf16.dtype == jnp.float32
    assert float(jnp.abs(lo_bf16 - lo_f32).max()) < 0.1 * float(jnp.abs(lo_f32).max())


def test_program_size_is_flat_in_depth():
    def count(jaxpr):  # equations, including those inside scan/switch/jit bodies
        total = 0
        for eqn in jaxpr.eqns:
            total += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else [value]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        total += count(sub)
        return total

    def n_eqns(cfg):
        p = gpt.param_shapes(cfg)
        loss = lambda p, i: gpt.forward(p, i, cfg, targets_BT=i)  # noqa: E731
        return count(jax.make_jaxpr(loss)(p, jnp.zeros((1, 8), jnp.int32)).jaxpr)
    assert n_eqns(tiny(n_layer=4)) == n_eqns(tiny(n_layer=12))
    assert n_eqns(tiny(n_layer=5)) == n_eqns(tiny(n_layer=13))


def test_remat_gives_same_loss_and_grads():
    cfg = tiny()
    params = random_params(cfg, seed=13)
    idx = jnp.asarray(np.random.default_rng(14).integers(0, cfg.vocab_size, (1, 16)))
    grad = lambda c: jax.jit(jax.grad(lambda p: gpt.forward(p, idx, c, targets_BT=idx)))(params)  # noqa: E731
    for a, b in zip(jax.tree.leaves(grad(cfg)), jax.tree.leaves(grad(tiny(remat=True)))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Init

def test_reference_init_statistics():
    cfg = tiny(n_embd=256, n_head=8, n_kv_head=4, head_dim=32, vocab_size=2000, embed_dtype="bfloat16")
    p = gpt.init_params(cfg, jax.random.key(0))
    D, s = 256, math.sqrt(3 / 256)
    assert p["wte"].shape == (2048, D) and p["wte"].dtype == jnp.bfloat16
    assert float(jnp.std(p["wte"].astype(jnp.float32))) == pytest.approx(0.8, rel=0.01)
    assert p["lm_head"].dtype == jnp.float32 and float(jnp.std(p["lm_head"])) == pytest.approx(0.001, rel=0.01)
    for name, bound in (("wq", s), ("wk", s), ("wv", s)):
        w = p["blocks"]["attn"][name]
        assert float(jnp.abs(w).max()) <= bound and float(jnp.abs(w).max()) > 0.99 * bound
        assert float(jnp.std(w)) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    w_fc = p["blocks"]["mlp"]["w_fc"]
    assert 0.99 * 0.4 * s < float(jnp.abs(w_fc).max()) <= 0.4 * s
    assert not p["blocks"]["attn"]["wo"].any() and not p["blocks"]["mlp"]["w_proj"].any()
    ve = p["value_embeds"].astype(jnp.float32)
    assert p["value_embeds"].dtype == jnp.bfloat16 and float(jnp.abs(ve).max()) <= s * 1.004
    for name in ("ve_gate", "smear_gate"):
        assert 0 <= float(p[name].min()) and float(p[name].max()) <= 0.02
    i = np.arange(4) / 3
    np.testing.assert_allclose(np.asarray(p["resid_lambdas"]), 1.15 - 0.10 * i, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p["x0_lambdas"]), 0.20 - 0.15 * i, rtol=1e-6)
    assert float(p["smear_lambda"]) == 0.0 and float(p["backout_lambda"]) == pytest.approx(0.2)
    assert p["backout_lambda"].shape == () and p["smear_gate"].shape == (24, 1) and p["ve_gate"].shape == (2, 12, 4)
    # Different layers get different draws.
    assert not np.allclose(np.asarray(p["blocks"]["attn"]["wq"][0]), np.asarray(p["blocks"]["attn"]["wq"][1]))


def test_classic_init_statistics():
    cfg = GPTConfig.classic(4, vocab_size=1000, sequence_len=64, n_kv_head=1)
    p = gpt.init_params(cfg, jax.random.key(1))
    D = 256  # 4*64, 2 heads of 128
    assert set(p) == {"wte", "lm_head", "blocks"}
    assert not p["lm_head"].any() and not p["blocks"]["attn"]["wo"].any() and not p["blocks"]["mlp"]["w_proj"].any()
    assert float(jnp.std(p["wte"].astype(jnp.float32))) == pytest.approx(1.0, rel=0.01)
    assert float(jnp.std(p["blocks"]["attn"]["wq"])) == pytest.approx(1 / math.sqrt(D), rel=0.02)
    # wk maps 256 -> 128 (MQA): std shrinks by sqrt(fan_out/fan_in)
    assert float(jnp.std(p["blocks"]["attn"]["wk"])) == pytest.approx(math.sqrt(0.5) / math.sqrt(D), rel=0.02)
    assert float(jnp.std(p["blocks"]["mlp"]["w_fc"])) == pytest.approx(1 / math.sqrt(D), rel=0.02)


def test_init_under_eval_shape_and_jit():
    cfg = GPTConfig.from_depth(2, max_seq_len=128, vocab_size=1000)
    shapes = jax.eval_shape(lambda k: gpt.init_params(cfg, k), jax.random.key(0))
    real = jax.jit(lambda k: gpt.init_params(cfg, k))(jax.random.key(0))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(lambda a: (a.shape, a.dtype), real)
    assert shapes["value_embeds"].shape == (1, 1024, 128) and shapes["ve_gate"].shape == (1, 12, 1)


# ----------------------------------------------------------------------------------------------
# Config

def test_from_depth_sizing():
    c = GPTConfig.from_depth(20)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (1280, 10, 10, 128)
    assert (c.sequence_len, c.vocab_size) == (2048, 32768)
    assert GPTConfig.from_depth(3).n_embd == 256  # ceil(192/128)*128
    assert GPTConfig.from_depth(4, n_kv_head=1, compute_dtype="float32").n_kv_head == 1
    assert GPTConfig(vocab_size=50257).padded_vocab == 50304


def test_classic_preset_fields():
    c = GPTConfig.classic()
    assert (c.n_layer, c.n_embd, c.n_head, c.head_dim, c.vocab_size) == (20, 1280, 10, 128, 65536)
    assert c.window_pattern == "L" and c.rope_base == 10_000 and c.qk_scale == 1.0 and c.init == "classic"
    assert not (c.use_value_embeds or c.use_lambdas or c.use_smear or c.use_backout)
    assert c.softcap == 15.0
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig.classic(5)  # 320 wide, 3 heads


def test_to_dict_from_dict_round_trip_and_legacy_defaults():
    for c in (GPTConfig.from_depth(12), GPTConfig.classic(), tiny(short_window=3, remat=True)):
        assert GPTConfig.from_dict(c.to_dict()) == c
    # classic nanochat metadata: only the core keys. Missing features mean the classic model.
    old = dict(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280)
    assert GPTConfig.from_dict(old) == GPTConfig.classic()
    with pytest.raises(ValueError, match="unknown keys.*'n_heads'"):
        GPTConfig.from_dict({**old, "n_heads": 3})
    with pytest.raises(ValueError, match="missing required keys.*'n_embd'"):
        GPTConfig.from_dict({k: v for k, v in old.items() if k != "n_embd"})


@pytest.mark.parametrize("kw, match", [
    (dict(n_layer=0), "n_layer must be a positive int"),
    (dict(n_head=5, n_kv_head=2, n_embd=5 * 128), "n_kv_head .* must divide n_head"),
    (dict(n_embd=700), "n_embd .* must equal n_head\\*head_dim"),
    (dict(window_pattern="SSXL"), "window_pattern must be"),
    (dict(window_pattern=""), "window_pattern must be"),
    (dict(compute_dtype="float16"), "compute_dtype must be one of"),
    (dict(attn_backend="flash"), "attn_backend must be one of"),
    (dict(init="xavier"), "init must be one of"),
    (dict(head_dim=127, n_embd=6 * 127), "head_dim must be even"),
])
def test_validation_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kw)


# ----------------------------------------------------------------------------------------------
# The lean backward: custom VJPs (RMSNorm, embedding lookup) and the rematerialised relu²

def _rms_norm_f64(x, dy, scale):
    """float64 RMSNorm (eps = fp32 epsilon), times scale, and its input gradient by the chain rule."""
    x = x.astype(np.float64)
    r = 1.0 / np.sqrt(np.mean(x * x, -1, keepdims=True) + gpt.RMS_EPS)
    y = x * r
    g = dy.astype(np.float64) * scale  # gradient wrt y
    dx = r * g - x * r ** 3 * np.mean(g * x, -1, keepdims=True)
    return y * scale, dx


@pytest.mark.parametrize("dtype, scale, tol", [(jnp.float32, 1.0, 1e-5), (jnp.float32, 1.2, 1e-5),
                                               (jnp.bfloat16, 1.0, 2e-2), (jnp.bfloat16, 1.2, 2e-2)])
def test_rms_norm_value_and_grad_match_float64(dtype, scale, tol):
    rng = np.random.default_rng()
    x = (rng.standard_normal((3, 5, 64)) * rng.uniform(0.1, 10, (3, 5, 1))).astype(np.float32)
    dy = rng.standard_normal((3, 5, 64)).astype(np.float32)
    x_in, dy_in = jnp.asarray(x, dtype), jnp.asarray(dy, dtype)
    y, vjp = jax.vjp(lambda a: gpt.rms_norm(a, scale), x_in)
    (dx,) = vjp(dy_in)
    assert y.dtype == dtype and dx.dtype == dtype
    want_y, want_dx = _rms_norm_f64(np.asarray(x_in, np.float64), np.asarray(dy_in, np.float64), scale)
    np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=tol, atol=tol * np.abs(want_dx).max())


def test_embedding_grad_accumulates_in_fp32():
    rng = np.random.default_rng()
    table = jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16)
    idx = jnp.asarray(np.concatenate([np.zeros(4096, np.int32), rng.integers(1, 16, 100)]))[None]
    g = jnp.asarray(rng.uniform(0.5, 1.5, (1, idx.shape[1], 8)), jnp.bfloat16)
    out, vjp = jax.vjp(lambda t: gpt.embedding_lookup(t, idx), table)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(table)[np.asarray(idx)])
    (dt,) = vjp(g)
    assert dt.dtype == jnp.bfloat16
    want = np.zeros((16, 8))
    np.add.at(want, np.asarray(idx)[0], np.asarray(g, np.float64)[0])
    # One rounding of the fp32 sum to bf16 (2^-8 relative); a bf16 scatter-add of 4096 rows stalls far below.
    np.testing.assert_allclose(np.asarray(dt, np.float64), want, rtol=2 ** -8)


def test_mlp_value_and_grads_match_float64():
    cfg = tiny()
    rng = np.random.default_rng()
    mlp = gpt.MLP(cfg, rngs=nnx.Rngs(0))
    w_fc = rng.standard_normal(mlp.w_fc.shape).astype(np.float32) / 8
    w_proj = rng.standard_normal(mlp.w_proj.shape).astype(np.float32) / 8
    mlp.w_fc[...], mlp.w_proj[...] = jnp.asarray(w_fc), jnp.asarray(w_proj)
    x = rng.standard_normal((2, 4, cfg.n_embd)).astype(np.float32)
    dy = rng.standard_normal((2, 4, cfg.n_embd)).astype(np.float32)
    graphdef, state = nnx.split(mlp)
    y, vjp = jax.vjp(lambda s, a: nnx.merge(graphdef, s)(a), state, jnp.asarray(x))
    d_state, dx = vjp(jnp.asarray(dy))
    h = x.astype(np.float64) @ w_fc
    r = np.maximum(h, 0) ** 2
    dh = (dy @ w_proj.T.astype(np.float64)) * 2 * np.maximum(h, 0)
    np.testing.assert_allclose(np.asarray(y), r @ w_proj, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), dh @ w_fc.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_state["w_proj"][...]), np.einsum("btf,btd->fd", r, dy),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_state["w_fc"][...]), np.einsum("btd,btf->df", x, dh), rtol=1e-4, atol=1e-5)
