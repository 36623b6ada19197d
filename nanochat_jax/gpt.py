"""The GPT model as Flax NNX modules named as nanochat's (`nanochat/gpt.py`): `CausalSelfAttention`, `MLP`,
`Block` and `GPT`, plus the pure functions the rest of the project calls.

Architecture follows nanochat's current model (`nanochat/gpt.py`, `GPT.forward`): RoPE (split halves, base 100k)
then QK-norm then ×1.2, parameter-free RMSNorm, ReLU² MLP, untied embeddings, no biases, GQA, sliding windows
("SSSL", last layer full), value embeddings on alternating layers with a per-head input gate, per-layer resid/x0
scalars, smear (previous-token mix), backout (subtract the mid-depth residual), logit softcap 15.
`GPTConfig.classic()` is the October 2025 model.

Functional at every jit boundary. The modules own the parameters and the math; the rest of the project (optax,
orbax, the sharding rules, the engine) sees one plain pytree, `nnx.to_pure_dict(nnx.state(GPT(...)))`:

    params = init_params(cfg, key)             # a nested dict of arrays (below)
    logits = forward(params, idx_BT, cfg)      # = nnx.merge(graphdef(cfg), params)(idx_BT): modules rebuilt
                                               #   from the graph definition and the pure state, inside jit

    GPT                                        params = {
      wte                 Param (Vp, D)          "wte": (Vp, D), "lm_head": (D, Vp),
      blocks: Block       (stacked: L layers)    "blocks": {"attn": {"wq": (L, D, H*hd), "wk": (L, D, K*hd),
        attn: CausalSelfAttention                                    "wv": (L, D, K*hd), "wo": (L, H*hd, D)},
          wq wk wv wo     Param (L, in, out)                "mlp": {"w_fc": (L, D, 4D), "w_proj": (L, 4D, D)}},
        mlp: MLP                                  "value_embeds": (NV, Vp, K*hd), "ve_gate": (NV, 12, K),
          w_fc w_proj     Param (L, in, out)      "resid_lambdas": (L,), "x0_lambdas": (L,),
      lm_head, value_embeds, ve_gate,             "smear_gate": (24, 1), "smear_lambda": (),
      resid/x0_lambdas, smear_*, backout_lambda   "backout_lambda": ()}   (extras only where the config has them)

Matrices are (in, out). Master weights are fp32 (wte/value_embeds are stored in `embed_dtype`, bf16 like the
reference); every matmul casts its weight to `compute_dtype` at use. Each Param carries its sharding as metadata
(`out_sharding`: which axis FSDP splits), read by nanochat_jax/sharding.py.

Layers run under `lax.scan` (compile time flat in depth) and no conditional ever picks a window: where the window
must be a Python int (the cuDNN and Pallas kernels, the KV cache's window slices) the scan steps over groups of P
layers in which the window pattern and the alternating value-embedding layers repeat (P = 4 for "SSSL"), so each
position of the group has its own fixed window; the "xla" attention in training takes the window as mask data
and steps over layer pairs. Layers past the last whole group run unrolled (`layer_plan`). `forward_cached` runs
the same blocks against a preallocated `KVCache` (prefill and decode in nanochat_jax/engine.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax.config import require

Params = dict[str, Any]

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
_BACKENDS = ("xla", "cudnn", "pallas")
_INITS = ("reference", "classic")

# torch's F.rms_norm(x, eps=None) upcasts bf16 to fp32 and uses the epsilon of that *accumulation*
# type (both the CPU composite and the CUDA fused kernel), i.e. FLT_EPSILON, not finfo(bf16).eps.
# We do the same: normalise in fp32 with eps = 2^-23, then cast back to the input dtype.
RMS_EPS = float(jnp.finfo(jnp.float32).eps)


# ----------------------------------------------------------------------------------------------
# Config

@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 2048           # training context; sets the window sizes
    vocab_size: int = 32768            # logits are cropped to this; tables are padded to pad_vocab_to
    n_layer: int = 12
    n_head: int = 6                    # query heads
    n_kv_head: int = 6                 # key/value heads (GQA when < n_head)
    n_embd: int = 768                  # must equal n_head * head_dim
    head_dim: int = 128
    window_pattern: str = "SSSL"       # tiled over layers; S = quarter context, L = full; last layer is L
    short_window: int | None = None    # override the S window (None: the reference ceil(T/4 to 128))
    rope_base: float = 100_000.0
    use_value_embeds: bool = True
    use_lambdas: bool = True           # per-layer resid/x0 scalars
    use_smear: bool = True
    use_backout: bool = True
    qk_scale: float = 1.2
    softcap: float = 15.0              # 0 disables
    init: str = "reference"            # "reference" (current nanochat) or "classic"
    compute_dtype: str = "bfloat16"    # activations and matmuls
    embed_dtype: str = "bfloat16"      # storage dtype of wte and value_embeds
    attn_backend: str = "xla"          # "xla" | "cudnn" | "pallas"
    pad_vocab_to: int = 64
    remat: bool = False                # jax.checkpoint each block (saves activation memory)
    rope_dtype: str | None = None      # dtype of the RoPE cos/sin tables; None: compute_dtype (the classic model
                                       # keeps them bf16 whatever the compute dtype, as its forward asserts)

    def __post_init__(self):
        def need(ok: bool, msg: str):
            require(ok, f"GPTConfig: {msg}")

        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim",
                     "pad_vocab_to"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be a positive int, got {value!r}")
        need(self.n_embd == self.n_head * self.head_dim,
             f"n_embd ({self.n_embd}) must equal n_head*head_dim ({self.n_head}*{self.head_dim}); the attention "
             f"output projection maps n_head*head_dim back to n_embd")
        need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        need(self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0,
             f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        need(len(self.window_pattern) > 0 and set(self.window_pattern) <= {"S", "L"},
             f"window_pattern must be a non-empty string of 'S' (short) and 'L' (long), got {self.window_pattern!r}")
        need(self.short_window is None or (isinstance(self.short_window, int) and self.short_window >= 0),
             f"short_window must be None or an int >= 0, got {self.short_window!r}")
        need(self.rope_base > 0, f"rope_base must be > 0, got {self.rope_base}")
        need(self.softcap >= 0, f"softcap must be >= 0 (0 disables), got {self.softcap}")
        need(self.init in _INITS, f"init must be one of {_INITS}, got {self.init!r}")
        need(self.compute_dtype in _DTYPES,
             f"compute_dtype must be one of {tuple(_DTYPES)}, got {self.compute_dtype!r}")
        need(self.embed_dtype in _DTYPES, f"embed_dtype must be one of {tuple(_DTYPES)}, got {self.embed_dtype!r}")
        need(self.attn_backend in _BACKENDS, f"attn_backend must be one of {_BACKENDS}, got {self.attn_backend!r}")
        need(self.rope_dtype is None or self.rope_dtype in _DTYPES,
             f"rope_dtype must be None or one of {tuple(_DTYPES)}, got {self.rope_dtype!r}")
        if self.use_smear:
            need(self.n_embd >= SMEAR_CHANNELS, f"use_smear needs n_embd >= {SMEAR_CHANNELS}, got {self.n_embd}")
        if self.use_value_embeds:
            need(self.n_embd >= VE_GATE_CHANNELS, f"use_value_embeds needs n_embd >= {VE_GATE_CHANNELS}")

    # --- derived sizes
    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def dtype(self):
        return _DTYPES[self.compute_dtype]

    @property
    def rope_dt(self):
        return _DTYPES[self.rope_dtype or self.compute_dtype]

    # --- constructors
    @classmethod
    def from_depth(cls, depth: int, *, aspect_ratio: int = 64, head_dim: int = 128, max_seq_len: int = 2048,
                   vocab_size: int = 32768, n_kv_head: int | None = None, window_pattern: str = "SSSL",
                   **overrides) -> "GPTConfig":
        """Current nanochat's sizing (scripts/base_train.py, `build_model_meta`): width = depth*aspect_ratio
        rounded up to head_dim."""
        if depth < 1:
            raise ValueError(f"GPTConfig.from_depth: depth must be >= 1, got {depth}")
        model_dim = -(-depth * aspect_ratio // head_dim) * head_dim
        n_head = model_dim // head_dim
        return cls(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                   n_kv_head=n_head if n_kv_head is None else n_kv_head, n_embd=model_dim, head_dim=head_dim,
                   window_pattern=window_pattern, **overrides)

    @classmethod
    def classic(cls, depth: int = 20, vocab_size: int = 65536, **overrides) -> "GPTConfig":
        """The October 2025 nanochat model (the $100 d20): width depth*64, heads of ~128, full attention,
        RoPE 10k, no VE/lambdas/smear/backout, QK scale 1, classic init. (Classic applied the softcap in bf16
        before the fp32 cast; we always apply it in fp32.)"""
        if depth < 1:
            raise ValueError(f"GPTConfig.classic: depth must be >= 1, got {depth}")
        model_dim = depth * 64
        n_head = -(-model_dim // 128)
        if model_dim % n_head:
            raise ValueError(f"GPTConfig.classic: depth {depth} gives width {model_dim}, not divisible by "
                             f"{n_head} heads (the classic model asserts this too); pick another depth")
        fields = dict(sequence_len=2048, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                      n_embd=model_dim, head_dim=model_dim // n_head, **_CLASSIC_FEATURES)
        fields.update(overrides)
        return cls(**fields)

    # --- serialisation (checkpoint metadata)
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """Inverse of to_dict. Keys written by older versions may be missing: architecture keys then take
        their classic value, as nanochat patches a missing window_pattern to "L"; runtime keys
        (dtypes, backend, padding, remat) take the current defaults. Current nanochat's metadata, which has
        no feature flags, needs them set explicitly by the caller."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig.from_dict: unknown keys {unknown}; known keys are {sorted(known)}")
        required = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"GPTConfig.from_dict: missing required keys {missing}")
        fields = dict(d)
        fields.setdefault("head_dim", d["n_embd"] // d["n_head"])
        # rope_dtype is newer than this project's other keys: a config that has those keys but not this one is
        # ours, from before it existed (compute-dtype tables); one without any of them is classic (bf16 tables).
        fields.setdefault("rope_dtype", None if "use_smear" in d else "bfloat16")
        for key, value in _CLASSIC_FEATURES.items():
            fields.setdefault(key, value)
        return cls(**fields)


# What an older (classic) config means for every architecture switch added since.
_CLASSIC_FEATURES = dict(window_pattern="L", rope_base=10_000.0, use_value_embeds=False, use_lambdas=False,
                         use_smear=False, use_backout=False, qk_scale=1.0, init="classic", short_window=None,
                         rope_dtype="bfloat16")

SMEAR_CHANNELS = 24     # smear gate reads the first 24 channels of the normed embedding
VE_GATE_CHANNELS = 12   # value-embedding gate reads the first 12 channels of the attention input


# ----------------------------------------------------------------------------------------------
# Static per-layer structure

def has_value_embed(layer: int, n_layer: int) -> bool:
    """Alternating layers, the last one always included (reference `has_ve`)."""
    return layer % 2 == (n_layer - 1) % 2


def value_embed_layers(cfg: GPTConfig) -> tuple[int, ...]:
    if not cfg.use_value_embeds:
        return ()
    return tuple(i for i in range(cfg.n_layer) if has_value_embed(i, cfg.n_layer))


def layer_windows(cfg: GPTConfig) -> tuple[int, ...]:
    """Left window per layer (query i sees keys i-w..i). L = sequence_len (the reference's (T, 0) for FA3),
    S = T/4 rounded up to a multiple of 128 (512 for T=2048) unless short_window overrides it."""
    long_w = cfg.sequence_len
    short_w = -(-long_w // 4 // 128) * 128 if cfg.short_window is None else cfg.short_window
    pattern = cfg.window_pattern
    windows = [short_w if pattern[i % len(pattern)] == "S" else long_w for i in range(cfg.n_layer)]
    windows[-1] = long_w
    return tuple(windows)


def layer_plan(cfg: GPTConfig, static_windows: bool = True) -> tuple[int, int, tuple[int, ...]]:
    """(P, G, tail): layers [0, G·P) run as a lax.scan over G groups of P consecutive layers, the tail layers
    [G·P, L) unrolled. Value-embedding layers alternate, so P is even when the model has them.

    static_windows: P also repeats the window pattern (lcm(len(pattern), 2): 4 for "SSSL"), so layer g·P + j has
    the same window in every group and it is a Python int. The last layer is always long: when the pattern already
    makes it L every whole group is scanned, otherwise it (with the layers of its unfinished group) is in the tail.
    Otherwise (the "xla" attention in training, which takes the window as mask data) P is 2 (1 without value
    embeddings) and each layer's window rides in the scan as an int32: half the program of a 4-layer group."""
    n, L = len(cfg.window_pattern), cfg.n_layer
    ve_period = 2 if cfg.use_value_embeds else 1
    if not static_windows:
        return ve_period, L // ve_period, tuple(range(L - L % ve_period, L))
    P = n * ve_period // math.gcd(n, ve_period)
    G = L // P if cfg.window_pattern[(L - 1) % n] == "L" else (L - 1) // P
    return P, G, tuple(range(G * P, L))


# ----------------------------------------------------------------------------------------------
# Building blocks

def rms_norm(x, scale: float = 1.0):
    """Parameter-free RMSNorm over the last axis, computed in fp32 (see RMS_EPS), returned in x's dtype, then
    times `scale` (QK-norm's 1.2) in that dtype."""
    return _rms_norm(float(scale), x)


# Custom VJP so the backward keeps only the output (which the next matmul or attention keeps anyway) and the fp32
# 1/rms, instead of autodiff's fp32 copies of x: y = x·r, r = (mean(x²) + eps)^-1/2  =>  dx = r·(dy - y·mean(dy·y)).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rms_norm(scale, x):
    return _rms_norm_fwd(scale, x)[0]


def _rms_norm_fwd(scale, x):
    x32 = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_EPS)
    out = (x32 * rstd).astype(x.dtype)
    if scale != 1.0:
        out = out * jnp.asarray(scale, x.dtype)
    return out, (out, rstd)


def _rms_norm_bwd(scale, res, dout):
    out, rstd = res
    y32, dy32 = out.astype(jnp.float32) / scale, dout.astype(jnp.float32) * scale
    return ((rstd * (dy32 - y32 * jnp.mean(dy32 * y32, axis=-1, keepdims=True))).astype(out.dtype),)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def embedding_lookup(table_VD, idx):
    """table[idx]. Custom VJP so the gradient's scatter-add accumulates in fp32 (as torch's embedding backward
    does), rounded once to the table's dtype: a bf16 scatter-add would round after every repeated token."""
    return _embedding_lookup(table_VD.shape, jnp.dtype(table_VD.dtype), table_VD, idx)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _embedding_lookup(shape, dtype, table_VD, idx):
    return jnp.take(table_VD, idx, axis=0)


def _embedding_lookup_fwd(shape, dtype, table_VD, idx):
    return jnp.take(table_VD, idx, axis=0), idx


def _embedding_lookup_bwd(shape, dtype, idx, g):
    return jnp.zeros(shape, jnp.float32).at[idx].add(g.astype(jnp.float32)).astype(dtype), None


_embedding_lookup.defvjp(_embedding_lookup_fwd, _embedding_lookup_bwd)


def rope_tables(positions, head_dim: int, base: float, dtype):
    """cos/sin of shape positions.shape + (head_dim/2,), computed in fp32 then cast (the reference keeps
    them in the compute dtype)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
    return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


def apply_rope(x_BTHD, cos_TD, sin_TD):
    """Split-halves rotation in the reference's direction: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos.
    cos/sin are (T, hd/2) or (B, T, hd/2)."""
    d = x_BTHD.shape[-1] // 2
    x1, x2 = x_BTHD[..., :d], x_BTHD[..., d:]
    cos, sin = cos_TD[..., :, None, :], sin_TD[..., :, None, :]  # broadcast over heads
    return jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


def attention(q_BTHD, k_BSKD, v_BSKD, *, causal: bool = True, window=None, backend: str = "xla", q_offset=0,
              k_offset=0):
    """Scaled dot-product attention (scale 1/sqrt(hd)), layout (batch, time, heads, head_dim), GQA when
    K < H (query head h uses kv head h // (H/K)).

    window: left window w (query at position p sees keys p-w..p) or None for no window. For "xla" it may
    be a traced int (per-layer windows inside the scan); "cudnn" needs a Python int.
    q_offset, k_offset: absolute positions of the first query and the first key, for chunked prefill /
    decoding. "xla" also takes traced scalars or per-row (B,) arrays (KV-cache decoding, where each row
    has its own position and a window-sized slice of the cache starts at its own offset).
    """
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    scale = 1.0 / math.sqrt(D)
    if backend == "xla":
        # GQA without repeating K/V: group the H query heads as (K, H/K).
        q = q_BTHD.reshape(B, T, K, H // K, D)
        s = jnp.einsum("btkgd,bskd->bkgts", q, k_BSKD, preferred_element_type=jnp.float32) * scale
        if isinstance(q_offset, int) and isinstance(k_offset, int) and k_offset == 0:
            q_pos = q_offset + jnp.arange(T)[:, None]  # (T, 1)
            k_pos = jnp.arange(S)[None, :]             # (1, S)
        else:  # traced or per-row offsets: positions broadcast against the scores (B, K, G, T, S)
            q_pos = jnp.reshape(q_offset, (-1, 1, 1, 1, 1)) + jnp.arange(T)[:, None]
            k_pos = jnp.reshape(k_offset, (-1, 1, 1, 1, 1)) + jnp.arange(S)[None, :]
        mask = jnp.ones((T, S), bool)
        if causal:
            mask = mask & (k_pos <= q_pos)
        if window is not None:
            mask = mask & (q_pos - k_pos <= window)
        # A finite fill keeps fully masked rows (only possible for q_offset < 0 misuse) NaN-free.
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v_BSKD.dtype)
        o = jnp.einsum("bkgts,bskd->btkgd", p, v_BSKD, preferred_element_type=jnp.float32)
        return o.reshape(B, T, H, D).astype(q_BTHD.dtype)
    if backend == "cudnn":
        if jax.default_backend() != "gpu":
            raise RuntimeError(f"attn_backend='cudnn' needs an NVIDIA GPU, but JAX runs on "
                               f"{jax.default_backend()!r}; use attn_backend='xla' here")
        if q_BTHD.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attn_backend='cudnn' needs bf16/fp16 inputs, got {q_BTHD.dtype}; "
                             f"use compute_dtype='bfloat16' or attn_backend='xla'")
        if not (isinstance(q_offset, int) and q_offset == 0 and isinstance(k_offset, int) and k_offset == 0):
            raise NotImplementedError("attn_backend='cudnn' supports q_offset=k_offset=0 only; use 'xla' for decoding")
        if window is not None and not isinstance(window, int):
            raise ValueError("attn_backend='cudnn' needs a static (Python int) window")
        local = None if window is None or window >= S - 1 else (window, 0)  # w >= S-1 is plain causal
        return jax.nn.dot_product_attention(q_BTHD, k_BSKD, v_BSKD, scale=scale, is_causal=causal,
                                            local_window_size=local, implementation="cudnn")
    if backend == "pallas":
        if not (isinstance(q_offset, int) and q_offset == 0 and isinstance(k_offset, int) and k_offset == 0):
            raise NotImplementedError("attn_backend='pallas' supports q_offset=k_offset=0 only; use 'xla' for decoding")
        if window is not None and not isinstance(window, int):
            raise ValueError("attn_backend='pallas' needs a static (Python int) window")
        from kernels.flash_attention import flash_attention  # lazy: keeps Pallas out of CPU-only imports
        # Off the GPU the kernel runs in Pallas' interpreter: slow, but the same code path (used by tests).
        return flash_attention(q_BTHD, k_BSKD, v_BSKD, causal=causal, window=window, scale=scale,
                               interpret=jax.default_backend() != "gpu")
    raise ValueError(f"unknown attention backend {backend!r}; use one of {_BACKENDS}")


def _mm(x, w):
    """x @ w with the (fp32 master) weight cast to the activation dtype, as the reference's Linear does."""
    return jnp.matmul(x, w.astype(x.dtype))


# ----------------------------------------------------------------------------------------------
# Parameters: the reference's init (nanochat/gpt.py `GPT.init_weights`; classic: the October 2025 `_init_weights`)

FSDP = "fsdp"  # the logical axis name a Param's metadata gives the axis that FSDP shards (nanochat_jax/sharding.py)


def _param(value, fsdp_axis: int | None = None) -> nnx.Param:
    """A Param whose metadata names the axis FSDP shards (None: replicated)."""
    names = [None] * value.ndim
    if fsdp_axis is not None:
        names[fsdp_axis] = FSDP
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype=jnp.float32):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _uniform(rngs: nnx.Rngs, shape, lo: float, hi: float, dtype=jnp.float32):
    return jax.random.uniform(rngs.params(), shape, jnp.float32, lo, hi).astype(dtype)


def _matrix(cfg: GPTConfig, rngs: nnx.Rngs, shape: tuple[int, int], gain: float = 1.0):
    """An input projection: reference U(±gain·sqrt(3/D)) (std gain/sqrt(D)); classic
    N(0, min(1, sqrt(out/in))/sqrt(in))."""
    fan_in, fan_out = shape
    if cfg.init == "reference":
        bound = gain * math.sqrt(3.0 / cfg.n_embd)
        return _uniform(rngs, shape, -bound, bound)
    return _normal(rngs, shape, min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in))


# ----------------------------------------------------------------------------------------------
# The modules

class CausalSelfAttention(nnx.Module):
    """One layer's attention (nanochat/gpt.py, `CausalSelfAttention`): q/k/v projections (no biases), the value-
    embedding mix, RoPE, QK-norm, the attention itself (`attend`, which the caller picks: within the chunk for
    training, against the KV cache for decoding) and the output projection (zero at init)."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        D, H, K, hd = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.n_head, self.n_kv_head, self.head_dim, self.qk_scale = H, K, hd, cfg.qk_scale
        self.wq = _param(_matrix(cfg, rngs, (D, H * hd)), fsdp_axis=0)
        self.wk = _param(_matrix(cfg, rngs, (D, K * hd)), fsdp_axis=0)
        self.wv = _param(_matrix(cfg, rngs, (D, K * hd)), fsdp_axis=0)
        self.wo = _param(jnp.zeros((H * hd, D), jnp.float32), fsdp_axis=0)

    def qkv(self, h_BTD, cos, sin, ve=None):
        """q (B,T,H,hd), k and v (B,T,K,hd). `ve` is (gate weight (12, K), the layer's value-embedding table
        (Vp, K*hd), idx_BT) on value-embedding layers."""
        B, T, _ = h_BTD.shape
        H, K, hd = self.n_head, self.n_kv_head, self.head_dim
        q_BTHd = _mm(h_BTD, self.wq[...]).reshape(B, T, H, hd)
        k_BTKd = _mm(h_BTD, self.wk[...]).reshape(B, T, K, hd)
        v_BTKd = _mm(h_BTD, self.wv[...]).reshape(B, T, K, hd)
        if ve is not None:
            v_BTKd = _add_value_embed(v_BTKd, h_BTD[..., :VE_GATE_CHANNELS], *ve)
        # RoPE, QK-norm and the QK scale, on q and k separately: the norm's saved outputs are the attention's inputs.
        q_BTHd = rms_norm(apply_rope(q_BTHd, cos, sin), self.qk_scale)
        k_BTKd = rms_norm(apply_rope(k_BTKd, cos, sin), self.qk_scale)
        return q_BTHd, k_BTKd, v_BTKd

    def __call__(self, h_BTD, cos, sin, attend: Callable, ve=None, kv=None):
        """attend(q, k, v, kv) -> (y (B,T,H,hd), kv). Returns (the attention output (B,T,D), kv)."""
        B, T, _ = h_BTD.shape
        y_BTHd, kv = attend(*self.qkv(h_BTD, cos, sin, ve), kv)
        return _mm(y_BTHd.reshape(B, T, -1), self.wo[...]), kv


# Rematerialised so the backward gathers the value-embedding rows again instead of keeping them (B, T, K·hd a layer).
@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
def _add_value_embed(v_BTKd, gate_in_BTC, gate_w, table_VE, idx_BT):
    """v + 3·sigmoid(gate_in @ gate_w) · table[idx], per kv head."""
    gate_BTK = 3.0 * jax.nn.sigmoid(_mm(gate_in_BTC, gate_w))
    ve_BTKd = embedding_lookup(table_VE, idx_BT).astype(v_BTKd.dtype).reshape(v_BTKd.shape)
    return v_BTKd + gate_BTK[..., None] * ve_BTKd


class MLP(nnx.Module):
    """ReLU² MLP, 4× wide (nanochat/gpt.py, `MLP`); the output projection is zero at init."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        D = cfg.n_embd
        self.w_fc = _param(_matrix(cfg, rngs, (D, 4 * D), gain=0.4), fsdp_axis=0)
        self.w_proj = _param(jnp.zeros((4 * D, D), jnp.float32), fsdp_axis=0)

    def __call__(self, x_BTD):
        h_BTF = _mm(x_BTD, self.w_fc[...])
        return _relu2_proj(h_BTF, self.w_proj[...].astype(h_BTF.dtype))


# Rematerialised so the backward keeps only the fc output and recomputes relu² (not relu², and a mask, of 4D each).
@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
def _relu2_proj(h_BTF, w_proj):
    return _mm(jnp.square(jax.nn.relu(h_BTF)), w_proj)


class Block(nnx.Module):
    """Pre-norm attention then MLP, each added to the residual stream (nanochat/gpt.py, `Block`)."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BTD, cos, sin, attend: Callable, ve=None, kv=None):
        y_BTD, kv = self.attn(rms_norm(x_BTD), cos, sin, attend, ve, kv)
        x_BTD = x_BTD + y_BTD
        return x_BTD + self.mlp(rms_norm(x_BTD)), kv


def _stacked_blocks(cfg: GPTConfig, rngs: nnx.Rngs) -> Block:
    """L Blocks as one Block whose Params have a leading layer axis (each layer its own random draws)."""
    @nnx.split_rngs(splits=cfg.n_layer)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make(layer_rngs):
        return Block(cfg, rngs=layer_rngs)

    return make(rngs)


class GPT(nnx.Module):
    """The whole model (nanochat/gpt.py, `GPT`): embedding (+ smear), the blocks with the per-layer resid/x0
    scalars and value embeddings, backout, the final norm, lm_head and the softcap."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        L, D, K, hd, Vp = cfg.n_layer, cfg.n_embd, cfg.n_kv_head, cfg.head_dim, cfg.padded_vocab
        edt, ref = _DTYPES[cfg.embed_dtype], cfg.init == "reference"
        self.wte = _param(_normal(rngs, (Vp, D), 0.8 if ref else 1.0, edt), fsdp_axis=0)
        self.blocks = _stacked_blocks(cfg, rngs)
        self.lm_head = _param(_normal(rngs, (D, Vp), 0.001) if ref else jnp.zeros((D, Vp), jnp.float32),
                              fsdp_axis=1)
        # The current model's extras use the reference init under either init scheme.
        nv = len(value_embed_layers(cfg))
        bound = math.sqrt(3.0 / D)
        self.value_embeds = _param(_uniform(rngs, (nv, Vp, K * hd), -bound, bound, edt), fsdp_axis=1) if nv else None
        self.ve_gate = _param(_uniform(rngs, (nv, VE_GATE_CHANNELS, K), 0.0, 0.02)) if nv else None
        frac = jnp.arange(L, dtype=jnp.float32) / max(L - 1, 1)
        self.resid_lambdas = _param(1.15 - 0.10 * frac) if cfg.use_lambdas else None
        self.x0_lambdas = _param(0.20 - 0.15 * frac) if cfg.use_lambdas else None
        self.smear_gate = _param(_uniform(rngs, (SMEAR_CHANNELS, 1), 0.0, 0.02)) if cfg.use_smear else None
        self.smear_lambda = _param(jnp.zeros((), jnp.float32)) if cfg.use_smear else None
        self.backout_lambda = _param(jnp.full((), 0.2, jnp.float32)) if cfg.use_backout else None

    # --- embedding and head
    def token_embedding(self, idx_BT):
        """The normed token embedding before smear (what smear mixes in from the previous token)."""
        return rms_norm(embedding_lookup(self.wte[...], idx_BT).astype(self.cfg.dtype))

    def embed(self, idx_BT, x_prev_B1D=None):
        """Token embedding → compute dtype → RMSNorm → smear. `x_prev_B1D` is the normed embedding of the token
        before idx_BT[:, 0] (KV-cache decoding); without it position 0 gets no smear, as in training."""
        x = self.token_embedding(idx_BT)
        if self.cfg.use_smear:
            prev = x[:, :-1] if x_prev_B1D is None else jnp.concatenate([x_prev_B1D.astype(x.dtype), x[:, :-1]], 1)
            first = x.shape[1] - prev.shape[1]
            cur = x[:, first:]
            gate = self.smear_lambda[...].astype(x.dtype) * jax.nn.sigmoid(_mm(cur[..., :SMEAR_CHANNELS],
                                                                               self.smear_gate[...]))
            x = jnp.concatenate([x[:, :first], cur + gate * prev], axis=1)
        return x

    def logits(self, x_BTD):
        """lm_head in the compute dtype, crop the vocab padding, then the softcap in fp32."""
        logits = _mm(x_BTD, self.lm_head[...])[..., :self.cfg.vocab_size].astype(jnp.float32)
        if self.cfg.softcap:
            logits = self.cfg.softcap * jnp.tanh(logits / self.cfg.softcap)
        return logits

    # --- the blocks
    def trunk(self, x_BTD, idx_BT, cos, sin, attend_for: Callable, kv=None):
        """The L blocks (see `layer_plan`), backout and the final norm. attend_for(window, layer) gives the
        attention of one layer, with its window a Python int: attend(q, k, v, kv) -> (y, kv). kv rides through
        every layer (the KV cache when decoding; None in training). Returns (normed (B, T, D) activations, kv)."""
        cfg = self.cfg
        L, cdt = cfg.n_layer, cfg.dtype
        # Kernels (cudnn, pallas) and the cache's window slices need Python-int windows; the "xla" attention in
        # training takes them as data (no control flow either way: no conditional in the compiled program).
        static = kv is not None or cfg.attn_backend != "xla"
        P, G, tail = layer_plan(cfg, static)
        windows, ve_layers = layer_windows(cfg), value_embed_layers(cfg)
        block_def, block_state = nnx.split(self.blocks)
        x0_BTD = x_BTD

        def run(window, x, x_backout, kv, layer_state, layer, lambdas, ve, window_data=None):
            """One layer: the x0 mix, the block, and the residual kept for backout (after layer L // 2). `window`
            is the layer's window as a Python int, or None and `window_data` a traced int32."""
            window = window_data if window is None else window
            if lambdas is not None:
                x = lambdas[0].astype(cdt) * x + lambdas[1].astype(cdt) * x0_BTD
            ve = None if ve is None else (ve[1], ve[0], idx_BT)
            x, kv = nnx.merge(block_def, layer_state)(x, cos, sin, attend_for(window, layer), ve, kv)
            if cfg.use_backout:
                x_backout = jnp.where(layer == L // 2, x, x_backout)
            return x, x_backout, kv

        if cfg.remat and kv is None:  # remat only matters under a gradient
            run = jax.checkpoint(run, static_argnums=(0,), prevent_cse=False)
        run = jax.jit(run, static_argnums=(0,))  # traced once per distinct window, not once per layer of a group
        lambdas = (self.resid_lambdas[...], self.x0_lambdas[...]) if cfg.use_lambdas else None
        tables = (self.value_embeds[...], self.ve_gate[...]) if ve_layers else None
        carry = (x_BTD, jnp.zeros_like(x_BTD) if cfg.use_backout else None, kv)
        if G:
            # Layers [0, G·P) as G groups of P: layer g·P + j has window windows[j] (static) or xs["windows"][g, j],
            # and VE iff layer j has one; its VE table is the m-th of its group's P/2 (VE layers alternate, P even).
            grouped = lambda a: a[:G * P].reshape(G, P, *a.shape[1:])  # noqa: E731
            xs = {"blocks": jax.tree.map(grouped, block_state), "g": jnp.arange(G, dtype=jnp.int32)}
            if not static:
                xs["windows"] = grouped(jnp.asarray(windows, jnp.int32))
            if lambdas is not None:
                xs["lambdas"] = jax.tree.map(grouped, lambdas)
            if tables is not None:
                xs["ve"] = jax.tree.map(lambda a: a[:G * P // 2].reshape(G, P // 2, *a.shape[1:]), tables)
            ve_pos = [j for j in range(P) if j in ve_layers]

            def group(c, gx):
                for j in range(P):
                    pick = lambda tree: jax.tree.map(lambda a: a[j], tree)  # noqa: E731, B023
                    ve = jax.tree.map(lambda a: a[ve_pos.index(j)], gx["ve"]) if j in ve_pos else None  # noqa: B023
                    c = run(windows[j] if static else None, *c, pick(gx["blocks"]), gx["g"] * P + j,
                            pick(gx["lambdas"]) if lambdas is not None else None, ve,
                            None if static else gx["windows"][j])
                return c, None

            carry, _ = jax.lax.scan(group, carry, xs)
        for i in tail:
            pick = lambda tree: jax.tree.map(lambda a: a[i], tree)  # noqa: E731, B023
            ve = jax.tree.map(lambda a: a[ve_layers.index(i)], tables) if i in ve_layers else None  # noqa: B023
            carry = run(windows[i], *carry, pick(block_state), i, pick(lambdas) if lambdas is not None else None, ve)
        x, x_backout, kv = carry
        if cfg.use_backout:
            x = x - self.backout_lambda[...].astype(cdt) * x_backout
        return rms_norm(x), kv

    # --- training and cached decoding
    def __call__(self, idx_BT, *, targets_BT=None, loss_reduction: str = "mean", pos_offset=0):
        """Logits (B, T, vocab_size) in fp32, or the loss when targets_BT is given. pos_offset shifts the RoPE
        positions (attention still sees only this chunk; forward_cached is the KV-cache version)."""
        cfg = self.cfg
        T = idx_BT.shape[1]
        cos, sin = rope_tables(pos_offset + jnp.arange(T), cfg.head_dim, cfg.rope_base, cfg.rope_dt)

        def attend_for(window: int, layer):  # within the chunk; kernels get their window as a Python int
            return lambda q, k, v, kv: (attention(q, k, v, window=window, backend=cfg.attn_backend), kv)

        x, _ = self.trunk(self.embed(idx_BT), idx_BT, cos, sin, attend_for)
        if targets_BT is None or loss_reduction == "none":  # 'none' (per-token losses) takes the logits
            logits = self.logits(x)
            return logits if targets_BT is None else cross_entropy(logits, targets_BT, loss_reduction)
        return head_cross_entropy(x, self.lm_head[...][:, :cfg.vocab_size], targets_BT, cfg.softcap, loss_reduction)

    def forward_cached(self, idx_BT, cache: "KVCache", *, lengths_B=None, prev_idx_B=None):
        """See the module-level `forward_cached`."""
        cfg = self.cfg
        B, T = idx_BT.shape
        S = cache.k.shape[2]
        x_prev = self.token_embedding(prev_idx_B[:, None]) if prev_idx_B is not None and cfg.use_smear else None
        pos_B = cache.pos
        pos_BT = pos_B[:, None] + jnp.arange(T)
        cos, sin = rope_tables(pos_BT, cfg.head_dim, cfg.rope_base, cfg.rope_dt)
        rows_B1 = jnp.arange(B)[:, None]

        def attend_for(window: int, layer):
            def attend(q, k, v, kv):
                k_cache, v_cache = kv
                # Writes past the end of the cache are dropped (never clamped onto the last slot).
                k_cache = k_cache.at[layer, rows_B1, pos_BT].set(k.astype(k_cache.dtype), mode="drop")
                v_cache = v_cache.at[layer, rows_B1, pos_BT].set(v.astype(v_cache.dtype), mode="drop")
                k_BSKd, v_BSKd = k_cache[layer], v_cache[layer]
                if window + T >= S:  # the window spans the whole cache
                    y = attention(q, k_BSKd, v_BSKd, window=window, q_offset=pos_B)
                else:  # read only the window + T keys this chunk can see, from each row's own offset
                    start_B = jnp.clip(pos_B - window, 0, S - (window + T))
                    take = jax.vmap(lambda a, s: jax.lax.dynamic_slice_in_dim(a, s, window + T, axis=0))
                    y = attention(q, take(k_BSKd, start_B), take(v_BSKd, start_B), window=window, q_offset=pos_B,
                                  k_offset=start_B)
                return y, (k_cache, v_cache)
            return attend

        x, (k, v) = self.trunk(self.embed(idx_BT, x_prev), idx_BT, cos, sin, attend_for, kv=(cache.k, cache.v))
        n_B = jnp.full((B,), T, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B, jnp.int32)
        logits = self.logits(x[jnp.arange(B), n_B - 1])
        return logits, cache._replace(k=k, v=v, pos=cache.pos + n_B)


# ----------------------------------------------------------------------------------------------
# The functional interface: a params pytree in, arrays out (what jit, optax, orbax and the engine see)

@functools.lru_cache(maxsize=32)
def _abstract(cfg: GPTConfig):
    """(graph definition, abstract state) of GPT(cfg): its structure and Param metadata, no arrays."""
    return nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))


def model(params: Params, cfg: GPTConfig) -> GPT:
    """The GPT module with these parameters (cheap: inside jit it happens once, at trace time)."""
    return nnx.merge(_abstract(cfg)[0], params)


def init_params(cfg: GPTConfig, key: jax.Array) -> Params:
    """Fresh parameters as a pure pytree. Pure jax.random, so it works under jax.eval_shape and jit (with
    out_shardings)."""
    return nnx.to_pure_dict(nnx.state(GPT(cfg, rngs=nnx.Rngs(params=key))))


def param_sharding_axes(cfg: GPTConfig) -> dict[str, tuple]:
    """'blocks/attn/wq' -> its Param's logical axis names, e.g. (None, 'fsdp', None) (nanochat_jax/sharding.py)."""
    state = _abstract(cfg)[1]
    out = {}
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        out["/".join(str(getattr(k, "key", k)) for k in path)] = tuple(var.get_metadata()["out_sharding"])
    return out


def forward(params: Params, idx_BT, cfg: GPTConfig, *, targets_BT=None, loss_reduction: str = "mean",
            pos_offset=0):
    """Logits (B, T, vocab_size) in fp32, or the loss when targets_BT is given (`GPT.__call__`)."""
    return model(params, cfg)(idx_BT, targets_BT=targets_BT, loss_reduction=loss_reduction, pos_offset=pos_offset)


def embed(params: Params, idx_BT, cfg: GPTConfig, *, x_prev_B1D=None):
    """`GPT.embed`: the normed token embeddings after smear."""
    return model(params, cfg).embed(idx_BT, x_prev_B1D)


class KVCache(NamedTuple):
    """Keys/values of every layer for B rows of up to S tokens, preallocated (static shapes for jit).

    k, v: (L, B, S, K, hd) in the compute dtype; entry [l, b, p] holds layer l's (RoPE'd, QK-normed) key and
    value of row b's token at absolute position p. pos: int32 (B,), how many tokens row b has cached, which
    is also the position of its next token. Rows advance independently (prompts of different lengths).
    Entries at positions >= pos[b] may hold garbage (right padding of a batched prefill); attention never
    reads them, because a query at position p only sees keys at positions <= p, and every position <= p
    has been written by then.
    """
    k: jax.Array
    v: jax.Array
    pos: jax.Array


def init_cache(cfg: GPTConfig, batch: int, max_len: int) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens."""
    shape = (cfg.n_layer, batch, max_len, cfg.n_kv_head, cfg.head_dim)
    return KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype), jnp.zeros((batch,), jnp.int32))


def forward_cached(params: Params, idx_BT, cfg: GPTConfig, cache: KVCache, *, lengths_B=None, prev_idx_B=None):
    """A chunk of tokens through the model with a KV cache: a prefill (empty cache, right-padded prompts) or a
    decode step (T = 1). Row b's tokens idx_BT[b, :lengths_B[b]] (all T when lengths_B is None) take positions
    cache.pos[b] + t; each layer writes its k/v there (the cache rides through the layers, so the update is in
    place) and its queries attend over the cached keys within their (static) window, with the "xla" attention
    (per-row offsets); a layer whose window w is shorter than the cache reads only the w + T keys the chunk can
    see. prev_idx_B is the token just before idx_BT[:, 0], for smear; None when the cache is empty (position 0
    has no previous token). Returns fp32 logits (B, vocab_size) of each row's last valid token and the cache
    with pos advanced by the row's length. Padding tokens are written to the cache too, past the row's new pos,
    where they are overwritten before anything reads them."""
    return model(params, cfg).forward_cached(idx_BT, cache, lengths_B=lengths_B, prev_idx_B=prev_idx_B)


def cross_entropy(logits_BTV, targets_BT, reduction: str = "mean"):
    """CE in fp32 with ignore_index -1 (any negative target is ignored). 'mean' averages over valid
    targets (0 when there are none, where torch would give NaN); 'sum'; 'none' gives (B, T) with 0 at
    ignored positions."""
    valid = targets_BT >= 0
    safe = jnp.where(valid, targets_BT, 0)
    logits = logits_BTV.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.sum() / jnp.maximum(valid.sum(), 1)
    raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# The loss through the head, fused: what `cross_entropy(GPT.logits(x), targets)` computes, with its gradient taken
# in the forward pass, chunk by chunk. The loss is a scalar, so its gradient is g times the gradient of the
# unscaled loss, and each chunk's (B, Tc, V) fp32 logits die within the chunk: the backward keeps dL/dx and dL/dw
# (the sizes of x and the head) instead of B×T×V fp32 logits, and its two matmuls read the logits' gradient where
# it lies. (Autodiff of the unfused head made XLA:CPU transpose the 2048×32768 logits gradient before the weight
# gradient's dot: ~0.7 s of a 2.2 s step at depth 4; docs/benchmarks.md.)
HEAD_CHUNK_BYTES = 2**30  # largest fp32 logits chunk (global batch) of the fused head + loss


def _head_chunk_len(B: int, T: int, V: int) -> int:
    """The largest divisor Tc of T with B·Tc·V fp32 logits within HEAD_CHUNK_BYTES (1 at least)."""
    fits = [c for c in range(1, T + 1) if T % c == 0 and B * c * V * 4 <= HEAD_CHUNK_BYTES]
    return max(fits, default=1)


def _head_chunk(x_BTD, w_DV, targets_BT, softcap: float, grads: bool):
    """One chunk: the summed NLL of softcap(x @ w) (as `GPT.logits` and `cross_entropy`), and with grads also
    its gradients w.r.t. x (x's dtype) and w (fp32)."""
    wc = w_DV.astype(x_BTD.dtype)
    z = jnp.matmul(x_BTD, wc).astype(jnp.float32)
    tanh = jnp.tanh(z / softcap) if softcap else None
    logits = softcap * tanh if softcap else z
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = targets_BT >= 0
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets_BT[..., None]
    picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)  # exact: one nonzero term
    nll = jnp.sum(jnp.where(valid, lse - picked, 0.0))
    if not grads:
        return nll
    p = jnp.exp(logits - lse[..., None])
    dlogits = jnp.where(valid[..., None], jnp.where(hit, p - 1.0, p), 0.0)  # softmax - onehot, 0 where ignored
    dz = (dlogits * (1.0 - tanh * tanh) if softcap else dlogits).astype(x_BTD.dtype)  # d softcap·tanh(z/c)/dz
    dx = jax.lax.dot_general(dz, wc, (((dz.ndim - 1,), (1,)), ((), ())))
    dw = jax.lax.dot_general(x_BTD, dz, ((tuple(range(dz.ndim - 1)),) * 2, ((), ())),
                             preferred_element_type=jnp.float32)
    return nll, dx, dw


def _head_nll(x_BTD, w_DV, targets_BT, softcap: float, grads: bool):
    """`_head_chunk` over chunks of Tc positions (all B rows each, so a batch-sharded x stays local)."""
    B, T, D = x_BTD.shape
    Tc = _head_chunk_len(B, T, w_DV.shape[1])
    if Tc == T:
        return _head_chunk(x_BTD, w_DV, targets_BT, softcap, grads)
    C = T // Tc
    x_CBTD = x_BTD.reshape(B, C, Tc, D).swapaxes(0, 1)
    t_CBT = targets_BT.reshape(B, C, Tc).swapaxes(0, 1)
    if not grads:
        return jax.lax.map(lambda a: _head_chunk(a[0], w_DV, a[1], softcap, False), (x_CBTD, t_CBT)).sum()

    def step(dw, a):
        nll, dx, dw_chunk = _head_chunk(a[0], w_DV, a[1], softcap, True)
        return dw + dw_chunk, (nll, dx)

    dw, (nll, dx) = jax.lax.scan(step, jnp.zeros(w_DV.shape, jnp.float32), (x_CBTD, t_CBT))
    return nll.sum(), dx.swapaxes(0, 1).reshape(B, T, D), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head_nll_sum(x_BTD, w_DV, targets_BT, softcap: float):
    return _head_nll(x_BTD, w_DV, targets_BT, softcap, grads=False)


def _head_nll_sum_fwd(x_BTD, w_DV, targets_BT, softcap: float):
    nll, dx, dw = _head_nll(x_BTD, w_DV, targets_BT, softcap, grads=True)
    return nll, (dx, dw)


def _head_nll_sum_bwd(softcap, res, g):
    dx, dw = res
    return (dx.astype(jnp.float32) * g).astype(dx.dtype), (dw * g).astype(dw.dtype), None


_head_nll_sum.defvjp(_head_nll_sum_fwd, _head_nll_sum_bwd)


def head_cross_entropy(x_BTD, w_DV, targets_BT, softcap: float = 0.0, reduction: str = "mean"):
    """cross_entropy(softcap · tanh((x @ w) / softcap), targets, reduction) for 'mean' and 'sum' (softcap 0: no
    cap), in fp32 after the matmul in x's dtype, as `GPT.logits` and `cross_entropy` compute it, without B×T×V
    fp32 logits at once or for the backward (see HEAD_CHUNK_BYTES). w_DV: the head cropped to the vocab."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"head_cross_entropy takes reduction 'mean' or 'sum', got {reduction!r}")
    nll = _head_nll_sum(x_BTD, w_DV, targets_BT, float(softcap))
    return nll if reduction == "sum" else nll / jnp.maximum((targets_BT >= 0).sum(), 1)


# ----------------------------------------------------------------------------------------------
# Counting

def param_shapes(cfg: GPTConfig) -> Params:
    """ShapeDtypeStructs of init_params(cfg), without allocating anything."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def num_params(cfg: GPTConfig) -> dict[str, int]:
    """Parameter counts grouped like the reference's `num_scaling_params`, plus 'scaling' =
    transformer_matrices + lm_head (the count that sets the training horizon)."""
    shapes = param_shapes(cfg)
    size = lambda tree: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))  # noqa: E731
    counts = {
        "wte": size(shapes["wte"]),
        "value_embeds": size(shapes.get("value_embeds", [])),
        "lm_head": size(shapes["lm_head"]),
        "transformer_matrices": size(shapes["blocks"]) + size(shapes.get("ve_gate", [])),
        "scalars": size([shapes.get(k, []) for k in ("resid_lambdas", "x0_lambdas", "smear_gate", "smear_lambda",
                                                     "backout_lambda")]),
    }
    counts["total"] = sum(counts.values())
    counts["scaling"] = counts["transformer_matrices"] + counts["lm_head"]
    return counts


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token (fwd+bwd), reference `estimate_flops`: 6 × (params used in matmuls: blocks,
    ve_gate, lm_head, smear_gate) + Σ_layers 12·H·hd·min(window, T)."""
    n = num_params(cfg)
    smear = SMEAR_CHANNELS if cfg.use_smear else 0
    matmul_params = n["transformer_matrices"] + n["lm_head"] + smear
    attn = sum(12 * cfg.n_head * cfg.head_dim * min(w, cfg.sequence_len) for w in layer_windows(cfg))
    return float(6 * matmul_params + attn)
