"""Optimizer tests: Muon/AdamW steps against float64 NumPy references, orthogonaliser spectra, schedules,
the group table, the scaling rules of nanochat's scripts/base_train.py, and a jitted end-to-end step.

The NumPy Muon reference is written in the PyTorch (out, in) convention of nanochat's `muon_step_fused`
(rows = out = shape[-2]); our params are (in, out), so it is fed transposes and its result transposed back.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from nanochat_jax import optim
from nanochat_jax.optim import (NEWTON_SCHULZ_COEFFS, POLAR_EXPRESS_COEFFS, OptimConfig, auto_batch_size,
                                batch_lr_scale, build_optimizer, current_hyperparams, group_of, horizon,
                                lr_multiplier, muon_momentum, muon_weight_decay, orthogonalize, param_groups,
                                param_lrs, scaled_weight_decay)

# ----------------------------------------------------------------------------------------------
# float64 NumPy references (torch (out, in) convention)


def np_orthogonalize(X, classic):
    """Reference polar iteration on (..., rows, cols), wide/tall forms as in the reference."""
    norm = np.sqrt((X**2).sum(axis=(-2, -1), keepdims=True))
    X = X / (norm + 1e-7) if classic else X / (norm * 1.01 + 1e-6)
    coeffs = [NEWTON_SCHULZ_COEFFS] * 5 if classic else POLAR_EXPRESS_COEFFS
    tall = X.shape[-2] > X.shape[-1]
    T = lambda a: np.swapaxes(a, -1, -2)
    for a, b, c in coeffs:
        if tall:
            A = T(X) @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ T(X)
            X = a * X + (b * A + c * A @ A) @ X
    return X


def np_muon_step(P, G, buf, vbuf, lr, mom, wd, beta2=0.9, classic=False, eq=True, plus=True):
    """One reference Muon step on (..., rows=out, cols=in). Returns new P, buf, vbuf."""
    r, c = P.shape[-2], P.shape[-1]
    buf = buf + (1 - mom) * (G - buf)
    g = G + mom * (buf - G)
    if eq and not classic:
        target = np.sqrt((g**2).sum(axis=(-2, -1), keepdims=True)) / math.sqrt(r)
        row = np.maximum(np.sqrt((g**2).sum(axis=-1, keepdims=True)), 1e-6)
        g = g * (target / row)
    g = np_orthogonalize(g, classic)
    lr = lr * max(1.0, r / c) ** 0.5
    if classic:
        return P - lr * g, buf, vbuf
    if plus:
        g = g * (math.sqrt(min(r, c)) / np.maximum(np.sqrt((g**2).sum(axis=(-2, -1), keepdims=True)), 1e-6))
    red = -1 if r >= c else -2
    v_mean = (g**2).mean(axis=red, keepdims=True)
    n = g.shape[red]
    v_norm = np.sqrt(v_mean.sum(axis=(-2, -1), keepdims=True) * n)
    vbuf = vbuf + (1 - beta2) * (v_mean - vbuf)
    step = 1 / np.sqrt(np.maximum(vbuf, 1e-10))
    v_norm_new = np.sqrt((v_mean * n * step**2).sum(axis=(-2, -1), keepdims=True))
    g = g * step * (v_norm / np.maximum(v_norm_new, 1e-10))
    mask = (g * P) >= 0
    return P - (lr * g + lr * wd * P * mask), buf, vbuf


def np_vbuf_shape(torch_shape):
    *lead, r, c = torch_shape
    return (*lead, r, 1) if r >= c else (*lead, 1, c)


T = lambda a: np.swapaxes(np.asarray(a, dtype=np.float64), -1, -2)

# our (in, out) shapes: wide-in-torch (out < in), tall-in-torch (out > in, e.g. w_fc), square, stacked, ve_gate-like
MUON_SHAPES = [(48, 16), (16, 64), (32, 32), (3, 24, 40), (2, 40, 24), (2, 12, 6)]


def run_muon(shape, seed, *, classic=False, ortho_dtype=jnp.float32, lr=0.05, wd=0.3, steps=2):
    """Two Muon steps with ours and the reference; returns (ours, ref) params/buffers in our layout."""
    rng = np.random.default_rng(seed)
    P0 = rng.standard_normal(shape).astype(np.float32) * 0.1
    Gs = [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]
    moms = [0.85, 0.9]
    tx = optim.muon(lr, lambda it: 1.0, lambda it: jnp.asarray(moms)[it], lambda it: wd, classic=classic,
                    ortho_dtype=ortho_dtype)
    params = {"w": jnp.asarray(P0)}
    state = tx.init(params)
    upd = jax.jit(tx.update)
    for G in Gs:
        u, state = upd({"w": jnp.asarray(G)}, state, params)
        params = optax.apply_updates(params, u)

    Pt, buf = T(P0), np.zeros(T(P0).shape)
    vbuf = np.zeros(np_vbuf_shape(Pt.shape))
    for G, m in zip(Gs, moms):
        Pt, buf, vbuf = np_muon_step(Pt, T(G), buf, vbuf, lr, m, wd, classic=classic)
    ours = dict(p=np.asarray(params["w"], np.float64), mu=np.asarray(state.mu["w"], np.float64),
                nu=np.asarray(state.nu["w"], np.float64))
    ref = dict(p=T(Pt), mu=T(buf), nu=T(vbuf))
    return ours, ref, P0


def rel_err(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("shape", MUON_SHAPES)
def test_muon_two_steps_match_float64_reference(shape):
    ours, ref, P0 = run_muon(shape, seed=sum(shape), ortho_dtype=jnp.float32)
    assert ours["nu"].shape == ref["nu"].shape
    np.testing.assert_allclose(ours["mu"], ref["mu"], rtol=1e-6, atol=1e-6)
    # fp32 orthogonaliser vs float64: the Polar Express map amplifies rounding by up to ~1e3 for small
    # singular values, so allow ~1e-4 relative on the update.
    du_ours, du_ref = ours["p"] - P0, ref["p"] - P0
    assert rel_err(du_ours, du_ref) < 2e-4, rel_err(du_ours, du_ref)
    np.testing.assert_allclose(ours["nu"], ref["nu"], rtol=1e-3)
    assert rel_err(ours["nu"], ref["nu"]) < 2e-4


@pytest.mark.parametrize("shape", [(48, 16), (16, 64), (2, 40, 24)])
def test_muon_bf16_orthogonaliser_close_to_reference(shape):
    # The default (reference) path: Polar Express in bf16. Its first step computes a ~1.5 result from terms of
    # size ~22 (a=8.2, b=-22.5, c=15.9), so bf16 rounding (2^-9 relative) costs ~5-10% of the update
    # (measured 0.08-0.11 relative Frobenius, cosine > 0.994), the same size as Polar Express's own deviation from
    # the exact polar factor. The update's norm is still exact (Muon+ and NorMuon renormalise).
    ours, ref, P0 = run_muon(shape, seed=7 + sum(shape), ortho_dtype=jnp.bfloat16)
    a, b = (ours["p"] - P0).ravel(), (ref["p"] - P0).ravel()
    assert rel_err(a, b) < 0.15
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
    # mask-free quantity: with wd = 0 the step norm is lr_eff * sqrt(min(in, out)) per matrix in bf16 too
    ours0, _, P0 = run_muon(shape, seed=1, ortho_dtype=jnp.bfloat16, wd=0.0, steps=1)
    norms = np.sqrt(((ours0["p"] - P0) ** 2).sum(axis=(-2, -1)))
    np.testing.assert_allclose(norms, 0.05 * optim.muon_lr_factor(shape) * math.sqrt(min(shape[-2:])), rtol=2e-3)


@pytest.mark.parametrize("shape", [(48, 16), (16, 64), (3, 24, 40)])
def test_classic_muon_matches_reference(shape):
    ours, ref, P0 = run_muon(shape, seed=3 + sum(shape), classic=True, ortho_dtype=jnp.float32)
    assert rel_err(ours["p"] - P0, ref["p"] - P0) < 2e-4
    assert np.all(ours["nu"] == 0)  # NorMuon state unused in the classic variant


def test_muon_lr_aspect_factor_and_tall_step_size():
    # w_fc-like (D, 4D): reference (out, in) = (4D, D) is tall, lr x 2. After Muon+ and NorMuon the update's
    # Frobenius norm is lr_eff * sqrt(min(in, out)) (wd = 0 here).
    D = 16
    assert optim.muon_lr_factor((D, 4 * D)) == 2.0 and optim.muon_lr_factor((4 * D, D)) == 1.0
    tx = optim.muon(0.01, lambda it: 1.0, lambda it: 0.9, lambda it: 0.0)
    rng = np.random.default_rng(1)
    for shape, factor in [((D, 4 * D), 2.0), ((4 * D, D), 1.0), ((5, D, 4 * D), 2.0)]:
        p = {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
        u, _ = tx.update({"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}, tx.init(p), p)
        norms = np.sqrt((np.asarray(u["w"], np.float64) ** 2).sum(axis=(-2, -1)))
        np.testing.assert_allclose(norms, 0.01 * factor * math.sqrt(D), rtol=1e-3)


# ----------------------------------------------------------------------------------------------
# Orthogonaliser spectra


def scalar_map(s, classic):
    for a, b, c in ([NEWTON_SCHULZ_COEFFS] * 5 if classic else POLAR_EXPRESS_COEFFS):
        s = a * s + b * s**3 + c * s**5
    return s


def test_polar_express_design_band():
    # The composed 5-step polynomial maps [1e-3, 1] into about [0.859, 1.141]; NS into [0.682, 1.202] from 3e-3.
    grid = np.geomspace(1e-3, 1, 20001)
    pe = scalar_map(grid, classic=False)
    assert 0.855 < pe.min() < 0.862 and 1.138 < pe.max() < 1.145
    ns = scalar_map(np.geomspace(3e-3, 1, 20001), classic=True)
    assert 0.67 < ns.min() < 0.69 and 1.19 < ns.max() < 1.21


@pytest.mark.parametrize("classic", [False, True])
@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32), (3, 48, 96)])
def test_orthogonalizer_applies_scalar_map_to_singular_values(shape, classic):
    # Build X = U diag(s) V^T with a controlled spectrum; the output's singular values must be the scalar
    # polynomial map of s / (|X|_F * 1.01 + 1e-6) (fp32, tight) and land in the design band (also in bf16).
    rng = np.random.default_rng(shape[-1] + 100 * classic)
    *lead, m, n = shape
    k = min(m, n)
    Us = np.linalg.qr(rng.standard_normal((*lead, m, k)))[0]
    Vs = np.linalg.qr(rng.standard_normal((*lead, n, k)))[0]
    s = np.geomspace(1.0, 0.05, k) * np.exp(rng.uniform(-0.1, 0.1, k))
    X = (Us * s) @ np.swapaxes(Vs, -1, -2)
    fro = np.sqrt((X**2).sum(axis=(-2, -1), keepdims=True))[..., 0]
    expect = np.sort(scalar_map(s / (fro + 1e-7 if classic else fro * 1.01 + 1e-6), classic), axis=-1)
    lo, hi = (0.68, 1.21) if classic else (0.858, 1.142)
    for dtype, tol, band_slack in [(jnp.float32, 2e-4, 0.0), (jnp.bfloat16, None, 0.08)]:
        Y = orthogonalize(jnp.asarray(X, jnp.float32), classic=classic, dtype=dtype)
        assert Y.dtype == dtype and Y.shape == X.shape
        sv = np.sort(np.linalg.svd(np.asarray(Y, np.float64), compute_uv=False), axis=-1)
        if tol is not None:
            np.testing.assert_allclose(sv, expect, atol=tol)
        assert sv.min() > lo - band_slack and sv.max() < hi + band_slack / 2, (sv.min(), sv.max())


def test_orthogonalizer_random_gaussian_band():
    # Plain random rectangular gradients (aspect >= 2): measured fp32 about [0.86, 1.141], bf16 about [0.82, 1.141].
    rng = np.random.default_rng(5)
    for shape in [(32, 128), (256, 64), (48, 96)]:
        X = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for dtype, lo in [(jnp.float32, 0.855), (jnp.bfloat16, 0.78)]:
            sv = np.linalg.svd(np.asarray(orthogonalize(X, dtype=dtype), np.float64), compute_uv=False)
            assert lo < sv.min() and sv.max() < 1.15, (shape, dtype, sv.min(), sv.max())


def test_orthogonalize_is_transpose_equivariant():
    # Our layout is the transpose of the reference's; the iteration must commute with transposition.
    X = jnp.asarray(np.random.default_rng(2).standard_normal((2, 24, 56)), jnp.float32)
    a = orthogonalize(X, dtype=jnp.float32)
    b = jnp.swapaxes(orthogonalize(jnp.swapaxes(X, -1, -2), dtype=jnp.float32), -1, -2)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


# ----------------------------------------------------------------------------------------------
# AdamW


def test_adamw_fp32_equals_optax_adamw():
    rng = np.random.default_rng(11)
    cfg = OptimConfig(num_iterations=60, model_dim=8, warmup_steps=3, warmdown_ratio=0.5)
    sched = lambda it: 0.01 * lr_multiplier(cfg, it)
    ours = optim.adamw(0.01, 0.8, 0.96, 1e-10, 0.05, lambda it: lr_multiplier(cfg, it))
    ref = optax.adamw(sched, b1=0.8, b2=0.96, eps=1e-10, weight_decay=0.05)
    p1 = p2 = {"a": jnp.asarray(rng.standard_normal((7, 5)), jnp.float32),
               "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}
    s1, s2 = ours.init(p1), ref.init(p2)
    for _ in range(6):
        g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), p1)
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for k in p1:
        np.testing.assert_allclose(np.asarray(p1[k]), np.asarray(p2[k]), rtol=1e-5, atol=1e-6)
    assert int(s1.count) == 6


def np_adamw_bf16(p_bf16, grads, lr, b1, b2, eps, wd):
    """Reference adamw_step_fused for a bf16 param with bf16 state: fp32 math, bf16 storage."""
    bf16, f32 = ml_dtypes.bfloat16, np.float32
    p, m, v = p_bf16, np.zeros_like(p_bf16), np.zeros_like(p_bf16)
    for t, g in enumerate(grads, start=1):
        p32, m32, v32, g32 = p.astype(f32), m.astype(f32), v.astype(f32), g.astype(f32)
        p32 = p32 * f32(1 - lr * wd)
        m32 = m32 + f32(1 - b1) * (g32 - m32)
        v32 = v32 + f32(1 - b2) * (g32 * g32 - v32)
        denom = np.sqrt(v32 / f32(1 - b2**t)) + f32(eps)
        p32 = p32 - f32(lr / (1 - b1**t)) * m32 / denom
        p, m, v = p32.astype(bf16), m32.astype(bf16), v32.astype(bf16)
    return p, m, v


def test_adamw_bf16_param_fp32_math_bf16_state():
    rng = np.random.default_rng(12)
    p0 = (rng.standard_normal((64, 16)) * 0.8).astype(ml_dtypes.bfloat16)
    grads = [(rng.standard_normal((64, 16)) * 1e-2).astype(ml_dtypes.bfloat16) for _ in range(4)]
    tx = optim.adamw(0.3, 0.8, 0.995, 1e-10, 0.001, lambda it: 1.0)
    params = {"wte": jnp.asarray(p0)}
    state = tx.init(params)
    assert state.mu["wte"].dtype == jnp.bfloat16 and state.nu["wte"].dtype == jnp.bfloat16
    for g in grads:
        u, state = tx.update({"wte": jnp.asarray(g)}, state, params)
        assert u["wte"].dtype == jnp.float32  # fp32 update; apply_updates casts back to bf16
        params = optax.apply_updates(params, u)
    assert params["wte"].dtype == jnp.bfloat16
    p_ref, m_ref, v_ref = np_adamw_bf16(p0, grads, 0.3, 0.8, 0.995, 1e-10, 0.001)
    ours = np.asarray(params["wte"]).astype(np.float32)
    # identical up to an occasional 1-ulp rounding tie (p + (p_new - p) in fp32 before the bf16 cast)
    ulp = np.abs(p_ref.astype(np.float32)) * 2.0**-7
    assert np.all(np.abs(ours - p_ref.astype(np.float32)) <= ulp + 1e-30)
    assert np.mean(ours == p_ref.astype(np.float32)) > 0.99
    np.testing.assert_array_equal(np.asarray(state.mu["wte"]).astype(np.float32), m_ref.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(state.nu["wte"]).astype(np.float32), v_ref.astype(np.float32))
    # the params really moved (the test is not vacuous)
    assert np.mean(ours != p0.astype(np.float32)) > 0.5


def test_adamw_fp32_state_option():
    tx = optim.adamw(0.1, 0.8, 0.995, 1e-10, 0.0, lambda it: 1.0, state_fp32=True)
    st = tx.init({"wte": jnp.zeros((4, 2), jnp.bfloat16)})
    assert st.mu["wte"].dtype == jnp.float32 and st.nu["wte"].dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Schedules


def test_lr_multiplier_values():
    cfg = OptimConfig(num_iterations=2000, model_dim=768)  # warmup 40, W = 1300, warmdown from 700
    f = lambda it: float(lr_multiplier(cfg, it))
    assert f(0) == pytest.approx(1 / 40) and f(19) == pytest.approx(0.5) and f(39) == pytest.approx(1.0)
    assert f(40) == 1.0 and f(700) == 1.0
    p = (2000 - 701) / 1300
    assert f(701) == pytest.approx(p + (1 - p) * 0.05, rel=1e-6)
    assert f(1350) == pytest.approx(0.5 + 0.5 * 0.05, rel=1e-6)
    assert f(2000) == pytest.approx(0.05, rel=1e-6)
    cfg2 = OptimConfig(num_iterations=10, model_dim=768, warmup_steps=0, warmdown_ratio=0.0)
    assert all(float(lr_multiplier(cfg2, i)) == 1.0 for i in range(11))


def test_muon_momentum_values():
    cfg = OptimConfig(num_iterations=2000, model_dim=768)
    f = lambda it: float(muon_momentum(cfg, it))
    assert f(0) == pytest.approx(0.85) and f(200) == pytest.approx(0.91)
    assert f(399) == pytest.approx(0.85 + 0.12 * 399 / 400)
    assert f(400) == pytest.approx(0.97) and f(700) == pytest.approx(0.97)
    assert f(1350) == pytest.approx(0.935) and f(2000) == pytest.approx(0.90)
    # short run: warmdown starts at 350 < 400; the warmup branch wins until 400, then the warmdown line
    short = OptimConfig(num_iterations=1000, model_dim=768)
    assert float(muon_momentum(short, 399)) == pytest.approx(0.85 + 0.12 * 399 / 400)
    assert float(muon_momentum(short, 400)) == pytest.approx(0.97 - 0.07 * 50 / 650)


def test_muon_weight_decay_cosine():
    cfg = OptimConfig(num_iterations=5568, model_dim=1536, weight_decay_scaled=0.0597)
    assert float(muon_weight_decay(cfg, 0)) == pytest.approx(0.0597)
    assert float(muon_weight_decay(cfg, 2784)) == pytest.approx(0.0597 / 2, rel=1e-5)
    expect = 0.0597 * 0.5 * (1 + math.cos(math.pi / 4))
    assert float(muon_weight_decay(cfg, 5568 // 4)) == pytest.approx(expect, rel=1e-5)
    assert abs(float(muon_weight_decay(cfg, 5568))) < 1e-9
    assert OptimConfig(num_iterations=9, model_dim=8).effective_weight_decay == 0.28  # unscaled fallback
    hp = current_hyperparams(cfg, 100)
    assert set(hp) == {"lrm", "muon_momentum", "muon_weight_decay"} and all(isinstance(v, float) for v in hp.values())
    assert hp["lrm"] == 1.0 and hp["muon_momentum"] == pytest.approx(0.88)


def test_schedules_drive_the_jitted_optimizer():
    # lr multiplier inside the chain: during warmup, the AdamW step size follows (it+1)/warmup exactly. With a
    # constant gradient Adam's normalised direction is ±1 per element, so |Δp| = lr · lrm(it) (wd = 0 group).
    cfg = OptimConfig(num_iterations=100, model_dim=8, warmup_steps=4, scalar_lr=1.0, batch_lr_scale=1.0)
    params = {"x0_lambdas": jnp.ones((3,), jnp.float32)}
    tx = build_optimizer(params, cfg)
    state = tx.init(params)
    upd = jax.jit(tx.update)
    g = {"x0_lambdas": jnp.asarray([1.0, -2.0, 0.5])}
    for it in range(5):
        u, state = upd(g, state, params)
        np.testing.assert_allclose(np.abs(np.asarray(u["x0_lambdas"])), 1.0 * float(lr_multiplier(cfg, it)), rtol=1e-5)
        params = optax.apply_updates(params, u)
    # an override schedule (e.g. RL's 1 - it/N) replaces it
    tx = build_optimizer(params, cfg, lr_schedule=lambda it: 1.0 - it / 10)
    state = tx.init(params)
    for it in range(3):
        u, state = jax.jit(tx.update)(g, state, params)
        np.testing.assert_allclose(np.abs(np.asarray(u["x0_lambdas"])), 1.0 - it / 10, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Group table


def reference_tree(D=1536, L=2, Vp=64, H=12, K=12, hd=128, NV=1, struct=True):
    """Full reference-shaped parameter tree (ShapeDtypeStructs unless struct=False)."""
    shapes = {
        "wte": ((Vp, D), jnp.bfloat16), "lm_head": ((D, Vp), jnp.float32),
        "blocks": {"attn": {"wq": ((L, D, H * hd), jnp.float32), "wk": ((L, D, K * hd), jnp.float32),
                            "wv": ((L, D, K * hd), jnp.float32), "wo": ((L, H * hd, D), jnp.float32)},
                   "mlp": {"w_fc": ((L, D, 4 * D), jnp.float32), "w_proj": ((L, 4 * D, D), jnp.float32)}},
        "value_embeds": ((NV, Vp, K * hd), jnp.bfloat16), "ve_gate": ((NV, 12, K), jnp.float32),
        "resid_lambdas": ((L,), jnp.float32), "x0_lambdas": ((L,), jnp.float32), "smear_gate": ((24, 1), jnp.float32),
        "smear_lambda": ((), jnp.float32), "backout_lambda": ((), jnp.float32),
    }
    is_spec = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)
    if struct:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(*s), shapes, is_leaf=is_spec)
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s[0]) * 0.1, s[1]), shapes, is_leaf=is_spec)


def test_group_table_d24_like_lrs():
    tree = reference_tree()
    labels = param_groups(tree)
    assert labels["wte"] == "wte" and labels["lm_head"] == "lm_head" and labels["value_embeds"] == "value_embeds"
    assert labels["ve_gate"] == "muon" and labels["resid_lambdas"] == "resid_lambdas"
    assert labels["x0_lambdas"] == "x0_lambdas"
    assert {labels[k] for k in ("smear_gate", "smear_lambda", "backout_lambda")} == {"fixed"}
    assert set(jax.tree.leaves(labels["blocks"])) == {"muon"}

    cfg = OptimConfig(num_iterations=5568, model_dim=1536, batch_lr_scale=math.sqrt(2))
    lrs = param_lrs(tree, cfg)
    approx = lambda x: pytest.approx(x, rel=2e-3)
    assert lrs["lm_head"] == approx(0.008) and lrs["wte"] == approx(0.3) and lrs["value_embeds"] == approx(0.15)
    assert lrs["resid_lambdas"] == approx(0.00707) and lrs["x0_lambdas"] == approx(0.707)
    assert lrs["smear_gate"] == lrs["smear_lambda"] == lrs["backout_lambda"] == 0.2
    for k in ("wq", "wk", "wv", "wo"):
        assert lrs["blocks"]["attn"][k] == approx(0.0283)
    assert lrs["blocks"]["mlp"]["w_proj"] == approx(0.0283)
    assert lrs["blocks"]["mlp"]["w_fc"] == approx(0.0566)  # c_fc (4D, D) in torch is tall: x2
    assert lrs["ve_gate"] == approx(0.0283)  # torch (K, 12) with K=12: square, no boost
    # a tall-in-torch ve_gate (K=13 > 12, d26-like) gets sqrt(13/12)
    ve13 = param_lrs({"ve_gate": jax.ShapeDtypeStruct((1, 12, 13), jnp.float32)}, cfg)["ve_gate"]
    assert ve13 == approx(0.0283 * math.sqrt(13 / 12))
    settings = optim.group_settings(cfg)
    assert (settings["lm_head"].b1, settings["lm_head"].b2, settings["lm_head"].wd) == (0.8, 0.96, 0.01)
    assert (settings["wte"].b2, settings["wte"].wd) == (0.995, 0.001)
    assert (settings["x0_lambdas"].b1, settings["resid_lambdas"].wd) == (0.96, 0.05)
    assert all(s.eps == 1e-10 for s in settings.values() if isinstance(s, optim.AdamWGroup))


def test_group_table_errors_and_classic_tree():
    with pytest.raises(ValueError, match="matches no optimizer group"):
        param_groups({"wte": jnp.zeros((4, 2)), "norm_scale": jnp.zeros((2,))})
    with pytest.raises(ValueError, match="expects 3"):
        group_of("blocks/attn/wq", ndim=2)  # unstacked block matrix: layout mistake
    classic = {k: v for k, v in reference_tree(D=8).items() if k in ("wte", "lm_head", "blocks")}
    assert set(jax.tree.leaves(param_groups(classic))) == {"wte", "lm_head", "muon"}
    with pytest.raises(ValueError, match="model_dim"):
        build_optimizer(classic, OptimConfig(num_iterations=10, model_dim=16))
    with pytest.raises(ValueError, match="num_iterations"):
        OptimConfig(num_iterations=0, model_dim=8)
    with pytest.raises(ValueError, match="muon_ortho_dtype"):
        OptimConfig(num_iterations=1, model_dim=8, muon_ortho_dtype="float16")


# ----------------------------------------------------------------------------------------------
# Scaling rules (scripts/base_train.py in nanochat; worked values)

V = 32768


def scaling_params(depth):
    """transformer matrices (12·C² per layer + ve_gate 12·H per VE layer) + lm_head, current nanochat's sizing
    (scripts/base_train.py, `build_model_meta`)."""
    C = math.ceil(depth * 64 / 128) * 128
    H = C // 128
    n_ve = sum(1 for i in range(depth) if i % 2 == (depth - 1) % 2)
    return 12 * C * C * depth + n_ve * 12 * H + V * C


def test_scaling_params_formula_matches_table():
    assert scaling_params(12) == 110_100_912 and scaling_params(24) == 729_810_624


@pytest.mark.parametrize("depth,B,wd", [(12, 524_288, 0.28), (16, 524_288, 0.131), (20, 1_048_576, 0.100),
                                         (24, 1_048_576, 0.0597), (26, 1_048_576, 0.0475), (32, 2_097_152, 0.0368)])
def test_auto_batch_and_weight_decay(depth, B, wd):
    ratio = 12
    d_ref = ratio * scaling_params(12)
    tokens = optim.target_tokens(ratio, scaling_params(depth))
    assert auto_batch_size(tokens, d_ref) == B
    assert scaled_weight_decay(B, tokens, d_ref) == pytest.approx(wd, abs=6e-4)


def test_log_table_batch_sizes():
    d_ref = 12 * scaling_params(12)
    got = {d: auto_batch_size(optim.target_tokens(12, scaling_params(d)), d_ref) for d in (8, 10, 16, 18, 26, 32)}
    assert got == {8: 2**18, 10: 2**19, 16: 2**19, 18: 2**20, 26: 2**20, 32: 2**21}


def test_speedrun_d24_horizon():
    ratio = 8
    d_ref = ratio * scaling_params(12)
    tokens = optim.target_tokens(ratio, scaling_params(24))
    B = auto_batch_size(tokens, d_ref)
    assert B == 1_048_576 and batch_lr_scale(B) == pytest.approx(math.sqrt(2))
    assert scaled_weight_decay(B, tokens, d_ref) == pytest.approx(0.0597, abs=1e-4)  # ratio cancels in D_ref/D
    n = horizon(total_batch_size=B, target_param_data_ratio=ratio, scaling_params=scaling_params(24))
    assert n == 5568 and n * B == 5_838_471_168
    assert horizon(total_batch_size=B, target_param_data_ratio=12, scaling_params=scaling_params(24)) == 8352
    # precedence: --num-iterations, then --target-flops, then the ratio
    assert horizon(total_batch_size=B, num_iterations=77, target_flops=1e20, scaling_params=1) == 77
    assert horizon(total_batch_size=B, target_flops=2.788e19, flops_per_token=4.775e9, scaling_params=1) == \
        round(2.788e19 / (4.775e9 * B)) == 5568
    with pytest.raises(ValueError, match="num-iterations"):
        horizon(total_batch_size=B, target_param_data_ratio=-1)
    assert batch_lr_scale(2**19) == 1.0


# ----------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("classic", [False, True])
def test_build_optimizer_jit_reduces_quadratic(classic):
    # Every leaf pulled towards its own random target; lrs scaled down (init_lr_frac) so no group overshoots
    # (with C=16 the (C/768)^-0.5 factor makes embedding lrs ~2). Each leaf's loss must go down.
    params = reference_tree(D=16, L=2, Vp=32, H=2, K=2, hd=8, NV=1, struct=False)
    rng = np.random.default_rng(3)
    targets = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.5, jnp.float32), params)
    leaf_losses = lambda p: jax.tree.map(lambda a, t: jnp.sum((a.astype(jnp.float32) - t) ** 2), p, targets)
    loss_fn = lambda p: sum(jax.tree.leaves(leaf_losses(p)))

    cfg = OptimConfig(num_iterations=50, model_dim=16, warmup_steps=0, muon_classic=classic, init_lr_frac=0.02,
                      matrix_lr=1.0)
    tx = build_optimizer(params, cfg)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    before = leaf_losses(params)
    for _ in range(3):
        new_params, state, loss = step(params, state)
        assert jax.tree.map(lambda a: a.dtype, new_params) == jax.tree.map(lambda a: a.dtype, params)
        params = new_params
    after = leaf_losses(params)
    decreased = jax.tree.map(lambda a, b: bool(b < a), before, after)
    assert all(jax.tree.leaves(decreased)), decreased
    muon_state = state.inner_states["muon"].inner_state
    assert int(muon_state.count) == 3
    assert muon_state.mu["blocks"]["mlp"]["w_fc"].dtype == jnp.float32
    # torch c_fc (4D, D) is tall: one second moment per output row -> ours (L, 1, out)
    assert muon_state.nu["blocks"]["mlp"]["w_fc"].shape == (2, 1, 64)
    # torch c_proj (D, 4D) is wide: one per input column -> ours (L, in, 1)
    assert muon_state.nu["blocks"]["mlp"]["w_proj"].shape == (2, 64, 1)


# ----------------------------------------------------------------------------------------------
# bf16 orthogonalisers against a per-op-rounded NumPy emulation (issue #17, defect 1)

_BF16 = ml_dtypes.bfloat16


def _r(x):
    """Round to bf16 (one rounding of an fp32 result)."""
    return np.asarray(x, np.float32).astype(_BF16)


def _f(x):
    return np.asarray(x).astype(np.float32)


def emulate_bf16_orthogonalize(g, classic, coeff=lambda c: c):
    """Eager PyTorch's bf16 iteration on a (rows=out, cols=in) matrix: every op result rounded to bf16, each
    Python scalar used exactly (fp32 op-math), matmuls accumulated in fp32. Current (nanochat/optim.py
    `muon_step_fused`): B = b*A + c*(A@A), X@B for tall, B@X for wide. Classic (nanochat/muon.py): a tall X is
    transposed to wide, and `c * A @ A` is (c*A)@A. `coeff` maps each scalar (to emulate a rounding bug)."""
    mm = lambda a, b: _r(_f(a) @ _f(b))  # noqa: E731
    sc = lambda s, x: _r(_f(x) * np.float32(coeff(s)))  # noqa: E731
    add = lambda u, v: _r(_f(u) + _f(v))  # noqa: E731
    X = _r(g)
    tall = X.shape[-2] > X.shape[-1]
    if classic and tall:
        X = X.T
    n = _r(np.sqrt((_f(X).astype(np.float64) ** 2).sum()))
    d = _r(_f(n) + np.float32(1e-7)) if classic else _r(_f(sc(1.01, n)) + np.float32(1e-6))
    X = _r(_f(X) / _f(d))
    coeffs = [NEWTON_SCHULZ_COEFFS] * 5 if classic else POLAR_EXPRESS_COEFFS
    for a, b, c in coeffs:
        if classic:
            A = mm(X, X.T)
            X = add(sc(a, X), mm(add(sc(b, A), mm(sc(c, A), A)), X))
        elif tall:
            A = mm(X.T, X)
            X = add(sc(a, X), mm(X, add(sc(b, A), sc(c, mm(A, A)))))
        else:
            A = mm(X, X.T)
            X = add(sc(a, X), mm(add(sc(b, A), sc(c, mm(A, A))), X))
    if classic and tall:
        X = X.T
    return _f(X)


@pytest.mark.parametrize("classic", [False, True])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_bf16_orthogonalizers_match_per_op_rounded_emulation(shape, classic):
    """Ours equals the emulation with the exact coefficients (bf16 result for bf16 result), while rounding the
    coefficients to bf16 first (what `b * A` did with a bf16 A in JAX) changes most entries."""
    g = np.random.default_rng(sum(shape) + classic).standard_normal(shape).astype(np.float32)  # (out, in)
    ours = np.asarray(orthogonalize(jnp.asarray(g.T), classic=classic).astype(jnp.float32)).T
    want = emulate_bf16_orthogonalize(g, classic)
    assert np.mean(ours != want) <= 0.01, f"{np.mean(ours != want):.1%} of entries differ"
    rounded = emulate_bf16_orthogonalize(g, classic, coeff=lambda c: float(_r(c)))
    assert np.mean(rounded != want) > 0.5  # the emulation tells the two apart


def test_scale_keeps_the_scalar_exact():
    A = jnp.ones((2,), jnp.bfloat16) * 3
    assert float(optim.scale(-4.7750, A)[0]) == float(_r(3 * -4.7750))  # -14.3125, not 3 * -4.78125
    assert float(optim.shift(jnp.asarray([1.0], jnp.bfloat16), 1e-7)[0]) == 1.0


# ----------------------------------------------------------------------------------------------
# Classic AdamW groups, schedule options, grad clipping (defects 3 and 4)

def test_classic_adamw_groups_and_preset():
    cfg = OptimConfig.classic(num_iterations=100, model_dim=768)
    groups = optim.group_settings(cfg)
    for name in ("lm_head", "wte"):
        g = groups[name]
        assert (g.b1, g.b2, g.eps, g.wd, g.classic) == (0.8, 0.95, 1e-10, 0.0, True)
    assert groups["lm_head"].lr == pytest.approx(0.004) and groups["wte"].lr == pytest.approx(0.2)
    assert cfg.muon_classic and cfg.grad_clip == 1.0 and cfg.warmup_steps == 0 and cfg.final_lr_frac == 0.0
    # classic base_train: momentum 0.85 -> 0.95 over 300 steps, then constant; lr flat until the last 20%
    assert float(muon_momentum(cfg, 150)) == pytest.approx(0.90)
    assert float(muon_momentum(cfg, 300)) == pytest.approx(0.95)
    assert float(muon_momentum(OptimConfig.classic(num_iterations=1000, model_dim=768), 990)) == pytest.approx(0.95)
    assert float(lr_multiplier(cfg, 0)) == 1.0 and float(lr_multiplier(cfg, 80)) == 1.0
    assert float(lr_multiplier(cfg, 90)) == pytest.approx(0.5)
    cur = optim.group_settings(OptimConfig(num_iterations=100, model_dim=768))
    assert (cur["lm_head"].b2, cur["lm_head"].wd, cur["lm_head"].classic) == (0.96, 0.01, False)


def test_classic_adamw_update_formula():
    """Classic DistAdamW (nanochat/adamw.py): p·(1 - lr·wd) - lr·sqrt(1-b2^t)/(1-b1^t) · m / (sqrt(v) + eps), two
    steps in float64."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((5, 3)).astype(np.float32)
    gs = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(2)]
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.95, 1e-3, 0.1  # a large eps, so its placement matters
    tx = optim.adamw(lr, b1, b2, eps, wd, lambda it: jnp.float32(1.0), classic=True)
    p, state = jnp.asarray(p0), None
    state = tx.init(p)
    want, m, v = p0.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(gs, 1):
        u, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, u)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g.astype(np.float64) ** 2
        want = want * (1 - lr * wd) - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    np.testing.assert_allclose(np.asarray(p), want, rtol=1e-5, atol=1e-6)


def test_constant_schedule_options():
    cfg = OptimConfig(num_iterations=100, model_dim=64, warmup_steps=10, lr_schedule="constant",
                      muon_momentum_schedule="constant", muon_momentum_peak=0.95, weight_decay=0.2,
                      weight_decay_schedule="constant")
    for it in (0, 5, 50, 99, 100):
        h = current_hyperparams(cfg, it)
        assert h["lrm"] == 1.0 and h["muon_momentum"] == pytest.approx(0.95)
        assert h["muon_weight_decay"] == pytest.approx(0.2)
        assert float(optim.muon_momentum_complement(cfg, it)) == pytest.approx(0.05)
    ref = OptimConfig(num_iterations=100, model_dim=64)
    for it in (0, 100, 300, 600):
        assert float(optim.muon_momentum_complement(ref, it)) == pytest.approx(1 - float(muon_momentum(ref, it)))
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        OptimConfig(num_iterations=1, model_dim=8, lr_schedule="cosine")
    with pytest.raises(ValueError, match="adamw_style must be one of"):
        OptimConfig(num_iterations=1, model_dim=8, adamw_style="oct")


def test_grad_clip_like_torch():
    params = {"wte": jnp.zeros((4, 8)), "lm_head": jnp.zeros((8, 4))}
    grads = {"wte": jnp.full((4, 8), 1.0), "lm_head": jnp.full((8, 4), 1.0)}  # global norm 8
    clip = optim.clip_grad_norm(1.0)
    out, _ = clip.update(grads, clip.init(params))
    assert float(out["wte"][0, 0]) == pytest.approx(1.0 / (8 + 1e-6) * 1.0)
    small = jax.tree.map(lambda g: g * 1e-3, grads)
    out, _ = clip.update(small, clip.init(params))
    jax.tree.map(np.testing.assert_array_equal, out, small)  # below the limit: untouched
    tx = build_optimizer(params, OptimConfig(num_iterations=4, model_dim=8, grad_clip=1.0))
    tx.update(grads, tx.init(params), params)
