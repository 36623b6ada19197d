"""The GPT model: a config, a parameter pytree, and pure functions (init, forward, loss, counts).

Architecture follows nanochat HEAD (`nanochat/gpt.py`, see docs/nanochat_reference.md §4):
RoPE (split halves, base 100k) then QK-norm then ×1.2, parameter-free RMSNorm, ReLU² MLP, untied
embeddings, no biases, GQA, sliding windows ("SSSL", last layer full), value embeddings on alternating
layers with a per-head input gate, per-layer resid/x0 scalars, smear (previous-token mix), backout
(subtract the mid-depth residual), logit softcap 15. `GPTConfig.classic()` is the October 2025 model.

Parameters are a nested dict of arrays in (in, out) layout. The L transformer blocks are stacked on a
leading axis and run with `jax.lax.scan`, so compile time does not grow with depth. Master weights are
fp32 (wte/value_embeds are stored in `embed_dtype`, bf16 like the reference); every matmul casts its
weight to `compute_dtype` at use.

KV-cache aware: `forward_cached` runs the same blocks (one `_blocks` scan, only the attention step differs)
against a preallocated `KVCache`, for prefill and decode in nanochat_jax/engine.py.

    params = {
      "wte": (Vp, D), "lm_head": (D, Vp),
      "blocks": {"attn": {"wq": (L, D, H*hd), "wk": (L, D, K*hd), "wv": (L, D, K*hd), "wo": (L, H*hd, D)},
                 "mlp": {"w_fc": (L, D, 4D), "w_proj": (L, 4D, D)}},
      "value_embeds": (NV, Vp, K*hd), "ve_gate": (NV, 12, K),          # use_value_embeds
      "resid_lambdas": (L,), "x0_lambdas": (L,),                       # use_lambdas
      "smear_gate": (24, 1), "smear_lambda": (),                       # use_smear
      "backout_lambda": (),                                            # use_backout
    }
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

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
    init: str = "reference"            # "reference" (HEAD) or "classic" (OCT)
    compute_dtype: str = "bfloat16"    # activations and matmuls
    embed_dtype: str = "bfloat16"      # storage dtype of wte and value_embeds
    attn_backend: str = "xla"          # "xla" | "cudnn" | "pallas"
    pad_vocab_to: int = 64
    remat: bool = False                # jax.checkpoint each block (saves activation memory)

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

    # --- constructors
    @classmethod
    def from_depth(cls, depth: int, *, aspect_ratio: int = 64, head_dim: int = 128, max_seq_len: int = 2048,
                   vocab_size: int = 32768, n_kv_head: int | None = None, window_pattern: str = "SSSL",
                   **overrides) -> "GPTConfig":
        """nanochat HEAD sizing (`build_model_meta`): width = depth*aspect_ratio rounded up to head_dim."""
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
        RoPE 10k, no VE/lambdas/smear/backout, QK scale 1, classic init. (OCT applied the softcap in bf16
        before the fp32 cast; we always apply it in fp32.)"""
        if depth < 1:
            raise ValueError(f"GPTConfig.classic: depth must be >= 1, got {depth}")
        model_dim = depth * 64
        n_head = -(-model_dim // 128)
        if model_dim % n_head:
            raise ValueError(f"GPTConfig.classic: depth {depth} gives width {model_dim}, not divisible by "
                             f"{n_head} heads (the OCT model asserts this too); pick another depth")
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
        their classic (OCT) value, as nanochat patches a missing window_pattern to "L"; runtime keys
        (dtypes, backend, padding, remat) take the current defaults. nanochat HEAD metadata, which has
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
        for key, value in _CLASSIC_FEATURES.items():
            fields.setdefault(key, value)
        return cls(**fields)


# What an older (OCT-era) config means for every architecture switch added since.
_CLASSIC_FEATURES = dict(window_pattern="L", rope_base=10_000.0, use_value_embeds=False, use_lambdas=False,
                         use_smear=False, use_backout=False, qk_scale=1.0, init="classic", short_window=None)

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


# ----------------------------------------------------------------------------------------------
# Init

def init_params(cfg: GPTConfig, key: jax.Array) -> Params:
    """Fresh parameters. Pure jax.random, so it works under jax.eval_shape and jit (with out_shardings)."""
    L, D, H, K, hd, Vp = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.padded_vocab
    f32, edt = jnp.float32, _DTYPES[cfg.embed_dtype]
    keys = iter(jax.random.split(key, 16))

    def normal(shape, std, dtype=f32):
        return (std * jax.random.normal(next(keys), shape, f32)).astype(dtype)

    def uniform(shape, lo, hi, dtype=f32):
        return jax.random.uniform(next(keys), shape, f32, lo, hi).astype(dtype)

    shapes = {"wq": (L, D, H * hd), "wk": (L, D, K * hd), "wv": (L, D, K * hd), "wo": (L, H * hd, D),
              "w_fc": (L, D, 4 * D), "w_proj": (L, 4 * D, D)}
    zeros = lambda name: jnp.zeros(shapes[name], f32)  # noqa: E731
    s = math.sqrt(3.0) / math.sqrt(D)  # uniform bound with the std of N(0, 1/D)
    if cfg.init == "reference":
        wte, lm_head = normal((Vp, D), 0.8, edt), normal((D, Vp), 0.001)
        mats = {"wq": uniform(shapes["wq"], -s, s), "wk": uniform(shapes["wk"], -s, s),
                "wv": uniform(shapes["wv"], -s, s), "w_fc": uniform(shapes["w_fc"], -0.4 * s, 0.4 * s)}
    else:  # classic: N(0, 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in))), wte N(0, 1), lm_head 0
        def classic_std(name):
            fan_in, fan_out = shapes[name][-2:]
            return min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)
        wte, lm_head = normal((Vp, D), 1.0, edt), jnp.zeros((D, Vp), f32)
        mats = {name: normal(shapes[name], classic_std(name)) for name in ("wq", "wk", "wv", "w_fc")}
    params: Params = {
        "wte": wte,
        "lm_head": lm_head,
        "blocks": {"attn": {"wq": mats["wq"], "wk": mats["wk"], "wv": mats["wv"], "wo": zeros("wo")},
                   "mlp": {"w_fc": mats["w_fc"], "w_proj": zeros("w_proj")}},
    }
    # The HEAD-only extras use the reference init under either init scheme.
    nv = len(value_embed_layers(cfg))
    if nv:
        params["value_embeds"] = uniform((nv, Vp, K * hd), -s, s, edt)
        params["ve_gate"] = uniform((nv, VE_GATE_CHANNELS, K), 0.0, 0.02)
    if cfg.use_lambdas:
        frac = jnp.arange(L, dtype=f32) / max(L - 1, 1)
        params["resid_lambdas"] = 1.15 - 0.10 * frac
        params["x0_lambdas"] = 0.20 - 0.15 * frac
    if cfg.use_smear:
        params["smear_gate"] = uniform((SMEAR_CHANNELS, 1), 0.0, 0.02)
        params["smear_lambda"] = jnp.zeros((), f32)
    if cfg.use_backout:
        params["backout_lambda"] = jnp.full((), 0.2, f32)
    return params


# ----------------------------------------------------------------------------------------------
# Building blocks

def rms_norm(x):
    """Parameter-free RMSNorm over the last axis, computed in fp32 (see RMS_EPS), returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_EPS)).astype(x.dtype)


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


def default_attn_backend() -> str:
    """The attention backend `auto` resolves to: cuDNN's fused kernel on NVIDIA GPUs, XLA elsewhere.
    (Our Pallas kernel is the alternative on GPU; see docs/benchmarks.md for how the two compare.)"""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


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
# Forward

def token_embedding(params: Params, idx_BT, cfg: GPTConfig):
    """The normed token embedding before smear (what smear mixes in from the previous token)."""
    return rms_norm(jnp.take(params["wte"], idx_BT, axis=0).astype(cfg.dtype))


def embed(params: Params, idx_BT, cfg: GPTConfig, *, x_prev_B1D=None):
    """Token embedding → compute dtype → RMSNorm → smear. `x_prev_B1D` is the normed embedding of the token
    before idx_BT[:, 0] (KV-cache decoding); without it position 0 gets no smear, as in training."""
    x = token_embedding(params, idx_BT, cfg)
    if cfg.use_smear:
        prev = x[:, :-1] if x_prev_B1D is None else jnp.concatenate([x_prev_B1D.astype(x.dtype), x[:, :-1]], 1)
        cur = x[:, x.shape[1] - prev.shape[1]:]
        gate = params["smear_lambda"].astype(x.dtype) * jax.nn.sigmoid(_mm(cur[..., :SMEAR_CHANNELS],
                                                                           params["smear_gate"]))
        x = jnp.concatenate([x[:, :x.shape[1] - prev.shape[1]], cur + gate * prev], axis=1)
    return x


def attn_qkv(h_BTD, lp_attn, cos, sin, cfg: GPTConfig, ve=None):
    """Projections, value-embedding mix, RoPE, QK-norm, QK scale. `ve` is (ve_BTKd, ve_gate (12, K)) or None.
    Returns q (B,T,H,hd), k and v (B,T,K,hd)."""
    B, T, _ = h_BTD.shape
    H, K, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    q = _mm(h_BTD, lp_attn["wq"]).reshape(B, T, H, hd)
    k = _mm(h_BTD, lp_attn["wk"]).reshape(B, T, K, hd)
    v = _mm(h_BTD, lp_attn["wv"]).reshape(B, T, K, hd)
    if ve is not None:
        ve_BTKd, gate_w = ve
        gate_BTK = 3.0 * jax.nn.sigmoid(_mm(h_BTD[..., :VE_GATE_CHANNELS], gate_w))
        v = v + gate_BTK[..., None] * ve_BTKd.astype(v.dtype).reshape(B, T, K, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k = rms_norm(q), rms_norm(k)
    if cfg.qk_scale != 1.0:
        q, k = q * cfg.qk_scale, k * cfg.qk_scale
    return q, k, v


def mlp(h_BTD, lp_mlp):
    return _mm(jnp.square(jax.nn.relu(_mm(h_BTD, lp_mlp["w_fc"]))), lp_mlp["w_proj"])


def trunk(params: Params, x_BTD, idx_BT, cfg: GPTConfig, *, pos_offset=0):
    """The L blocks (one lax.scan), backout and the final norm. Returns the normed (B, T, D) activations."""
    T = x_BTD.shape[1]
    cos, sin = rope_tables(pos_offset + jnp.arange(T), cfg.head_dim, cfg.rope_base, cfg.dtype)
    distinct = sorted(set(layer_windows(cfg)))

    def attend(q, k, v, layer_xs, kv):
        if cfg.attn_backend == "xla":
            return attention(q, k, v, window=layer_xs["window"], backend="xla"), kv
        # Kernels need a static window: switch between one branch per distinct window (at most S and L).
        branches = [partial(attention, window=w, backend=cfg.attn_backend) for w in distinct]
        if len(branches) == 1:
            return branches[0](q, k, v), kv
        return jax.lax.switch(layer_xs["window_kind"], branches, q, k, v), kv

    return _blocks(params, x_BTD, idx_BT, cfg, cos, sin, attend)[0]


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


def trunk_cached(params: Params, x_BTD, idx_BT, cfg: GPTConfig, cache: KVCache):
    """The same blocks with a KV cache (see KVCache): row b's T tokens sit at positions cache.pos[b] + t. Each
    layer writes its k/v there (the cache is carried through the scan, so the update is in place) and the
    queries attend over the cached keys within their causal window, always with the "xla" attention (per-row
    offsets). A layer whose window w is shorter than the cache reads only the w + T keys the chunk can see.
    Returns (normed activations, cache with the new k/v; pos not advanced)."""
    B, T, _ = x_BTD.shape
    S = cache.k.shape[2]
    pos_B = cache.pos
    pos_BT = pos_B[:, None] + jnp.arange(T)
    cos, sin = rope_tables(pos_BT, cfg.head_dim, cfg.rope_base, cfg.dtype)

    def attend_window(w: int, q, k_BSKd, v_BSKd):
        if w + T >= S:  # the window spans the whole cache
            return attention(q, k_BSKd, v_BSKd, window=w, q_offset=pos_B)
        start_B = jnp.clip(pos_B - w, 0, S - (w + T))
        take = jax.vmap(lambda a, s: jax.lax.dynamic_slice_in_dim(a, s, w + T, axis=0))
        return attention(q, take(k_BSKd, start_B), take(v_BSKd, start_B), window=w, q_offset=pos_B,
                         k_offset=start_B)

    branches = [partial(attend_window, w) for w in sorted(set(layer_windows(cfg)))]
    rows_B1 = jnp.arange(B)[:, None]

    def attend(q, k, v, layer_xs, kv):
        k_cache, v_cache = kv
        layer = layer_xs["layer"]
        # Writes past the end of the cache are dropped (never clamped onto the last slot).
        k_cache = k_cache.at[layer, rows_B1, pos_BT].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[layer, rows_B1, pos_BT].set(v.astype(v_cache.dtype), mode="drop")
        args = (q, k_cache[layer], v_cache[layer])
        y = branches[0](*args) if len(branches) == 1 else jax.lax.switch(layer_xs["window_kind"], branches, *args)
        return y, (k_cache, v_cache)

    x, (k, v) = _blocks(params, x_BTD, idx_BT, cfg, cos, sin, attend, kv=(cache.k, cache.v))
    return x, cache._replace(k=k, v=v)


def _blocks(params: Params, x_BTD, idx_BT, cfg: GPTConfig, cos, sin, attend, kv=None):
    """The one copy of the block stack, shared by training and cached decoding: the L blocks as one lax.scan,
    then backout and the final norm. `attend(q, k, v, layer_xs, kv) -> (y, kv)` is what differs: training
    attends within the chunk (kv is None); decoding writes into and reads from the cache `kv`, which rides
    in the scan carry. Returns (normed (B, T, D) activations, kv)."""
    B, T, D = x_BTD.shape
    L, cdt = cfg.n_layer, cfg.dtype
    x0 = x_BTD

    # Per-layer static structure becomes scanned arrays.
    windows = layer_windows(cfg)
    distinct = sorted(set(windows))
    xs = {
        "blocks": params["blocks"],
        "window": jnp.asarray(windows, jnp.int32),
        "window_kind": jnp.asarray([distinct.index(w) for w in windows], jnp.int32),
        "layer": jnp.arange(L, dtype=jnp.int32),
    }
    if cfg.use_lambdas:
        xs["resid"], xs["x0"] = params["resid_lambdas"], params["x0_lambdas"]

    def block(carry, layer_xs, ve_table=None, ve_gate=None):
        x, x_backout, kv = carry
        if cfg.use_lambdas:
            x = layer_xs["resid"].astype(cdt) * x + layer_xs["x0"].astype(cdt) * x0
        ve = None if ve_table is None else (jnp.take(ve_table, idx_BT, axis=0), ve_gate)
        lp = layer_xs["blocks"]
        q, k, v = attn_qkv(rms_norm(x), lp["attn"], cos, sin, cfg, ve)
        y, kv = attend(q, k, v, layer_xs, kv)
        y = y.reshape(B, T, cfg.n_head * cfg.head_dim)
        x = x + _mm(y, lp["attn"]["wo"])
        x = x + mlp(rms_norm(x), lp["mlp"])
        if cfg.use_backout:  # keep the residual after block L//2
            x_backout = jnp.where(layer_xs["layer"] == L // 2, x, x_backout)
        return x, x_backout, kv

    if cfg.remat and kv is None:  # remat only matters under a gradient
        block = jax.checkpoint(block, prevent_cse=False)
    layer_i = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    carry = (x_BTD, jnp.zeros_like(x_BTD) if cfg.use_backout else None, kv)
    if not cfg.use_value_embeds:
        carry, _ = jax.lax.scan(lambda c, lx: (block(c, lx), None), carry, xs)
    else:
        # VE layers alternate and include the last one, so the scan runs over (no-VE, VE) layer pairs and
        # each pair's VE table is a scanned slice: no padding parameters, no work in non-VE layers, and the
        # table's gradient comes out as a stacked scan output. (Gathering from the closed-over stacked
        # table by a per-layer index instead makes the backward add a dense table-sized cotangent into an
        # accumulator at every layer: ~2.4 GB of memory traffic per layer at d24.) With odd depth, layer 0
        # (which has VE) runs on its own first; the pairs then see a slice of the stacked block params.
        lone = L % 2
        if lone:
            carry = block(carry, layer_i(xs, 0), params["value_embeds"][0], params["ve_gate"][0])
        pairs = jax.tree.map(lambda a: a[lone:].reshape((L - lone) // 2, 2, *a.shape[1:]), xs)
        tables = (params["value_embeds"][lone:], params["ve_gate"][lone:])

        def pair(c, pair_xs):
            lx, (table, gate) = pair_xs
            c = block(c, layer_i(lx, 0))
            return block(c, layer_i(lx, 1), table, gate), None

        carry, _ = jax.lax.scan(pair, carry, (pairs, tables))
    x, x_backout, kv = carry
    if cfg.use_backout:
        x = x - params["backout_lambda"].astype(cdt) * x_backout
    return rms_norm(x), kv


def logits_from_hidden(params: Params, x_BTD, cfg: GPTConfig):
    """lm_head in the compute dtype, crop the vocab padding, then the softcap in fp32."""
    logits = _mm(x_BTD, params["lm_head"])[..., :cfg.vocab_size].astype(jnp.float32)
    if cfg.softcap:
        logits = cfg.softcap * jnp.tanh(logits / cfg.softcap)
    return logits


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


def forward(params: Params, idx_BT, cfg: GPTConfig, *, targets_BT=None, loss_reduction: str = "mean",
            pos_offset=0):
    """Logits (B, T, vocab_size) in fp32, or the loss when targets_BT is given. pos_offset shifts the RoPE
    positions (attention still sees only this chunk; forward_cached is the KV-cache version)."""
    x = embed(params, idx_BT, cfg)
    x = trunk(params, x, idx_BT, cfg, pos_offset=pos_offset)
    logits = logits_from_hidden(params, x, cfg)
    if targets_BT is None:
        return logits
    return cross_entropy(logits, targets_BT, loss_reduction)


def forward_cached(params: Params, idx_BT, cfg: GPTConfig, cache: KVCache, *, lengths_B=None, prev_idx_B=None):
    """A chunk of tokens through the model with a KV cache: a prefill (empty cache, right-padded prompts) or a
    decode step (T = 1). Row b's tokens idx_BT[b, :lengths_B[b]] (all T when lengths_B is None) take positions
    cache.pos[b] + t. prev_idx_B is the token just before idx_BT[:, 0], for smear; None when the cache is empty
    (position 0 has no previous token). Returns fp32 logits (B, vocab_size) of each row's last valid token and
    the cache with pos advanced by the row's length. Padding tokens are written to the cache too, past the
    row's new pos, where they are overwritten before anything reads them."""
    B, T = idx_BT.shape
    x_prev = token_embedding(params, prev_idx_B[:, None], cfg) if prev_idx_B is not None and cfg.use_smear else None
    x = embed(params, idx_BT, cfg, x_prev_B1D=x_prev)
    x, cache = trunk_cached(params, x, idx_BT, cfg, cache)
    n_B = jnp.full((B,), T, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B, jnp.int32)
    logits = logits_from_hidden(params, x[jnp.arange(B), n_B - 1], cfg)
    return logits, cache._replace(pos=cache.pos + n_B)


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
