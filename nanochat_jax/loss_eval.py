"""Bits per byte, the tokenizer-independent validation loss (nanochat's `evaluate_bpb`): Σ nats / (ln 2 · Σ bytes)
over valid targets (>= 0) with a byte length (`token_bytes[target] > 0`: special tokens count in neither sum).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import gpt


def make_bpb_fn(model_cfg: gpt.GPTConfig):
    """(params, inputs_BT, targets_BT, token_bytes_V) -> (Σ nats, Σ bytes) over counted tokens, to jit."""

    def bpb_sums(params, inputs_BT, targets_BT, token_bytes_V):
        nats_BT = gpt.forward(params, inputs_BT, model_cfg, targets_BT=targets_BT, loss_reduction="none")
        safe = jnp.where(targets_BT >= 0, targets_BT, 0)
        nbytes_BT = jnp.where(targets_BT >= 0, token_bytes_V[safe], 0)
        return jnp.where(nbytes_BT > 0, nats_BT, 0.0).sum(), nbytes_BT.sum().astype(jnp.float32)

    return bpb_sums


def bits_per_byte(total_nats: float, total_bytes: float) -> float:
    return float("inf") if total_bytes <= 0 else total_nats / (math.log(2) * total_bytes)


def evaluate_bpb(bpb_fn, params, batches, token_bytes: jax.Array, steps: int) -> float:
    """Run `steps` batches ({"inputs","targets"} global jax arrays) through the jitted bpb_fn and combine."""
    nats, nbytes = 0.0, 0.0
    for _ in range(steps):  # sums stay on device (async dispatch); one read at the end
        batch = next(batches)
        n, b = bpb_fn(params, batch["inputs"], batch["targets"], token_bytes)
        nats, nbytes = nats + n, nbytes + b
    return bits_per_byte(float(nats), float(nbytes))


def numpy_bpb(nats_BT: np.ndarray, targets_BT: np.ndarray, token_bytes: np.ndarray) -> float:
    """The same formula in NumPy (for tests and for checking a run by hand)."""
    valid = targets_BT >= 0
    nbytes = np.where(valid, token_bytes[np.where(valid, targets_BT, 0)], 0)
    return bits_per_byte(float(nats_BT[nbytes > 0].sum()), float(nbytes.sum()))
