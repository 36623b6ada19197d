"""FlashAttention-2 in Pallas (Triton path), forward and backward, in the model's (B, T, H, D) layout.

    o = flash_attention(q_BTHD, k_BSKD, v_BSKD, causal=True, window=None)     # differentiable

Plain attention builds the (T, S) matrix P = softmax(scale * q k^T), then o = P v: at T = S = 2048 and 16 heads,
64M floats per sequence through GPU memory (HBM), several times. Flash attention never builds it: each program
owns a block of queries and walks over blocks of keys, keeping its state on chip. For one query row, softmax is
exp(s_j - m) / l with m = max_j s_j and l = sum_j exp(s_j - m); the *online softmax* keeps running m, l and
acc = sum exp(s - m) * v, and when a block raises the max from m to m' rescales them by alpha = exp(m - m'):

    m' = max(m, rowmax(s_blk));  p = exp(s_blk - m');  l = alpha * l + rowsum(p);  acc = alpha * acc + p @ v_blk

and at the end o = acc / l. The saved lse = m + log(l) lets the backward recompute a block of P as exp(s - lse).
Backward (FlashAttention-2), with delta = rowsum(o * dO), in two kernels so that each output block has one owner:

    dP = dO v^T,   dS = P * (dP - delta),   dQ = scale * dS k,   dK = scale * dS^T q,   dV = P^T dO

dK/dV over key blocks (looping over the query blocks, and the H/K query heads of its kv head, that see its keys),
dQ over query blocks. Query p sees key k iff k < S (not padding), k <= p when causal and k >= p - w for a left
window w; both start at 0, like gpt.attention. `kv_block_range`/`q_block_range` give each program its blocks:
those with nothing visible are never loaded, fully visible ones skip the mask. A query that sees no key gets
output 0 and zero gradients. Scores are in base 2 (exp2 is the cheap GPU instruction), so lse is too. Matmuls
accumulate in fp32 (IEEE, not TF32, for fp32 inputs); P and dS are cast to the input dtype for the second matmul,
as FlashAttention does. The wrapper zero-pads lengths to block multiples and head dims to powers of two. GQA never
repeats K/V: the BlockSpec index_map points head h at kv head h // (H/K). `interpret=True` runs the kernels on
CPU (the tests). Under a mesh they are partitioned along the batch axis (custom_partitioning), so a data-parallel
batch stays sharded instead of being gathered onto every device.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as pltriton
from jax.sharding import NamedSharding, PartitionSpec as P

# Running-max start value (base-2 log units). Finite, so exp2(m_old - m_new) never sees -inf - -inf = NaN;
# masked scores are -inf, so exp2(-inf - m) is exactly 0 however small m is.
_M_INIT = -1e30
_LOG2E = math.log2(math.e)
_MIN_BLOCK = 16  # Triton's tl.dot needs every matmul dim >= 16


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: it is a custom_vjp nondiff argument)."""
    causal: bool
    window: int | None      # left window w (None: unlimited)
    scale: float            # softmax scale in natural-log units
    kv_len: int             # real (unpadded) number of keys; keys >= kv_len are masked
    group: int              # H // K query heads per kv head
    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int
    interpret: bool

    @property
    def scale_log2(self) -> float:  # multiplies q.k to give scores in base-2 units
        return self.scale * _LOG2E


# ----------------------------------------------------------------------------------------------
# Block ranges (shared by the kernels and the tests). Work on Python ints and on traced int32 scalars
# (program ids); every value divided is >= 0, so truncating lax.div is floor division.

def _is_int(*xs) -> bool:
    return all(isinstance(x, int) for x in xs)


def _min(a, b):
    return min(a, b) if _is_int(a, b) else jnp.minimum(a, b)


def _max(a, b):
    return max(a, b) if _is_int(a, b) else jnp.maximum(a, b)


def _div(a, b: int):
    return a // b if _is_int(a) else lax.div(a, b)


def _cdiv(a, b: int):
    return _div(a + b - 1, b)


def _select(cond, a, b):
    return (a if cond else b) if isinstance(cond, bool) else jnp.where(cond, a, b)


def _clamp_range(lo, hi, full_lo, full_hi):
    """Order the four bounds as lo <= full_lo <= full_hi <= hi."""
    full_lo = _min(_max(full_lo, lo), hi)
    full_hi = _min(_max(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


def kv_block_range(q_block, *, block_q: int, block_k: int, kv_len: int, causal: bool, window: int | None):
    """Key blocks that query block `q_block` visits, as (lo, full_lo, full_hi, hi): blocks [lo, hi) hold
    every key some query of the block can see (and no block without one); of those, [full_lo, full_hi)
    are fully visible to every query of the block and skip the mask."""
    q_first = q_block * block_q
    q_last = q_first + block_q - 1
    # Keys seen by at least one query in the block form the interval [k_start, k_end].
    k_start = 0 if window is None else _max(q_first - window, 0)
    k_end = _min(q_last, kv_len - 1) if causal else kv_len - 1
    lo = _div(k_start, block_k)
    hi = _select(k_start > k_end, lo, _div(k_end, block_k) + 1)
    # Keys seen by every query in the block: [f_start, f_end].
    f_start = 0 if window is None else _max(q_last - window, 0)
    f_end = _min(q_first, kv_len - 1) if causal else kv_len - 1
    return _clamp_range(lo, hi, _cdiv(f_start, block_k), _div(f_end + 1, block_k))


def q_block_range(k_block, *, block_q: int, block_k: int, q_len: int, kv_len: int, causal: bool,
                  window: int | None):
    """Query blocks (of the q_len padded rows) that can see key block `k_block`, as (lo, full_lo, full_hi,
    hi), mirroring kv_block_range: [lo, hi) is every block with a visible entry, [full_lo, full_hi) the
    blocks whose every query sees every key of the block."""
    k_first = k_block * block_k
    k_last = _min(k_first + block_k - 1, kv_len - 1)  # last real key of the block
    # Queries that see at least one key of the block: [p_start, p_end].
    p_start = k_first if causal else 0
    p_end = q_len - 1 if window is None else _min(k_last + window, q_len - 1)
    empty = (k_first > kv_len - 1) | (p_start > p_end)  # only padding keys, or no query reaches them
    lo = _div(p_start, block_q)
    hi = _select(empty, lo, _div(p_end, block_q) + 1)
    # Queries that see every key of the block (none if the block holds padding keys): [f_start, f_end].
    f_start = k_first + block_k - 1 if causal else 0
    f_end = q_len - 1 if window is None else _min(k_first + window, q_len - 1)
    full_lo = _cdiv(f_start, block_q)
    full_hi = _select(k_first + block_k > kv_len, full_lo, _div(f_end + 1, block_q))
    return _clamp_range(lo, hi, full_lo, full_hi)


def _scores(q, k, q_pos, k_pos, masked: bool, cfg: _Config):
    """(bq, bk) fp32 scores in base-2 units; boundary blocks (masked) get -inf where a key is not visible."""
    s = _dot_nt(q, k) * cfg.scale_log2
    if not masked:
        return s
    q_pos, k_pos = q_pos[:, None], k_pos[None, :]
    ok = k_pos < cfg.kv_len
    if cfg.causal:
        ok = ok & (k_pos <= q_pos)
    if cfg.window is not None:
        ok = ok & (k_pos >= q_pos - cfg.window)
    return jnp.where(ok, s, -jnp.inf)


def _visit_blocks(bounds, body, carry, count=None):
    """carry = body(j, carry, masked) for j in [lo, hi), masked only in the boundary blocks. Returns (carry, count):
    `count` is a debug int32 scalar incremented per visited block (None, the normal case, counts nothing)."""
    lo, full_lo, full_hi, hi = bounds

    def step(j, state, masked):
        c, n = state
        return body(j, c, masked), (None if n is None else n + 1)

    state = (carry, count)
    state = lax.fori_loop(lo, full_lo, partial(step, masked=True), state)
    state = lax.fori_loop(full_lo, full_hi, partial(step, masked=False), state)
    return lax.fori_loop(full_hi, hi, partial(step, masked=True), state)


def _debug_counter(count_ref):
    """Start value of the visit counter: an int32 0 when the kernel has a count output, else None."""
    return jnp.int32(0) if count_ref else None


def _store_count(count_ref, n):
    if count_ref:
        count_ref[0][...] = jnp.full((1,), n, jnp.int32)


# Matmuls on tiles: lax.dot_general lowers to tl.dot (transposes are free operand views there). HIGHEST = IEEE
# fp32 for fp32 inputs on Triton (DEFAULT would silently use TF32); ignored for bf16/fp16.
def _dot(a, b, contract_a: int, contract_b: int):
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


_dot_nn = partial(_dot, contract_a=1, contract_b=0)  # a @ b
_dot_nt = partial(_dot, contract_a=1, contract_b=1)  # a @ b.T
_dot_tn = partial(_dot, contract_a=0, contract_b=0)  # a.T @ b


def _pallas(kernel, name: str, cfg: _Config, grid, in_specs, outs, count_visits: bool, backward: bool):
    """pallas_call of kernel(..., cfg=cfg) over grid (blocks, B, heads); `outs` are (ShapeDtypeStruct, BlockSpec)
    pairs. count_visits adds a debug int32 output (B, heads, blocks): how many blocks each program visited."""
    if count_visits:
        n, B, heads = grid
        outs = [*outs, (jax.ShapeDtypeStruct((B, heads, n), jnp.int32),
                        pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, i)))]
    warps, stages = (cfg.num_warps_bwd, cfg.num_stages_bwd) if backward else (cfg.num_warps, cfg.num_stages)
    return pl.pallas_call(partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs,
                          out_specs=[spec for _, spec in outs], out_shape=[shape for shape, _ in outs],
                          compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages),
                          interpret=cfg.interpret, name=name)


# ----------------------------------------------------------------------------------------------
# Forward kernel: one program per (query block, batch, query head).

def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *count_ref, cfg: _Config):
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(0)
    q = q_ref[...]                                    # (bq, D), stays on chip for the whole loop
    q_pos = i * bq + jnp.arange(bq)

    def body(j, carry, masked):
        acc, m, l = carry
        k = k_ref[pl.ds(j * bk, bk), :]               # (bk, D)
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _scores(q, k, q_pos, j * bk + jnp.arange(bk), masked, cfg)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))    # running max (finite: starts at _M_INIT)
        alpha = jnp.exp2(m - m_new)                   # rescales everything accumulated so far
        p = jnp.exp2(s - m_new[:, None])              # masked entries: exp2(-inf) = 0
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot_nn(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), _M_INIT, jnp.float32), jnp.zeros((bq,), jnp.float32))
    bounds = kv_block_range(i, block_q=bq, block_k=bk, kv_len=cfg.kv_len, causal=cfg.causal, window=cfg.window)
    (acc, m, l), n = _visit_blocks(bounds, body, carry, _debug_counter(count_ref))
    _store_count(count_ref, n)
    l = jnp.where(l == 0.0, 1.0, l)                   # rows that saw no key: output 0, no 0/0
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _fwd_call(q, k, v, cfg: _Config, count_visits: bool = False):
    """Padded (B, Tp, H, D) q and (B, Sp, K, D) k/v -> o (B, Tp, H, D), lse (B, H, Tp) fp32 [, visit counts]."""
    B, Tp, H, D = q.shape
    Sp = k.shape[1]
    bq, G = cfg.block_q, cfg.group
    nq = Tp // bq
    q_spec = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
    # The whole (padded) K/V sequence of kv head h // G: only a base pointer on GPU; the kernel loads tiles.
    kv_spec = pl.BlockSpec((None, Sp, None, D), lambda i, b, h: (b, 0, lax.div(h, G), 0))
    outs = [(jax.ShapeDtypeStruct(q.shape, q.dtype), q_spec),
            (jax.ShapeDtypeStruct((B, H, Tp), jnp.float32), pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)))]
    return _pallas(_fwd_kernel, "flash_attention_fwd", cfg, (nq, B, H), [q_spec, kv_spec, kv_spec], outs,
                   count_visits, backward=False)(q, k, v)


# ----------------------------------------------------------------------------------------------
# Backward kernels

def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *count_ref, cfg: _Config):
    """One program per (key block, batch, kv head): loop over the G query heads of the group and the query
    blocks that see this key block. q/do refs are (Tp, G, D), lse/delta refs (G, Tp)."""
    bq, bk = cfg.block_q_dkv, cfg.block_k_dkv
    j = pl.program_id(0)
    k = k_ref[...]                                    # (bk, D)
    v = v_ref[...]
    k_pos = j * bk + jnp.arange(bk)
    Tp = q_ref.shape[0]
    bounds = q_block_range(j, block_q=bq, block_k=bk, q_len=Tp, kv_len=cfg.kv_len, causal=cfg.causal,
                           window=cfg.window)

    def head(g, carry):
        def body(i, carry, masked):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q = q_ref[rows, g, :]                     # (bq, D)
            do = do_ref[rows, g, :]
            lse = lse_ref[g, rows]                    # (bq,)
            delta = delta_ref[g, rows]
            s = _scores(q, k, i * bq + jnp.arange(bq), k_pos, masked, cfg)
            p = jnp.exp2(s - lse[:, None])            # the attention probabilities, recomputed
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            dp = _dot_nt(do, v)                       # (bq, bk)
            ds = p * (dp - delta[:, None])
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
            return dk, dv

        return _visit_blocks(bounds, body, *carry)  # carry = ((dk, dv), visit counter)

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), n = lax.fori_loop(0, cfg.group, head, ((zeros, zeros), _debug_counter(count_ref)))
    _store_count(count_ref, n)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *count_ref, cfg: _Config):
    """One program per (query block, batch, query head): loop over the key blocks it sees."""
    bq, bk = cfg.block_q_dq, cfg.block_k_dq
    i = pl.program_id(0)
    q = q_ref[...]                                    # (bq, D)
    do = do_ref[...]
    lse = lse_ref[...]                                # (bq,)
    delta = delta_ref[...]
    q_pos = i * bq + jnp.arange(bq)

    def body(j, dq, masked):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _scores(q, k, q_pos, j * bk + jnp.arange(bk), masked, cfg)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot_nn(ds.astype(k.dtype), k)

    bounds = kv_block_range(i, block_q=bq, block_k=bk, kv_len=cfg.kv_len, causal=cfg.causal, window=cfg.window)
    dq, n = _visit_blocks(bounds, body, jnp.zeros(q.shape, jnp.float32), _debug_counter(count_ref))
    _store_count(count_ref, n)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _bwd_call(q, k, v, o, lse, do, cfg: _Config, count_visits: bool = False):
    """Gradients (dq, dk, dv) for padded inputs; with count_visits also the per-program block counts of
    the dK/dV kernel (B, K, nk) and the dQ kernel (B, H, nq)."""
    B, Tp, H, D = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = cfg.group
    # delta_i = sum_d o_id * do_id = rowsum(P * dP): the softmax-Jacobian term, once per query row.
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))

    # dK/dV: grid over key blocks; q, do, lse, delta of the whole group of G query heads stay in HBM and
    # are read tile by tile.
    bq, bk = cfg.block_q_dkv, cfg.block_k_dkv
    nk = Sp // bk
    kv_blk = pl.BlockSpec((None, bk, None, D), lambda j, b, kh: (b, j, kh, 0))
    q_grp = pl.BlockSpec((None, Tp, G, D), lambda j, b, kh: (b, 0, kh, 0))
    row_grp = pl.BlockSpec((None, G, Tp), lambda j, b, kh: (b, kh, 0))
    outs = [(jax.ShapeDtypeStruct(k.shape, k.dtype), kv_blk), (jax.ShapeDtypeStruct(v.shape, v.dtype), kv_blk)]
    dk, dv, *count_dkdv = _pallas(_dkdv_kernel, "flash_attention_bwd_dkdv", cfg, (nk, B, K),
                                  [q_grp, kv_blk, kv_blk, q_grp, row_grp, row_grp], outs, count_visits,
                                  backward=True)(q, k, v, do, lse, delta)

    # dQ: grid over query blocks, whole K/V of the matching kv head.
    bq, bk = cfg.block_q_dq, cfg.block_k_dq
    nq = Tp // bq
    q_blk = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
    kv_all = pl.BlockSpec((None, Sp, None, D), lambda i, b, h: (b, 0, lax.div(h, G), 0))
    row_blk = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq, *count_dq = _pallas(_dq_kernel, "flash_attention_bwd_dq", cfg, (nq, B, H),
                            [q_blk, kv_all, kv_all, q_blk, row_blk, row_blk],
                            [(jax.ShapeDtypeStruct(q.shape, q.dtype), q_blk)], count_visits,
                            backward=True)(q, k, v, do, lse, delta)
    return (dq, dk, dv, *count_dkdv, *count_dq)


# ----------------------------------------------------------------------------------------------
# Sharding: a pallas_call is opaque to XLA's partitioner, which would all-gather a batch-sharded input and
# run the whole batch on every device. custom_partitioning tells it the kernels are independent per batch
# row: keep the batch axis's sharding, replicate the other axes, run the kernel on each device's rows.

def _batch_partitioned(fn, rule: str):
    """fn(*arrays, cfg) -> tuple of arrays, all with batch as axis 0, partitioned along that axis only.
    `rule` is the Shardy einsum-like rule naming each axis ('b' is the batch factor)."""
    n_args = len(rule.split("->")[0].split(","))
    wrapped = custom_partitioning(fn, static_argnums=(n_args,))

    def batch_shardings(mesh, arg_shapes, n):
        spec = getattr(arg_shapes[0].sharding, "spec", ())
        return tuple(NamedSharding(mesh, P(spec[0] if len(spec) else None)) for _ in range(n))

    def partition(cfg, mesh, arg_shapes, result_shape):
        args = batch_shardings(mesh, arg_shapes, len(arg_shapes))
        outs = batch_shardings(mesh, arg_shapes, len(result_shape))
        return mesh, partial(fn, cfg=cfg), outs, args

    def infer(cfg, mesh, arg_shapes, result_shape):
        return batch_shardings(mesh, arg_shapes, len(result_shape))

    others = tuple(dict.fromkeys(f for f in rule.replace("->", " ").replace(",", " ").split() if f != "b"))
    wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                          need_replication_factors=others)
    return wrapped


# (Lambdas: custom_partitioning would treat the count_visits default as one more traced argument.)
_fwd_partitioned = _batch_partitioned(lambda q, k, v, cfg: _fwd_call(q, k, v, cfg),
                                      "b t h d, b s k d, b s k d -> b t h d, b h t")
_bwd_partitioned = _batch_partitioned(lambda q, k, v, o, lse, do, cfg: _bwd_call(q, k, v, o, lse, do, cfg),
                                      "b t h d, b s k d, b s k d, b t h d, b h t, b t h d -> b t h d, b s k d, b s k d")


# custom_vjp on padded arrays
@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, cfg: _Config):
    return _fwd_partitioned(q, k, v, cfg)[0]


def _flash_fwd(q, k, v, cfg: _Config):
    o, lse = _fwd_partitioned(q, k, v, cfg)
    return o, (q, k, v, o, lse)  # the T x S matrix is never stored: only o and one lse per row


def _flash_bwd(cfg: _Config, residuals, do):
    return tuple(_bwd_partitioned(*residuals, do, cfg))  # residuals: q, k, v, o, lse


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Public wrapper

def _prepare(q, k, v, *, causal, window, scale, num_warps, num_stages, num_warps_bwd, num_stages_bwd, interpret,
             **blocks):
    """Validate the inputs and build the static config plus padded shapes: (cfg, T_pad, S_pad, D_pad)."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ValueError(f"flash_attention: {msg}")

    need(q.ndim == k.ndim == v.ndim == 4,
         f"q must be (B, T, H, D) and k/v (B, S, K, D); got shapes {q.shape}, {k.shape}, {v.shape}")
    B, T, H, D = q.shape
    _, S, K, _ = k.shape
    need(k.shape == v.shape and k.shape[0] == B and k.shape[3] == D,
         f"k and v must both be (B={B}, S, K, D={D}) to match q {q.shape}; got k {k.shape}, v {v.shape}")
    need(K >= 1 and H % K == 0, f"the number of kv heads ({K}) must divide the number of query heads ({H}) for GQA")
    need(q.dtype == k.dtype == v.dtype and q.dtype in (jnp.bfloat16, jnp.float16, jnp.float32),
         f"q, k, v must share one dtype among bfloat16/float16/float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    need(T >= 1 and S >= 1, f"empty sequence (T={T}, S={S})")
    need(window is None or (isinstance(window, int) and not isinstance(window, bool) and window >= 0),
         f"window must be None or a Python int >= 0 (a static left window w: query p sees keys p-w..p), "
         f"got {window!r}")
    for name, b in blocks.items():
        need(isinstance(b, int) and b >= _MIN_BLOCK and (b & (b - 1)) == 0,
             f"{name} must be a power of two >= {_MIN_BLOCK} (Triton tile shapes), got {b!r}")
    if window is not None and window >= T - 1:
        window = None  # every real query already sees all its earlier keys: plain (non-)causal attention
    # Short sequences get smaller blocks (no 128-row tile for 40 rows), still powers of two >= 16.
    fit = lambda b, length: min(b, max(_MIN_BLOCK, pl.next_power_of_2(length)))
    q_blocks = {n: fit(b, T) for n, b in blocks.items() if n.startswith("block_q")}
    k_blocks = {n: fit(b, S) for n, b in blocks.items() if n.startswith("block_k")}
    D_pad = max(_MIN_BLOCK, pl.next_power_of_2(D))
    cfg = _Config(
        causal=bool(causal), window=window, scale=float(1.0 / math.sqrt(D) if scale is None else scale),
        kv_len=S, group=H // K, **q_blocks, **k_blocks,
        num_warps=num_warps or (4 if D_pad <= 64 else 8), num_stages=num_stages,
        num_warps_bwd=num_warps_bwd or (4 if D_pad <= 64 else 8), num_stages_bwd=num_stages_bwd,
        interpret=bool(interpret))
    bq, bk = max(q_blocks.values()), max(k_blocks.values())  # powers of two: a multiple of every block
    return cfg, pl.cdiv(T, bq) * bq, pl.cdiv(S, bk) * bk, D_pad


def _pad(x, length: int, dim: int):
    """Zero-pad axis 1 to `length` and the last axis to `dim` (a no-op when already that size)."""
    if x.shape[1] == length and x.shape[3] == dim:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dim - x.shape[3])))


def flash_attention(q, k, v, *, causal: bool = True, window: int | None = None, scale: float | None = None,
                    block_q: int = 128, block_k: int = 64,
                    block_q_dkv: int = 32, block_k_dkv: int = 64, block_q_dq: int = 64, block_k_dq: int = 32,
                    num_warps: int | None = None, num_stages: int = 3,
                    num_warps_bwd: int | None = None, num_stages_bwd: int = 2,
                    interpret: bool = False):
    """Flash attention: softmax(scale * q k^T + mask) v without materialising the T x S matrix.

    q: (B, T, H, D); k, v: (B, S, K, D) with K dividing H (GQA: query head h uses kv head h // (H/K)).
    causal: query p sees keys k <= p (positions start at 0 for both). window: left window w, query p sees
    keys p-w..p (None: unlimited; w >= T-1 is the same as None). scale: default 1/sqrt(D).
    Returns (B, T, H, D) in q's dtype. Differentiable in q, k, v (Pallas backward).

    Tuning (GPU only; powers of two >= 16, shrunk automatically for short sequences): block_q/block_k and
    num_warps/num_stages for the forward kernel; block_{q,k}_dkv for the dK/dV kernel, block_{q,k}_dq for
    the dQ kernel and num_warps_bwd/num_stages_bwd for both. num_warps None: 4 for head_dim <= 64, else 8.
    interpret=True runs the kernels in Pallas' CPU interpreter.
    """
    cfg, T_pad, S_pad, D_pad = _prepare(**locals())  # every argument, by name
    T, D = q.shape[1], q.shape[3]
    # Padding outside the custom_vjp: JAX differentiates the pad/slice itself (padded rows get zero cotangent).
    o = _flash(_pad(q, T_pad, D_pad), _pad(k, S_pad, D_pad), _pad(v, S_pad, D_pad), cfg)
    return o[:, :T, :, :D]


def attention_flops(B: int, T: int, S: int, H: int, D: int, *, causal: bool, window: int | None) -> float:
    """Matmul FLOPs of the forward pass counting only visible (query, key) pairs: 2 matmuls (q k^T and p v)
    of 2*D FLOPs per pair. The backward is 2.5x this (5 matmuls)."""
    pairs = 0
    for p in range(T):  # closed forms exist, but a loop over T is exact for every T/S/window and cheap
        hi = min(p, S - 1) if causal else S - 1
        lo = 0 if window is None else max(p - window, 0)
        pairs += max(hi - lo + 1, 0)
    return 4.0 * B * H * D * pairs
