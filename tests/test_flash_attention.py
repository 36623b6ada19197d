"""Tests for kernels/flash_attention.py (Pallas interpret mode on CPU).

Checked against an independent float64 NumPy attention (explicit mask, softmax and hand-derived gradients):
outputs and dq/dk/dv for several shapes (ragged lengths, GQA, head_dim 64/128 and a non power of two, causal
or not, windows), fp32 and bf16. Block skipping is checked three ways: the block-range helpers against a
brute-force mask, the kernels' own visit counters against the same brute force, and NaN-poisoned keys/queries
that a kernel would pick up if it touched a block it should skip. Unwritten output blocks show up as NaN:
Pallas' interpreter allocates every output NaN-filled (a canary test pins that down), and every test requires
finite results. Also: the Triton lowering for A100/H100 (ahead of time, on CPU), batch sharding under an
8-device mesh, the GPT model with attn_backend="pallas" vs "xla", and the benchmark script's CPU smoke run.
"""

import math
import os
import subprocess
import sys
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from kernels import flash_attention as fa
from kernels.flash_attention import flash_attention, kv_block_range, q_block_range

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_BLOCKS = dict(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16, block_k_dq=16)


# ----------------------------------------------------------------------------------------------
# Independent float64 reference

def np_mask(T, S, causal, window):
    """(T, S) bool: query p sees key k (both from position 0)."""
    p, k = np.arange(T)[:, None], np.arange(S)[None, :]
    ok = np.ones((T, S), bool)
    if causal:
        ok &= k <= p
    if window is not None:
        ok &= k >= p - window
    return ok


def np_attention(q, k, v, do, *, causal, window, scale=None):
    """Output and (dq, dk, dv) in float64. Rows that see no key give 0 (and zero gradients)."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kk, vv = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # kv head of query head h is h // G
    mask = np_mask(T, S, causal, window)
    s = np.where(mask, np.einsum("bthd,bshd->bhts", q, kk) * scale, -np.inf)
    row_max = s.max(-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(row_max), row_max, 0.0))
    den = e.sum(-1, keepdims=True)
    P = e / np.where(den > 0, den, 1.0)
    o = np.einsum("bhts,bshd->bthd", P, vv)
    dP = np.einsum("bthd,bshd->bhts", do, vv)
    dS = P * (dP - (P * dP).sum(-1, keepdims=True))  # softmax Jacobian
    dq = scale * np.einsum("bhts,bshd->bthd", dS, kk)
    dk = scale * np.einsum("bhts,bthd->bshd", dS, q).reshape(B, S, K, G, D).sum(3)
    dv = np.einsum("bhts,bthd->bshd", P, do).reshape(B, S, K, G, D).sum(3)
    return o, dq, dk, dv


def rel_err(got, want):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


def random_inputs(rng, B, T, S, H, K, D, dtype):
    """Fresh normal q, k, v, do, rounded to dtype; returns (jax arrays, the same values in float64)."""
    xs = [rng.standard_normal(shape) for shape in ((B, T, H, D), (B, S, K, D), (B, S, K, D), (B, T, H, D))]
    js = [jnp.asarray(x, dtype) for x in xs]
    return js, [np.asarray(j.astype(jnp.float32), np.float64) for j in js]


def prepare(q, k, v, **kw):
    """fa._prepare with flash_attention's own defaults for everything not given."""
    import inspect
    defaults = {n: p.default for n, p in inspect.signature(flash_attention).parameters.items()
                if p.kind == p.KEYWORD_ONLY}
    return fa._prepare(q, k, v, **{**defaults, **kw})


def run_vjp(q, k, v, do, **kw):
    o, vjp = jax.vjp(partial(flash_attention, interpret=True, **kw), q, k, v)
    return (o, *vjp(do))


def check_against_reference(B, T, S, H, K, D, dtype, tol, seed, scale=None, **kw):
    rng = np.random.default_rng(seed)
    (q, k, v, do), ref_in = random_inputs(rng, B, T, S, H, K, D, dtype)
    got = run_vjp(q, k, v, do, scale=scale, **kw)
    want = np_attention(*ref_in, causal=kw["causal"], window=kw["window"], scale=scale)
    for name, g, w, x in zip(("o", "dq", "dk", "dv"), got, want, (q, q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, (name, g.shape, g.dtype)
        assert np.isfinite(np.asarray(g, np.float32)).all(), f"{name} has NaN/inf (an unwritten block?)"
        assert rel_err(g, w) <= tol, f"{name}: relative error {rel_err(g, w):.2e} > {tol}"


# ----------------------------------------------------------------------------------------------
# Correctness

FP32_CASES = [
    # B, T, S, H, K, D, causal, window, extra kwargs (block sizes, scale)
    (1, 40, 40, 2, 1, 64, True, None, SMALL_BLOCKS),                       # ragged tail, GQA 2:1
    (2, 48, 48, 4, 2, 64, True, 13, dict(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16,
                                         block_q_dq=16, block_k_dq=32)),   # mixed block sizes
    (1, 80, 80, 2, 2, 128, True, 16, SMALL_BLOCKS),                        # D=128, block-aligned window
    (1, 40, 40, 3, 1, 128, False, 9, SMALL_BLOCKS),                        # non-causal + left window, G=3
    (1, 33, 50, 2, 2, 64, False, None, dict(scale=0.3)),                   # T != S, default blocks (shrunk)
    (1, 37, 37, 2, 1, 48, True, 2, SMALL_BLOCKS),                          # head_dim 48 (padded)
]


@pytest.mark.parametrize("B,T,S,H,K,D,causal,window,extra", FP32_CASES)
def test_matches_float64_reference_fp32(B, T, S, H, K, D, causal, window, extra):
    check_against_reference(B, T, S, H, K, D, jnp.float32, 1e-5, seed=T * 7 + D, causal=causal, window=window,
                            **extra)


@pytest.mark.parametrize("B,T,H,K,D,window", [(1, 64, 4, 2, 64, 20), (2, 37, 2, 1, 128, None)])
def test_matches_float64_reference_bf16(B, T, H, K, D, window):
    check_against_reference(B, T, T, H, K, D, jnp.bfloat16, 2e-2, seed=T, causal=True, window=window,
                            **SMALL_BLOCKS)


# ----------------------------------------------------------------------------------------------
# Block skipping

def brute_force_blocks(visible, block_rows, block_cols, axis):
    """For each block along `axis` of the (rows, cols) mask: (the set of blocks on the other axis with at
    least one visible entry, the set with all entries visible)."""
    if axis == 1:
        visible, block_rows, block_cols = visible.T, block_cols, block_rows
    n_rows, n_cols = visible.shape
    out = []
    for r in range(n_rows // block_rows):
        rows = visible[r * block_rows:(r + 1) * block_rows]
        tiles = [rows[:, c * block_cols:(c + 1) * block_cols] for c in range(n_cols // block_cols)]
        out.append(({c for c, t in enumerate(tiles) if t.any()}, {c for c, t in enumerate(tiles) if t.all()}))
    return out


def padded_mask(Tp, Sp, S, causal, window):
    """Visibility over padded rows/cols: padded query rows are ordinary queries, padded keys are invisible."""
    m = np_mask(Tp, Sp, causal, window)
    m[:, S:] = False
    return m


@pytest.mark.parametrize("causal", [True, False])
def test_block_ranges_are_exactly_the_visible_blocks(causal):
    """The kernels' loop bounds: [lo, hi) is exactly the set of blocks holding a visible entry, and the
    unmasked part [full_lo, full_hi) exactly the fully visible blocks (so skipping is tight and safe)."""
    rng = np.random.default_rng(1 + causal)
    for _ in range(60):
        bq, bk = (int(x) for x in rng.choice([16, 32, 64], 2))
        T, S = (int(x) for x in rng.integers(1, 200, 2))
        window = [None, 0, 1, int(rng.integers(2, 80)), 150][int(rng.integers(0, 5))]
        Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
        vis = padded_mask(Tp, Sp, S, causal, window)
        for i, (any_vis, all_vis) in enumerate(brute_force_blocks(vis, bq, bk, axis=0)):
            lo, full_lo, full_hi, hi = kv_block_range(i, block_q=bq, block_k=bk, kv_len=S, causal=causal,
                                                      window=window)
            assert set(range(lo, hi)) == any_vis, (bq, bk, T, S, window, i)
            assert set(range(full_lo, full_hi)) == all_vis, (bq, bk, T, S, window, i)
            assert lo <= full_lo <= full_hi <= hi
        for j, (any_vis, all_vis) in enumerate(brute_force_blocks(vis, bq, bk, axis=1)):
            lo, full_lo, full_hi, hi = q_block_range(j, block_q=bq, block_k=bk, q_len=Tp, kv_len=S,
                                                     causal=causal, window=window)
            assert set(range(lo, hi)) == any_vis, (bq, bk, T, S, window, j)
            assert set(range(full_lo, full_hi)) == all_vis, (bq, bk, T, S, window, j)
            assert lo <= full_lo <= full_hi <= hi


def test_kernels_visit_only_visible_blocks():
    """The kernels' own loop counters (debug outputs) equal the brute-force count of blocks holding a
    visible entry, in the forward, dK/dV and dQ kernels, and are well below the full count."""
    B, T, H, K, D, window = 1, 100, 4, 2, 64, 24
    blocks = dict(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16, block_q_dq=16, block_k_dq=16)
    (q, k, v, do), _ = random_inputs(np.random.default_rng(3), B, T, T, H, K, D, jnp.float32)
    cfg, Tp, Sp, Dp = prepare(q, k, v, causal=True, window=window, interpret=True, **blocks)
    q, do = fa._pad(q, Tp, Dp), fa._pad(do, Tp, Dp)
    k, v = fa._pad(k, Sp, Dp), fa._pad(v, Sp, Dp)
    o, lse, n_fwd = fa._fwd_call(q, k, v, cfg, count_visits=True)
    dq, dk, dv, n_dkdv, n_dq = fa._bwd_call(q, k, v, o, lse, do, cfg, count_visits=True)
    for x in (o, lse, dq, dk, dv):  # every output element written, padding included
        assert np.isfinite(np.asarray(x)).all()

    vis = padded_mask(Tp, Sp, T, True, window)
    G = H // K
    want_fwd = [len(a) for a, _ in brute_force_blocks(vis, cfg.block_q, cfg.block_k, axis=0)]
    want_dq = [len(a) for a, _ in brute_force_blocks(vis, cfg.block_q_dq, cfg.block_k_dq, axis=0)]
    want_dkdv = [G * len(a) for a, _ in brute_force_blocks(vis, cfg.block_q_dkv, cfg.block_k_dkv, axis=1)]
    np.testing.assert_array_equal(np.asarray(n_fwd), np.broadcast_to(want_fwd, (B, H, len(want_fwd))))
    np.testing.assert_array_equal(np.asarray(n_dq), np.broadcast_to(want_dq, (B, H, len(want_dq))))
    np.testing.assert_array_equal(np.asarray(n_dkdv), np.broadcast_to(want_dkdv, (B, K, len(want_dkdv))))
    # Causal + window 24 over 112 padded positions: far fewer blocks than the full square.
    assert sum(want_fwd) < 0.5 * (Tp // cfg.block_q) * (Sp // cfg.block_k)


def test_never_touches_invisible_keys_or_queries():
    """NaN in inputs no visible pair uses must not leak: a kernel that loaded such a block, even masked,
    would multiply the NaN by a zero probability and produce NaN."""
    rng = np.random.default_rng(4)
    # Causal with T < S: keys from 48 on (three 16-blocks) are seen by no query.
    (q, k, v, do), (qn, kn, vn, don) = random_inputs(rng, 1, 40, 96, 2, 1, 64, jnp.float32)
    k, v = k.at[:, 48:].set(jnp.nan), v.at[:, 48:].set(jnp.nan)
    o, dq, dk, dv = run_vjp(q, k, v, do, causal=True, window=None, **SMALL_BLOCKS)
    want = np_attention(qn, kn, vn, don, causal=True, window=None)
    for g, w in zip((o, dq, dk, dv), want):
        assert np.isfinite(np.asarray(g)).all()
        assert rel_err(g, w) <= 1e-5
    # Causal + window 8 with T > S: queries from 40 + 8 + 1 on see no key at all, so their rows of q and
    # dO are never read by the dK/dV kernel; their outputs and dq are 0.
    (q, k, v, do), (qn, kn, vn, don) = random_inputs(rng, 1, 96, 40, 2, 2, 64, jnp.float32)
    q, do = q.at[:, 64:].set(jnp.nan), do.at[:, 64:].set(jnp.nan)
    o, dq, dk, dv = run_vjp(q, k, v, do, causal=True, window=8, **SMALL_BLOCKS)
    want = np_attention(qn, kn, vn, don, causal=True, window=8)
    assert np.all(np.asarray(o[:, 49:]) == 0) and np.all(np.asarray(dq[:, 49:]) == 0)
    for g, w in zip((o[:, :64], dq[:, :64], dk, dv), (want[0][:, :64], want[1][:, :64], *want[2:])):
        assert np.isfinite(np.asarray(g)).all()
        assert rel_err(g, w) <= 1e-5


def test_interpreter_poisons_unwritten_output_blocks():
    """The premise behind the finiteness checks above: in interpret mode a block the kernel never writes
    comes back NaN (not zeros that could pass for a correct masked result)."""
    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...] * 2.0

    x = jnp.ones((32, 16), jnp.float32)
    out = pl.pallas_call(kernel, grid=(2,), in_specs=[pl.BlockSpec((16, 16), lambda i: (i, 0))],
                         out_specs=pl.BlockSpec((16, 16), lambda i: (i, 0)),
                         out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)
    assert np.all(np.asarray(out[:16]) == 2.0) and np.all(np.isnan(np.asarray(out[16:])))


# ----------------------------------------------------------------------------------------------
# API details

def test_window_at_least_t_minus_1_is_plain_causal():
    (q, k, v, _), _ = random_inputs(np.random.default_rng(6), 1, 20, 20, 2, 1, 64, jnp.float32)
    run = partial(flash_attention, q, k, v, causal=True, interpret=True)
    np.testing.assert_array_equal(np.asarray(run(window=19)), np.asarray(run(window=None)))
    assert prepare(q, k, v, causal=True, window=19)[0].window is None


@pytest.mark.parametrize("kwargs,shapes,match", [
    (dict(block_q=48), None, "block_q must be a power of two"),
    (dict(block_k_dq=8), None, "block_k_dq must be a power of two >= 16"),
    (dict(window=-1), None, "window must be None or a Python int >= 0"),
    (dict(window=2.5), None, "window must be None or a Python int >= 0"),
    ({}, ((1, 8, 3, 16), (1, 8, 2, 16)), "must divide the number of query heads"),
    ({}, ((1, 8, 2, 16), (1, 8, 2, 32)), "k and v must both be"),
    ({}, ((8, 2, 16), (1, 8, 2, 16)), r"q must be \(B, T, H, D\)"),
])
def test_validation_errors(kwargs, shapes, match):
    qs, ks = shapes or ((1, 8, 2, 16), (1, 8, 2, 16))
    with pytest.raises(ValueError, match=match):
        flash_attention(jnp.ones(qs), jnp.ones(ks), jnp.ones(ks), interpret=True, **kwargs)
    with pytest.raises(ValueError, match="share one dtype"):
        flash_attention(jnp.ones((1, 8, 2, 16)), jnp.ones((1, 8, 2, 16), jnp.bfloat16),
                        jnp.ones((1, 8, 2, 16)), interpret=True)


def test_attention_flops_counts_visible_pairs():
    B, T, H, D = 2, 50, 3, 8
    for causal, window in [(False, None), (True, None), (True, 7), (False, 7)]:
        pairs = np_mask(T, T, causal, window).sum()
        assert fa.attention_flops(B, T, T, H, D, causal=causal, window=window) == 4 * B * H * D * pairs
    # Causal at large T is half the square (plus the diagonal).
    assert fa.attention_flops(1, 1024, 1024, 1, 1, causal=True, window=None) == 4 * 1024 * 1025 / 2


def test_lowers_to_triton_for_a100_and_h100():
    """Ahead-of-time lowering of the three kernels through Pallas' Triton backend for abstract A100/H100
    devices, bf16 D=128 with GQA 3:1, a window and a ragged T: catches GPU-illegal constructs (non power of
    two tiles, primitives without a Triton rule) without a GPU. Each Triton module must pass MLIR
    verification. (The kernels are lowered directly: inside flash_attention they sit in custom_partitioning,
    which lowers them only at XLA compile time. Compiling the Triton IR to PTX, and running it, needs a GPU.)"""
    from jax._src.pallas.triton import pallas_call_registration as registration
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    verified = []
    lower_module = registration.lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower_module(*args, **kwargs)
        verified.append(result.module.operation.verify())
        return result

    B, T, H, K, D = 2, 200, 6, 2, 128
    q, kv = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16)
    cfg, Tp, Sp, Dp = prepare(q, kv, kv, causal=True, window=64)  # default (GPU) block sizes
    qp, kvp = jax.ShapeDtypeStruct((B, Tp, H, Dp), q.dtype), jax.ShapeDtypeStruct((B, Sp, K, Dp), q.dtype)

    def fwd_bwd(q, k, v, do):
        o, lse = fa._fwd_call(q, k, v, cfg)
        return fa._bwd_call(q, k, v, o, lse, do, cfg)

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "Pallas Triton backend is deprecated"
        mp.setattr(registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
        for kind in ("NVIDIA A100", "NVIDIA H100"):
            device = AbstractDevice(device_kind=kind, num_cores=None, platform="cuda")
            mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Explicit,), abstract_device=device)
            with jax.sharding.use_abstract_mesh(mesh):
                text = jax.jit(fwd_bwd).trace(qp, kvp, kvp, qp).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count("__gpu$xla.gpu.triton") == 3, kind  # forward, dK/dV, dQ
    assert verified == [True] * 6


def test_batch_sharded_inputs_stay_sharded():
    """Under a data-parallel mesh (8 CPU devices) the kernels run on each device's batch rows: outputs and
    gradients keep the batch sharding, nothing is all-gathered, and the values match the unsharded run."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from nanochat_jax import sharding

    mesh = sharding.make_mesh(8)
    batch = NamedSharding(mesh, P(sharding.DATA))
    (q, k, v, do), _ = random_inputs(np.random.default_rng(8), 8, 24, 24, 2, 1, 64, jnp.float32)
    run = jax.jit(partial(run_vjp, causal=True, window=5, **SMALL_BLOCKS))
    want = run(q, k, v, do)
    args = [jax.device_put(x, batch) for x in (q, k, v, do)]
    got = run(*args)
    for g, w in zip(got, want):
        assert g.sharding.is_equivalent_to(batch, g.ndim), g.sharding
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    hlo = run.lower(*args).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" not in hlo
    # The forward alone (no vjp) takes the primal path of the custom_vjp.
    fwd = jax.jit(partial(flash_attention, causal=True, window=5, interpret=True, **SMALL_BLOCKS))
    o = fwd(*args[:3])
    assert o.sharding.is_equivalent_to(batch, o.ndim), o.sharding
    np.testing.assert_allclose(np.asarray(o), np.asarray(want[0]), rtol=1e-6, atol=1e-6)
    assert "all-gather" not in fwd.lower(*args[:3]).compile().as_text()


# ----------------------------------------------------------------------------------------------
# Integration

def test_gpt_pallas_backend_matches_xla():
    """Same loss, gradients and SGD trajectory with attn_backend='pallas' as with 'xla' (fp32, GQA, a short
    window layer and a full layer)."""
    from nanochat_jax import gpt

    cfg = gpt.GPTConfig.from_depth(2, max_seq_len=64, vocab_size=256, head_dim=64, n_kv_head=1,
                                   compute_dtype="float32", embed_dtype="float32", short_window=16)
    assert gpt.layer_windows(cfg) == (16, 64) and cfg.n_head == 2
    params = gpt.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(7)
    # Init zeroes the output projections (which would hide the attention gradients) and makes lm_head tiny.
    for group, name in (("attn", "wo"), ("mlp", "w_proj")):
        w = params["blocks"][group][name]
        params["blocks"][group][name] = jnp.asarray(rng.standard_normal(w.shape) / math.sqrt(w.shape[1]), w.dtype)
    params["lm_head"] = jnp.asarray(rng.standard_normal(params["lm_head"].shape) / math.sqrt(cfg.n_embd))
    idx = jnp.asarray(rng.integers(0, 256, (2, 64)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 256, (2, 64)), jnp.int32)

    def train(backend, steps=3, lr=0.05):
        c = gpt.GPTConfig(**{**cfg.to_dict(), "attn_backend": backend})
        grad_fn = jax.jit(jax.value_and_grad(lambda p: gpt.forward(p, idx, c, targets_BT=targets)))
        p, losses, first_grads = params, [], None
        for _ in range(steps):
            loss, grads = grad_fn(p)
            losses.append(float(loss))
            first_grads = grads if first_grads is None else first_grads
            p = jax.tree.map(lambda w, g: w - lr * g, p, grads)
        return np.array(losses), first_grads

    losses_x, grads_x = train("xla")
    losses_p, grads_p = train("pallas")
    np.testing.assert_allclose(losses_p, losses_x, rtol=2e-5)
    assert losses_x[-1] < losses_x[0]  # the steps did something
    for name in ("wq", "wk", "wv"):  # gradients really flow through the attention backward
        assert np.abs(np.asarray(grads_x["blocks"]["attn"][name])).max() > 1e-3
    # Per-leaf relative error, with a floor for leaves whose gradient is ~0 by construction (backout_lambda at
    # depth 2: the final RMSNorm cancels the scale it applies). Such a leaf holds only the fp32 rounding left over
    # from terms that cancel, a few ulps of the largest gradient whichever backend runs (2.6e-8 = 3.6e-7 × max with
    # jax 0.12.1 / numpy 2.5); the floor makes the tolerance 1e-6 × max, ~8 fp32 ulps.
    floor = 1e-2 * max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grads_x))
    flat_p = dict(jax.tree_util.tree_leaves_with_path(grads_p))
    for path, gx in jax.tree_util.tree_leaves_with_path(grads_x):
        gx, gp = np.asarray(gx), np.asarray(flat_p[path])
        assert np.abs(gp - gx).max() <= 1e-4 * max(np.abs(gx).max(), floor), jax.tree_util.keystr(path)


def run_bench(tmp_path, *flags):
    """Run kernels/bench_attention.py as a script in a fresh CPU process where importing grain or flask
    fails (the benchmark must not need them)."""
    script = os.path.join(REPO, "kernels", "bench_attention.py")
    code = ("import runpy, sys; sys.modules['grain'] = sys.modules['flask'] = None; "
            f"sys.argv = {[script, *flags]!r}; runpy.run_path({script!r}, run_name='__main__')")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # a subprocess end to end: ~30-50 s on a shared 2-core box
def test_bench_script_tiny_cpu_run(tmp_path):
    """The benchmark runs end to end on CPU (--tiny: small shapes, Pallas in interpret mode) and writes its
    markdown table atomically."""
    out = tmp_path / "bench.md"
    stdout = run_bench(tmp_path, "--tiny", f"--out={out}")
    table = out.read_text()
    assert "| pallas | 64 |" in table and "| xla | 64 |" in table and "fwd+bwd TFLOP/s" in table
    assert "cudnn: skipped" in stdout  # no GPU here
    assert table.strip() in stdout


@pytest.mark.slow
def test_bench_script_tiny_sweep(tmp_path):
    stdout = run_bench(tmp_path, "--tiny", "--sweep")
    assert "sweep fwd" in stdout and "sweep bwd" in stdout and "| pallas |" in stdout
