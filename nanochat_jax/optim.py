"""Optimizer: Muon (Polar Express + NorMuon + cautious WD) for matrices, AdamW for the rest, as one optax chain.

Mirrors nanochat/optim.py, nanochat/gpt.py `GPT.setup_optimizer` and the schedules and scaling rules of
scripts/base_train.py. `muon` and `adamw` read their schedules from their own step count (no host-side updates in
a jitted step). Our weights are (in, out), PyTorch's (out, in): below `out = shape[-1]`, `in = shape[-2]`, and every
choice (wide/tall form, MuonEq and NorMuon axes, lr aspect factor) makes our update the reference's transposed.
Leading axes (layers, value-embedding index) are batch axes. Our own Muon, because optax.contrib.muon has no
NorMuon, MuonEq/Muon+ or cautious weight decay (and it bias-corrects its momentum and normalises differently).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanochat_jax.common import path_str
from nanochat_jax.config import require


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyperparameters. LRs are the CLI values at the reference batch (2**19 tokens);
    `batch_lr_scale` (and `init_lr_frac`, used by SFT/RL) multiply them as base_train/chat_sft do."""

    num_iterations: int                  # N: the schedules' horizon
    model_dim: int                       # C: AdamW lrs of embeddings/lm_head scale by (C/768)^-0.5
    matrix_lr: float = 0.02              # Muon
    embedding_lr: float = 0.3            # wte (value_embeds get half)
    unembedding_lr: float = 0.008        # lm_head
    scalar_lr: float = 0.5               # x0_lambdas (resid_lambdas get 0.01x)
    weight_decay: float = 0.28           # Muon WD at the reference batch/horizon (the CLI flag)
    weight_decay_scaled: float | None = None  # Muon WD actually used (see scaled_weight_decay); None = weight_decay
    batch_lr_scale: float = 1.0          # sqrt(B / 2**19), see batch_lr_scale()
    init_lr_frac: float = 1.0            # multiplies every group's lr (chat_sft 0.8, chat_rl 0.05)
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    # Muon momentum: start -> peak over warmup steps, peak, then peak -> final during the LR warmdown.
    muon_momentum_start: float = 0.85
    muon_momentum_peak: float = 0.97
    muon_momentum_warmup_steps: int = 400
    muon_momentum_final: float = 0.90
    muon_beta2: float = 0.9              # NorMuon second-moment decay
    muon_ns_steps: int = 5
    muon_classic: bool = False           # classic Muon: quintic Newton-Schulz, no MuonEq/Muon+/NorMuon/WD
    muon_eq: bool = True                 # MuonEq row equalisation before orthogonalisation (current)
    muon_plus: bool = True               # Muon+ Frobenius renormalisation after it (current)
    muon_ortho_dtype: str = "bfloat16"   # orthogonaliser dtype; "float32" (HIGHEST precision) for tests
    adamw_state_fp32: bool = False       # False: moments stored in the param dtype (bf16 for wte/VE), as current
    # "classic": the October 2025 AdamW (nanochat/adamw.py, `DistAdamW`), see group_settings and adamw.
    adamw_style: str = "current"         # "current" (per-group betas/wd) or "classic"
    adamw_weight_decay: float = 0.0      # classic AdamW weight decay (classic base_train's --weight_decay)
    # Schedules. "reference" = base_train's (see lr_multiplier/muon_momentum/muon_weight_decay below).
    lr_schedule: str = "reference"       # or "constant": multiplier 1 at every step
    muon_momentum_schedule: str = "reference"  # or "constant": muon_momentum_peak at every step
    weight_decay_schedule: str = "cosine"      # or "constant": the (scaled) weight decay at every step
    grad_clip: float = 0.0               # > 0: clip the global grad norm first (torch clip_grad_norm_); 0 = off

    def __post_init__(self):
        def need(cond: bool, msg: str):
            require(cond, f"OptimConfig: {msg}")

        need(self.num_iterations > 0,
             f"num_iterations must be > 0, got {self.num_iterations} (compute it with horizon())")
        need(self.model_dim > 0, f"model_dim must be > 0, got {self.model_dim}")
        for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay", "batch_lr_scale",
                     "init_lr_frac", "warmup_steps", "muon_momentum_warmup_steps", "adamw_weight_decay", "grad_clip"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.weight_decay_scaled is None or self.weight_decay_scaled >= 0,
             f"weight_decay_scaled must be >= 0 or None, got {self.weight_decay_scaled}")
        for name in ("warmdown_ratio", "final_lr_frac"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("muon_momentum_start", "muon_momentum_peak", "muon_momentum_final", "muon_beta2"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        max_steps = 10**6 if self.muon_classic else len(POLAR_EXPRESS_COEFFS)
        need(1 <= self.muon_ns_steps <= max_steps,
             f"muon_ns_steps must be in [1, {max_steps}] (Polar Express has {len(POLAR_EXPRESS_COEFFS)} tuned "
             f"coefficient sets), got {self.muon_ns_steps}")
        for name, allowed in (("adamw_style", ("current", "classic")), ("lr_schedule", ("reference", "constant")),
                              ("muon_momentum_schedule", ("reference", "constant")),
                              ("weight_decay_schedule", ("cosine", "constant")),
                              ("muon_ortho_dtype", ("bfloat16", "float32"))):
            need(getattr(self, name) in allowed, f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def classic(cls, num_iterations: int, model_dim: int, **overrides) -> "OptimConfig":
        """The October 2025 optimizer as its scripts/base_train.py set it up: classic Muon (lr 0.02, momentum
        0.85 -> 0.95 over 300 steps, then constant), the classic AdamW groups (embedding lr 0.2, unembedding
        0.004, no weight decay), no lr warmup, a linear warmdown over the last 20% to 0, grad clip 1.0."""
        fields = dict(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0,
                      warmup_steps=0, warmdown_ratio=0.2, final_lr_frac=0.0, muon_momentum_start=0.85,
                      muon_momentum_peak=0.95, muon_momentum_warmup_steps=300, muon_momentum_final=0.95,
                      muon_classic=True, adamw_style="classic", adamw_weight_decay=0.0, grad_clip=1.0)
        return cls(num_iterations=num_iterations, model_dim=model_dim, **{**fields, **overrides})

    @property
    def effective_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay_scaled is None else self.weight_decay_scaled


# The group table: (path glob, group, expected ndim), first match wins. fnmatch's "*" also matches "/".
PARAM_GROUP_RULES: tuple[tuple[str, str, int], ...] = (
    ("blocks/*", "muon", 3),             # (L, in, out) block matrices
    ("ve_gate", "muon", 3),              # (NV, 12, K): in transformer.h in the reference, hence Muon
    ("lm_head", "lm_head", 2),
    ("wte", "wte", 2),
    ("value_embeds", "value_embeds", 3),
    ("resid_lambdas", "resid_lambdas", 1),
    ("x0_lambdas", "x0_lambdas", 1),
    ("smear_gate", "fixed", 2),          # smear/backout scalars: fixed lr 0.2, no dls/bls
    ("smear_lambda", "fixed", 0),
    ("backout_lambda", "fixed", 0),
)


class AdamWGroup(NamedTuple):
    lr: float
    b1: float
    b2: float
    eps: float
    wd: float
    classic: bool = False  # the classic update formula (see OptimConfig.adamw_style)


class MuonGroup(NamedTuple):
    lr: float                            # before the per-matrix aspect factor sqrt(max(1, out/in))


def group_settings(cfg: OptimConfig) -> dict[str, AdamWGroup | MuonGroup]:
    """Per-group hyperparameters (nanochat/gpt.py, `GPT.setup_optimizer`) at lr multiplier 1.
    adamw_style="classic" keeps the lrs and gives every AdamW group the classic betas (0.8, 0.95), eps 1e-10,
    adamw_weight_decay and update formula."""
    dls = (cfg.model_dim / 768) ** -0.5  # AdamW lrs were tuned at d12 (C=768)
    s = cfg.batch_lr_scale * cfg.init_lr_frac
    groups = {
        "lm_head": AdamWGroup(cfg.unembedding_lr * s * dls, 0.8, 0.96, 1e-10, 0.01),
        "wte": AdamWGroup(cfg.embedding_lr * s * dls, 0.8, 0.995, 1e-10, 0.001),
        "value_embeds": AdamWGroup(cfg.embedding_lr * s * dls * 0.5, 0.8, 0.995, 1e-10, 0.01),
        "resid_lambdas": AdamWGroup(cfg.scalar_lr * s * 0.01, 0.8, 0.95, 1e-10, 0.05),
        "x0_lambdas": AdamWGroup(cfg.scalar_lr * s, 0.96, 0.95, 1e-10, 0.0),
        "fixed": AdamWGroup(0.2 * cfg.init_lr_frac, 0.8, 0.95, 1e-10, 0.0),
        "muon": MuonGroup(cfg.matrix_lr * s),
    }
    if cfg.adamw_style == "classic":
        groups = {name: g if isinstance(g, MuonGroup) else AdamWGroup(g.lr, 0.8, 0.95, 1e-10, cfg.adamw_weight_decay,
                                                                      classic=True)
                  for name, g in groups.items()}
    return groups


def group_of(path: str, ndim: int | None = None) -> str:
    """The optimizer group of one parameter path; ValueError if no rule matches (or the ndim is wrong)."""
    for pattern, group, want_ndim in PARAM_GROUP_RULES:
        if fnmatch.fnmatchcase(path, pattern):
            if ndim is not None and ndim != want_ndim:
                raise ValueError(f"parameter {path!r} has {ndim} dims but group {group!r} expects {want_ndim} "
                                 f"(rule {pattern!r} in optim.PARAM_GROUP_RULES); fix the model layout or the rule")
            return group
    known = ", ".join(p for p, _, _ in PARAM_GROUP_RULES)
    raise ValueError(f"parameter {path!r} matches no optimizer group (known: {known}); "
                     f"add a rule to optim.PARAM_GROUP_RULES")


def param_groups(params) -> Any:
    """Pytree of group labels shaped like `params` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: group_of(path_str(p), len(x.shape)), params)


def muon_lr_factor(shape) -> float:
    """Reference: max(1, rows/cols)^0.5 on the (out, in) weight; ours is (in, out), so out/in = shape[-1]/shape[-2]."""
    return max(1.0, shape[-1] / shape[-2]) ** 0.5


def param_lrs(params, cfg: OptimConfig) -> Any:
    """Pytree of each parameter's lr at multiplier 1 (Muon includes the aspect factor). For logging and tests."""
    settings = group_settings(cfg)
    return jax.tree.map(lambda group, x: settings[group].lr * (muon_lr_factor(x.shape) if group == "muon" else 1),
                        param_groups(params), params)


# ----------------------------------------------------------------------------------------------
# Schedules of the step index `it` (0 for the first update): numpy on host numbers (logging, no device round
# trip), jnp on traced arrays (inside the optimizer). N = num_iterations, W = round(warmdown_ratio * N).


def _xp(it):
    """(array module, it as float32): jnp for JAX arrays and tracers, numpy for host numbers."""
    xp = jnp if isinstance(it, jax.Array) else np
    return xp, xp.asarray(it, xp.float32)


def lr_multiplier(cfg: OptimConfig, it):
    """(it+1)/warmup during warmup; 1 until it <= N-W; then linear to final_lr_frac at it = N.
    lr_schedule="constant": 1."""
    xp, it = _xp(it)
    if cfg.lr_schedule == "constant":
        return xp.ones_like(it)
    n, w = cfg.num_iterations, round(cfg.warmdown_ratio * cfg.num_iterations)
    warm = (it + 1) / max(cfg.warmup_steps, 1)
    progress = (n - it) / max(w, 1)
    down = progress + (1 - progress) * cfg.final_lr_frac
    return xp.where(it < cfg.warmup_steps, warm, xp.where(it <= n - w, 1.0, down))


def muon_momentum(cfg: OptimConfig, it, complement: bool = False):
    """start->peak over the first muon_momentum_warmup_steps (takes precedence), peak, then peak->final from N-W.
    muon_momentum_schedule="constant": muon_momentum_peak. complement: see muon_momentum_complement."""
    xp, it = _xp(it)
    start, peak, final = cfg.muon_momentum_start, cfg.muon_momentum_peak, cfg.muon_momentum_final
    if complement:
        start, peak, final = 1 - start, 1 - peak, 1 - final
    if cfg.muon_momentum_schedule == "constant":
        return xp.full_like(it, peak)
    n, w = cfg.num_iterations, round(cfg.warmdown_ratio * cfg.num_iterations)
    frac = it / max(cfg.muon_momentum_warmup_steps, 1)
    warm = (1 - frac) * start + frac * peak
    progress = (it - (n - w)) / max(w, 1)
    down = peak * (1 - progress) + final * progress
    return xp.where(it < cfg.muon_momentum_warmup_steps, warm, xp.where(it >= n - w, down, peak))


def muon_momentum_complement(cfg: OptimConfig, it):
    """1 - muon_momentum(cfg, it) from the complements of the constants, not 1 minus a rounded fp32 momentum.
    The classic Muon got `1 - momentum` from Python floats (exact to fp32), the current one from an fp32 tensor;
    our classic Muon uses this so its momentum buffer rounds like the classic's."""
    return muon_momentum(cfg, it, complement=True)


def muon_weight_decay(cfg: OptimConfig, it):
    """Cosine from the (scaled) weight decay to 0 at it = N. weight_decay_schedule="constant": the weight decay."""
    xp, it = _xp(it)
    if cfg.weight_decay_schedule == "constant":
        return xp.full_like(it, cfg.effective_weight_decay)
    return cfg.effective_weight_decay * 0.5 * (1 + xp.cos(xp.pi * it / cfg.num_iterations))


def current_hyperparams(cfg: OptimConfig, step: int) -> dict[str, float]:
    """What the optimizer uses at `step` (host floats, for logging)."""
    return {"lrm": float(lr_multiplier(cfg, step)), "muon_momentum": float(muon_momentum(cfg, step)),
            "muon_weight_decay": float(muon_weight_decay(cfg, step))}


# ----------------------------------------------------------------------------------------------
# AdamW (nanochat/optim.py, `adamw_step_fused`). Our own, because optax.adamw does bf16 params' moment math in
# bf16, the reference in fp32 (for fp32 params the two agree; tests check that).


class MomentState(NamedTuple):
    """AdamW: both moments, stored in the param dtype like the reference (bf16 for wte/value_embeds: halves that
    state, though a bf16 v moves in whole ulps at b2 = 0.995) unless state_fp32. Muon: fp32 momentum mu and the
    NorMuon factored second moment nu, (..., 1, out) or (..., in, 1), unused when classic."""
    count: jax.Array  # int32 step index of the next update
    mu: Any
    nu: Any


def adamw(lr: float, b1: float, b2: float, eps: float, wd: float, lr_schedule: Callable[[jax.Array], jax.Array],
          state_fp32: bool = False, classic: bool = False) -> optax.GradientTransformation:
    """AdamW at lr·lr_schedule(step): fp32 math, decoupled wd before the update, returns p_new - p in fp32.
    classic: nanochat/adamw.py's `DistAdamW` update, m / (sqrt(v) + eps) · lr·sqrt(1-b2^t)/(1-b1^t) (eps not
    bias-corrected); otherwise nanochat/optim.py's `adamw_step_fused`, m / (sqrt(v/(1-b2^t)) + eps) · lr/(1-b1^t)."""
    def init_fn(params):
        zeros = lambda p: jnp.zeros(p.shape, jnp.float32 if state_fp32 else p.dtype)
        return MomentState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update_fn(grads, state, params=None):
        if params is None:
            raise ValueError("adamw needs params (decoupled weight decay): call tx.update(grads, state, params)")
        t = (state.count + 1).astype(jnp.float32)
        lr_t = lr * lr_schedule(state.count)
        step_size = lr_t / (1 - b1**t)
        bias2 = 1 - b2**t

        def leaf(g, p, m, v):
            g32, p32 = g.astype(jnp.float32), p.astype(jnp.float32)
            m32 = _lerp(m.astype(jnp.float32), g32, 1 - b1)
            v32 = _lerp(v.astype(jnp.float32), g32 * g32, 1 - b2)
            # The new parameter in the reference's order of operations (decay, then the step), so fp32 rounds
            # as it does; the update is then the exact difference (p + u gives that new parameter back).
            decayed = p32 * (1 - lr_t * wd)
            if classic:
                new = decayed - (step_size * jnp.sqrt(bias2)) * (m32 / (jnp.sqrt(v32) + eps))
            else:
                new = decayed - step_size * (m32 / (jnp.sqrt(v32 / bias2) + eps))
            u = new - p32
            return u, m32.astype(m.dtype), v32.astype(v.dtype)

        out = jax.tree.map(leaf, grads, params, state.mu, state.nu)
        return _split3(grads, out, state)

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------
# Muon (nanochat/optim.py, `muon_step_fused`)

# Polar Express (Amsel et al. 2025, arXiv:2505.16932), num_iters=5, safety 2e-2, cushion 2: one (a, b, c) per step.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller's quintic (classic), same every step


def _fro_norm(x: jax.Array) -> jax.Array:
    """Frobenius norm over the last two axes, in fp32, keepdims."""
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))


def scale(s: float, x: jax.Array) -> jax.Array:
    """s * x as PyTorch computes a Python scalar times a tensor: the scalar kept exact (fp32 op-math) and only
    the product rounded to x's dtype. JAX would round s to x's dtype first when x is bf16 (the classic quintic
    would then run with 3.4375 instead of 3.4445)."""
    return (x.astype(jnp.float32) * jnp.float32(s)).astype(x.dtype)


def shift(x: jax.Array, s: float) -> jax.Array:
    """x + s with an exact scalar, rounded once to x's dtype (as `scale`)."""
    return (x.astype(jnp.float32) + jnp.float32(s)).astype(x.dtype)


def orthogonalize(x: jax.Array, *, classic: bool = False, steps: int = 5, dtype=jnp.bfloat16) -> jax.Array:
    """Approximate the polar factor U V^T of each (..., in, out) matrix; returns `dtype`.

    Polar Express: x / (‖x‖_F·1.01 + 1e-6), then per-step odd quintics. Classic: x / (‖x‖_F + 1e-7) and
    Keller's fixed quintic. p(X) = aX + (bA + cA²)X is transpose-equivariant, so the Gram side only changes cost
    and rounding; we use the reference's (smaller) side: A = XᵀX (its out×out) when out <= in, ties included,
    else A = XXᵀ. In bf16 every op rounds to bf16 as eager PyTorch does (nanochat/optim.py `muon_step_fused`,
    nanochat/muon.py `zeropower_via_newtonschulz5`): matmuls accumulate in fp32 and round once, scalars stay exact
    (`scale`), sums round once. The cA² term follows each reference: current c * (A @ A), classic (c * A) @ A.
    """
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    mm = lambda a, b: jnp.matmul(a, b, precision=precision, preferred_element_type=jnp.float32).astype(dtype)
    xT = lambda a: jnp.swapaxes(a, -1, -2)
    x = x.astype(dtype)
    norm = _fro_norm(x).astype(dtype)  # torch: X.norm() of a bf16 tensor (fp32 accumulate, bf16 result)
    denom = shift(norm, 1e-7) if classic else shift(scale(1.01, norm), 1e-6)
    x = (x.astype(jnp.float32) / denom.astype(jnp.float32)).astype(dtype)
    coeffs = [NEWTON_SCHULZ_COEFFS] * steps if classic else POLAR_EXPRESS_COEFFS[:steps]
    gram_out = x.shape[-1] <= x.shape[-2]  # reference "wide" (rows=out <= cols=in)
    for a, b, c in coeffs:
        A = mm(xT(x), x) if gram_out else mm(x, xT(x))
        B = _add(scale(b, A), mm(scale(c, A), A) if classic else scale(c, mm(A, A)))
        # Current keeps its (out, in) X = our xᵀ in both forms, so its B @ X (X @ B) is x @ Bᵀ (Bᵀ @ x) here.
        # Classic transposes a tall X to wide itself, which for out > in is our x as is: B @ x. Classic's B is not
        # exactly symmetric after rounding ((c * A) @ A), so which side is transposed matters bit for bit.
        Bt = B if (classic and not gram_out) else xT(B)
        x = _add(scale(a, x), mm(x, Bt) if gram_out else mm(Bt, x))
    return x


def _add(u: jax.Array, v: jax.Array) -> jax.Array:
    """u + v computed in fp32 and rounded once to their dtype (what bf16 + bf16 is in PyTorch)."""
    return (u.astype(jnp.float32) + v.astype(jnp.float32)).astype(u.dtype)


def _muon_eq(x: jax.Array) -> jax.Array:
    """MuonEq: scale each output neuron (reference row = our column, norm over axis -2) to the RMS neuron norm
    ‖X‖_F/sqrt(out). Norms in fp32, the scaled product in x's dtype, as the reference."""
    target = _fro_norm(x) / math.sqrt(x.shape[-1])
    xf = x.astype(jnp.float32)
    neuron_norm = jnp.maximum(jnp.sqrt(jnp.sum(xf * xf, axis=-2, keepdims=True)), 1e-6)
    return x * (target / neuron_norm).astype(x.dtype)


def _normuon_axis(shape) -> int:
    """NorMuon averages over the smaller of (out, in). Reference: red_dim=-1 (in) if rows >= cols (out >= in)
    else -2 (out); in our (in, out) layout `in` is axis -2 and `out` axis -1."""
    return -2 if shape[-1] >= shape[-2] else -1


def _normuon(g: jax.Array, v: jax.Array, beta2) -> tuple[jax.Array, jax.Array]:
    """Factored second moment over the reduced axis, rsqrt step, then renormalise to the incoming ‖g‖_F."""
    axis = _normuon_axis(g.shape)
    n_red = g.shape[axis]
    v_mean = jnp.mean(g * g, axis=axis, keepdims=True)
    v_norm = jnp.sqrt(jnp.sum(v_mean, axis=(-2, -1), keepdims=True) * n_red)  # = ‖g‖_F
    v = _lerp(v, v_mean, 1 - beta2)
    step = jax.lax.rsqrt(jnp.maximum(v, 1e-10))
    v_norm_new = jnp.sqrt(jnp.sum(v_mean * n_red * step * step, axis=(-2, -1), keepdims=True))  # = ‖g·step‖_F
    return g * (step * (v_norm / jnp.maximum(v_norm_new, 1e-10))), v


def muon(lr: float, lr_schedule: Callable, momentum_schedule: Callable, wd_schedule: Callable, *,
         beta2: float = 0.9, ns_steps: int = 5, classic: bool = False, use_muon_eq: bool = True,
         use_muon_plus: bool = True, ortho_dtype=jnp.bfloat16,
         momentum_complement: Callable | None = None) -> optax.GradientTransformation:
    """Muon on (..., in, out) leaves, returning p_new - p in fp32. Current: Nesterov (lerp) -> bf16 -> [MuonEq] ->
    Polar Express -> fp32 -> [Muon+] -> NorMuon -> p -= lr·g + lr·wd·p·[g·p >= 0] with lr = lr·sqrt(max(1, out/in)).
    Classic: Nesterov -> Newton-Schulz -> p -= lr·g."""
    def init_fn(params):
        for p in jax.tree.leaves(params):
            if len(p.shape) < 2:
                raise ValueError(f"muon needs matrices (..., in, out), got shape {p.shape}; route it to AdamW")

        def nu_zeros(p):
            shape = list(p.shape)
            shape[_normuon_axis(p.shape)] = 1
            return jnp.zeros(shape, jnp.float32)

        mu = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return MomentState(jnp.zeros([], jnp.int32), mu, jax.tree.map(nu_zeros, params))

    def update_fn(grads, state, params=None):
        if params is None:
            raise ValueError("muon needs params (cautious weight decay): call tx.update(grads, state, params)")
        lr_t = lr * lr_schedule(state.count)
        momentum = momentum_schedule(state.count)
        one_minus = (1 - momentum) if momentum_complement is None else momentum_complement(state.count)
        wd = wd_schedule(state.count)

        def leaf(g, p, buf, v):
            g = g.astype(jnp.float32)
            buf = _torch_lerp(buf, g, one_minus)
            g = _torch_lerp(g, buf, momentum)  # Nesterov
            x = g.astype(ortho_dtype)
            if use_muon_eq and not classic:
                x = _muon_eq(x)
            g = orthogonalize(x, classic=classic, steps=ns_steps, dtype=ortho_dtype).astype(jnp.float32)
            lr_p = lr_t * muon_lr_factor(p.shape)
            if classic:
                return -lr_p * g, buf, v
            if use_muon_plus:  # snap ‖g‖_F to sqrt(min(in, out)), the norm of an exact semi-orthogonal matrix
                g = g * (math.sqrt(min(g.shape[-2:])) / jnp.maximum(_fro_norm(g), 1e-6))
            g, v = _normuon(g, v, beta2)
            p32 = p.astype(jnp.float32)
            decay = jnp.where(g * p32 >= 0, p32, 0.0)  # cautious: decay only where it agrees with the update
            return -(lr_p * g + lr_p * wd * decay), buf, v

        out = jax.tree.map(leaf, grads, params, state.mu, state.nu)
        return _split3(grads, out, state)

    return optax.GradientTransformation(init_fn, update_fn)


def _lerp(a, b, w):
    return a + w * (b - a)


def _torch_lerp(a, b, w):
    """torch.lerp's formula: a + w(b - a) for w < 0.5, else b - (b - a)(1 - w). The two round differently in
    fp32, and Muon's Nesterov step (w = momentum >= 0.5) feeds a bf16 cast that the difference can flip."""
    return jnp.where(w < 0.5, a + w * (b - a), b - (b - a) * (1 - w))


def _split3(grads, out, state: MomentState):
    """(updates, next state) from `out`, a tree shaped like grads whose leaves are (update, mu, nu) triples."""
    updates, mu, nu = jax.tree.transpose(jax.tree.structure(grads), jax.tree.structure((0, 0, 0)), out)
    return updates, MomentState(optax.safe_increment(state.count), mu, nu)


# ----------------------------------------------------------------------------------------------
# The whole optimizer


def build_optimizer(params, cfg: OptimConfig, lr_schedule: Callable | None = None) -> optax.GradientTransformation:
    """optax.partition of Muon + per-group AdamW over `param_groups(params)`, schedules inside.

    Use: state = tx.init(params); updates, state = tx.update(grads, state, params);
    params = optax.apply_updates(params, updates)  (fp32 updates, cast back to each param's dtype).
    `lr_schedule(step) -> multiplier` replaces the base-training lr_multiplier (e.g. for SFT/RL schedules).
    """
    if isinstance(params, dict) and "wte" in params and params["wte"].shape[-1] != cfg.model_dim:
        raise ValueError(f"OptimConfig.model_dim={cfg.model_dim} but wte has dim {params['wte'].shape[-1]}; "
                         f"pass the model's n_embd")
    labels = param_groups(params)
    settings = group_settings(cfg)
    lr_sched = lr_schedule or (lambda it: lr_multiplier(cfg, it))
    transforms = {}
    for group in sorted(set(jax.tree.leaves(labels))):
        s = settings[group]
        if isinstance(s, MuonGroup):
            transforms[group] = muon(
                s.lr, lr_sched, lambda it: muon_momentum(cfg, it), lambda it: muon_weight_decay(cfg, it),
                beta2=cfg.muon_beta2, ns_steps=cfg.muon_ns_steps, classic=cfg.muon_classic,
                use_muon_eq=cfg.muon_eq, use_muon_plus=cfg.muon_plus, ortho_dtype=jnp.dtype(cfg.muon_ortho_dtype),
                momentum_complement=(lambda it: muon_momentum_complement(cfg, it)) if cfg.muon_classic else None)
        else:
            transforms[group] = adamw(s.lr, s.b1, s.b2, s.eps, s.wd, lr_sched, state_fp32=cfg.adamw_state_fp32,
                                      classic=s.classic)
    tx = optax.partition(transforms, labels)
    return optax.chain(clip_grad_norm(cfg.grad_clip), tx) if cfg.grad_clip > 0 else tx


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale every gradient by min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the global
    L2 norm in fp32 (optax.clip_by_global_norm has no 1e-6 and divides by the norm itself)."""
    def update_fn(grads, state, params=None):
        del params
        leaves = jax.tree.leaves(grads)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))
        coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g.astype(jnp.float32) * coef).astype(g.dtype), grads), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# ----------------------------------------------------------------------------------------------
# Scaling rules (nanochat's scripts/base_train.py). Reference model d12; B_REF = 2**19 tokens.
# d_ref = target_param_data_ratio * scaling_params(d12 model with the same vocab/architecture);
# scaling params = transformer matrices (incl. ve_gate) + lm_head.

B_REF = 2**19


def target_tokens(target_param_data_ratio: float, scaling_params: int) -> int:
    return int(target_param_data_ratio * scaling_params)


def auto_batch_size(target_tokens: int, d_ref: float, b_ref: int = B_REF) -> int:
    """Power Lines: B ∝ D^0.383, rounded to the nearest power of two."""
    return 2 ** round(math.log2(b_ref * (target_tokens / d_ref) ** 0.383))


def batch_lr_scale(total_batch_size: int, b_ref: int = B_REF) -> float:
    """lr ∝ sqrt(B / B_ref) (applied to all four CLI lrs, not to the fixed smear/backout lr)."""
    return (total_batch_size / b_ref) ** 0.5


def scaled_weight_decay(total_batch_size: int, target_tokens: int, d_ref: float, weight_decay: float = 0.28,
                        b_ref: int = B_REF) -> float:
    """T_epoch rule: wd · sqrt(B/B_ref) · (D_ref/D)."""
    return weight_decay * math.sqrt(total_batch_size / b_ref) * (d_ref / target_tokens)


def horizon(*, total_batch_size: int, num_iterations: int = -1, target_flops: float = -1.0,
            target_param_data_ratio: float = 12.0, scaling_params: int | None = None,
            flops_per_token: float | None = None) -> int:
    """num_iterations in the reference's precedence: --num-iterations, else --target-flops, else data:param ratio."""
    if num_iterations > 0:
        return num_iterations
    if target_flops > 0:
        if not flops_per_token:
            raise ValueError("horizon: target_flops needs flops_per_token")
        return round(target_flops / (flops_per_token * total_batch_size))
    if target_param_data_ratio > 0:
        if not scaling_params:
            raise ValueError("horizon: target_param_data_ratio needs scaling_params")
        return target_tokens(target_param_data_ratio, scaling_params) // total_batch_size
    raise ValueError("horizon: set one of --num-iterations, --target-flops or --target-param-data-ratio (> 0)")
