"""Tests for gpt.head_cross_entropy (the lm_head + softcap + cross-entropy fused, gradient taken in the forward
pass, chunked over positions): value and gradients w.r.t. the hidden states and the head weight against a
float64 NumPy reference, with and without the softcap, ignored targets (-1), both reductions, chunked or not,
and with the batch sharded over the simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from nanochat_jax import gpt


def np_head_loss(x, w, targets, softcap, reduction):
    """float64: the loss of softcap·tanh((x @ w)/softcap) with ignore index -1 and its gradients (hand-derived:
    dL/dlogits = softmax - onehot on valid rows, times 1 - tanh² through the cap)."""
    z = x @ w
    t = np.tanh(z / softcap) if softcap else None
    logits = softcap * t if softcap else z
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    valid = targets >= 0
    safe = np.maximum(targets, 0)
    nll = np.where(valid, lse - np.take_along_axis(logits, safe[..., None], -1)[..., 0], 0.0)
    dlogits = np.exp(logits - lse[..., None])
    np.put_along_axis(dlogits, safe[..., None], np.take_along_axis(dlogits, safe[..., None], -1) - 1.0, -1)
    dlogits *= valid[..., None]
    dz = dlogits * (1.0 - t * t) if softcap else dlogits
    scale = 1.0 if reduction == "sum" else 1.0 / max(valid.sum(), 1)
    dx = dz @ w.T * scale
    dw = np.einsum("btd,btv->dv", x, dz) * scale
    return nll.sum() * scale, dx, dw


def random_case(rng, B, T, D, V, ignore_frac=0.25):
    x = rng.standard_normal((B, T, D))
    w = rng.standard_normal((D, V)) * 2.0 / np.sqrt(D)  # logits of a few units: the cap and softmax both matter
    targets = rng.integers(0, V, (B, T))
    targets[rng.random((B, T)) < ignore_frac] = -1
    return x, w, targets


def check(x, w, targets, softcap, reduction, **jit_kw):
    want_loss, want_dx, want_dw = np_head_loss(x, w, targets, softcap, reduction)
    f = jax.jit(jax.value_and_grad(lambda x, w, t: gpt.head_cross_entropy(x, w, t, softcap, reduction), (0, 1)),
                **jit_kw)
    loss, (dx, dw) = f(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(targets, jnp.int32))
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-4, atol=2e-6 * np.abs(want_dx).max())
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-4, atol=2e-6 * np.abs(want_dw).max())
    # Without differentiation (the primal, chunked the same way) the value is the same.
    value = jax.jit(lambda x, w, t: gpt.head_cross_entropy(x, w, t, softcap, reduction))(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(targets, jnp.int32))
    np.testing.assert_allclose(float(value), want_loss, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("softcap", [15.0, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_positions", [None, 1, 4])  # None: one chunk
def test_matches_float64_reference(softcap, reduction, chunk_positions, monkeypatch):
    rng = np.random.default_rng()
    B, T, D, V = 3, 12, 16, 37
    if chunk_positions is not None:  # budget for exactly B·chunk_positions rows of fp32 logits
        monkeypatch.setattr(gpt, "HEAD_CHUNK_BYTES", B * chunk_positions * V * 4)
        assert gpt._head_chunk_len(B, T, V) == chunk_positions
    check(*random_case(rng, B, T, D, V), softcap, reduction)


def test_all_targets_ignored_gives_zero_loss_and_gradients():
    rng = np.random.default_rng()
    x, w, _ = random_case(rng, 2, 5, 8, 11)
    targets = -np.ones((2, 5), np.int64)
    loss, grads = jax.value_and_grad(lambda x, w: gpt.head_cross_entropy(x, w, jnp.asarray(targets), 15.0), (0, 1))(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    assert float(loss) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_upstream_cotangent_scales_the_gradients():
    """The backward multiplies the forward's gradients by the incoming cotangent (here 2.5 and a loss sum)."""
    rng = np.random.default_rng()
    x, w, targets = random_case(rng, 2, 6, 8, 13)
    _, want_dx, want_dw = np_head_loss(x, w, targets, 15.0, "mean")
    dx, dw = jax.grad(lambda x, w: 2.5 * gpt.head_cross_entropy(x, w, jnp.asarray(targets), 15.0) + x.sum() * 0.0,
                      (0, 1))(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(np.asarray(dx), 2.5 * want_dx, rtol=1e-4, atol=5e-6 * np.abs(want_dx).max())
    np.testing.assert_allclose(np.asarray(dw), 2.5 * want_dw, rtol=1e-4, atol=5e-6 * np.abs(want_dw).max())


def test_batch_sharded_and_chunked(monkeypatch):
    """Rows sharded over the simulated devices (as in training) with several chunks: same values."""
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("data",))
    rng = np.random.default_rng()
    B, T, D, V = n, 8, 16, 29
    monkeypatch.setattr(gpt, "HEAD_CHUNK_BYTES", B * 2 * V * 4)
    rows = NamedSharding(mesh, PartitionSpec("data"))
    check(*random_case(rng, B, T, D, V), 15.0, "mean", in_shardings=(rows, NamedSharding(mesh, PartitionSpec()), rows))


def test_bad_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction"):
        gpt.head_cross_entropy(jnp.zeros((1, 2, 4)), jnp.zeros((4, 5)), jnp.zeros((1, 2), jnp.int32), 15.0, "none")
