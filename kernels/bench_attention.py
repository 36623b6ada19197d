"""Attention kernel benchmark: our Pallas flash attention vs cuDNN vs plain XLA, forward and forward+backward.

    python kernels/bench_attention.py                                  # GPU: T in {1024, 2048, 4096}, B*T = 16k
    python kernels/bench_attention.py --block-q=64 --num-warps=4        # try one Pallas tuning
    python kernels/bench_attention.py --sweep --seq-lens=2048           # search Pallas block configs per shape
    python kernels/bench_attention.py --tiny                            # CPU smoke run (interpret mode, tiny sizes)
    python kernels/bench_attention.py --out=attention_table.md          # also write the table

Every shape is causal, (B, T, H, D), run with full attention and with each window in --windows. FLOPs count only
visible (query, key) pairs; forward+backward = 3.5x forward (the FlashAttention-paper convention, recomputation not
counted). Times are medians of --iters calls after --warmup. The error columns compare the output and gradients
(random cotangent) with XLA's as max |diff| / max |xla| (bf16: ~1e-2), a guard against a mis-compiled kernel.
Imports only jax/numpy and the project's config/gpt modules (no grain, no flask).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from kernels.flash_attention import attention_flops, flash_attention
from nanochat_jax import gpt
from nanochat_jax.common import atomic_write
from nanochat_jax.config import flag, parse_flags, print_config, require

BACKENDS = ("pallas", "cudnn", "xla")
_KERNEL = {name: p.default for name, p in inspect.signature(flash_attention).parameters.items()
           if p.name.startswith(("block_", "num_"))}  # flash_attention's default tuning


@dataclass(frozen=True)
class BenchConfig:
    """Attention benchmark: Pallas flash attention vs cuDNN vs XLA (see kernels/bench_attention.py)."""
    tokens: int = flag(16384, "B*T for every sequence length")
    seq_lens: str = flag("1024,2048,4096", "comma-separated sequence lengths")
    n_head: int = flag(16, "query heads")
    n_kv_head: int = flag(0, "0: same as n_head")
    head_dim: int = flag(128, "head size")
    windows: str = flag("512", "windows benchmarked besides full causal ('' for none)")
    backends: str = flag("pallas,cudnn,xla", "comma-separated: pallas, cudnn, xla")
    dtype: str = flag("bfloat16", "bfloat16 | float16 | float32")
    warmup: int = flag(2, "untimed calls per case")
    iters: int = flag(10, "timed calls per case")
    # Pallas tuning (see flash_attention's docstring); defaults are the kernel's, num_warps 0 = auto.
    block_q: int = flag(_KERNEL["block_q"], "Pallas forward query block")
    block_k: int = flag(_KERNEL["block_k"], "Pallas forward key block")
    block_q_dkv: int = flag(_KERNEL["block_q_dkv"], "Pallas dK/dV kernel query block")
    block_k_dkv: int = flag(_KERNEL["block_k_dkv"], "Pallas dK/dV kernel key block")
    block_q_dq: int = flag(_KERNEL["block_q_dq"], "Pallas dQ kernel query block")
    block_k_dq: int = flag(_KERNEL["block_k_dq"], "Pallas dQ kernel key block")
    num_warps: int = flag(0, "Pallas forward warps (0 = auto)")
    num_stages: int = flag(_KERNEL["num_stages"], "Pallas forward pipeline stages")
    num_warps_bwd: int = flag(0, "Pallas backward warps (0 = auto)")
    num_stages_bwd: int = flag(_KERNEL["num_stages_bwd"], "Pallas backward pipeline stages")
    sweep: bool = flag(False, "search a few Pallas configs per shape and report the best")
    tiny: bool = flag(False, "CPU smoke run: overrides shapes/blocks/iters with TINY below")
    out: str = flag("", "also write the markdown table here")

    def __post_init__(self):
        require(self.tokens >= 1 and self.n_head >= 1 and self.head_dim >= 1, "tokens/n_head/head_dim must be >= 1")
        require(self.n_kv_head >= 0 and (self.n_kv_head == 0 or self.n_head % self.n_kv_head == 0),
                f"--n-kv-head ({self.n_kv_head}) must divide --n-head ({self.n_head}) (0 = same as n_head)")
        require(self.warmup >= 1 and self.iters >= 1, "--warmup and --iters must be >= 1")
        require(self.dtype in ("bfloat16", "float16", "float32"),
                f"--dtype must be bfloat16/float16/float32, got {self.dtype!r}")
        unknown = set(_split(self.backends)) - set(BACKENDS)
        require(not unknown, f"--backends: unknown {sorted(unknown)}; choose from {BACKENDS}")
        for T in self.seq_lens_list:
            require(self.tokens % T == 0, f"--tokens ({self.tokens}) must be a multiple of every seq len ({T})")

    @property
    def seq_lens_list(self) -> list[int]:
        return [int(x) for x in _split(self.seq_lens)]

    @property
    def window_list(self) -> list[int | None]:
        return [None] + [int(x) for x in _split(self.windows)]

    def pallas_kwargs(self) -> dict:
        kwargs = {name: getattr(self, name) for name in _KERNEL}
        return {**kwargs, "num_warps": self.num_warps or None, "num_warps_bwd": self.num_warps_bwd or None}


TINY = dict(tokens=128, seq_lens="64", n_head=2, head_dim=64, windows="16", warmup=1, iters=3,
            block_q=32, block_k=32, block_q_dkv=32, block_k_dkv=32, block_q_dq=32, block_k_dq=32)

# --sweep candidates (a GPU session can afford ~16 compiles per shape; narrow --seq-lens/--windows to sweep
# one shape). Forward: (block_q, block_k, num_warps, num_stages). Backward, timed as forward+backward with the
# best forward: (block_q_dkv, block_k_dkv, block_q_dq, block_k_dq, num_warps_bwd, num_stages_bwd).
SWEEP_FWD = [(64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3), (128, 32, 8, 3),
             (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)]
SWEEP_BWD = [(32, 64, 64, 32, 4, 2), (32, 64, 64, 32, 8, 2), (64, 64, 64, 64, 4, 2), (64, 64, 64, 64, 8, 2),
             (32, 128, 128, 32, 4, 2), (32, 128, 128, 32, 8, 1), (64, 128, 128, 64, 8, 2), (16, 64, 64, 16, 4, 3)]
SWEEP_TINY_FWD = [(32, 32, 4, 2), (16, 32, 4, 2)]
SWEEP_TINY_BWD = [(32, 32, 32, 32, 4, 2), (16, 32, 32, 16, 4, 2)]


log = partial(print, flush=True)


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def time_fn(fn, args, warmup: int, iters: int) -> float:
    """Median seconds per call after `warmup` calls (compilation included); each call ended by block_until_ready."""
    times = []
    for _ in range(warmup + iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def measure(backend, window, arrays, cfg: BenchConfig, interpret, pallas_kwargs, *, backward=True):
    """(forward seconds, forward+backward seconds or None, (o, dq, dk, dv) or (o,) for comparisons).
    cudnn and xla go through the model's own gpt.attention."""
    q, k, v, do = arrays
    if backend == "pallas":
        attn = lambda q, k, v: flash_attention(q, k, v, causal=True, window=window, interpret=interpret,
                                               **pallas_kwargs)
    else:
        attn = lambda q, k, v: gpt.attention(q, k, v, causal=True, window=window, backend=backend)
    fwd = jax.jit(attn)
    fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))  # the VJP for output cotangent do
    t_fwd = time_fn(fwd, (q, k, v), cfg.warmup, cfg.iters)
    if not backward:
        return t_fwd, None, (fwd(q, k, v),)
    t_fb = time_fn(fwd_bwd, (q, k, v, do), cfg.warmup, cfg.iters)
    return t_fwd, t_fb, (fwd(q, k, v), *fwd_bwd(q, k, v, do))


def rel_err(got, want) -> float:
    """max |got - want| / max |want|, in fp32."""
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))


def sweep_pallas(window, arrays, cfg: BenchConfig, interpret) -> tuple[dict, list[str]]:
    """Best Pallas kwargs for one shape: forward configs by forward time, then backward configs by
    forward+backward time. Configs that fail to compile (e.g. out of shared memory) are reported and skipped."""
    phases = [(("block_q", "block_k", "num_warps", "num_stages"), "fwd {}x{} warps={} stages={}",
               SWEEP_TINY_FWD if cfg.tiny else SWEEP_FWD, False),
              (("block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq", "num_warps_bwd", "num_stages_bwd"),
               "bwd dkdv {}x{} dq {}x{} warps={} stages={}", SWEEP_TINY_BWD if cfg.tiny else SWEEP_BWD, True)]
    best, notes = cfg.pallas_kwargs(), []
    for keys, label, candidates, backward in phases:
        results = []
        for values in candidates:
            kwargs = {**best, **dict(zip(keys, values))}
            try:
                t_fwd, t_fb, _ = measure("pallas", window, arrays, cfg, interpret, kwargs, backward=backward)
                t = t_fb if backward else t_fwd
            except Exception as e:  # noqa: BLE001 - a config the compiler rejects is a result, not a crash
                notes.append(f"{kwargs}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                t = float("inf")
            results.append((t, kwargs))
            log(f"  sweep {label.format(*values)}: {t * 1e3:.3f} ms")
        best = min(results, key=lambda r: r[0])[1]
    return best, notes


def _fmt_tflops(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.2g}"  # CPU smoke runs are far below 1 TFLOP/s


def markdown_table(rows: list[dict], title: str) -> str:
    head = ["backend", "T", "B", "window", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
            "o rel err", "grad rel err", "pallas config"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["backend"], str(r["T"]), str(r["B"]), str(r["window"] or "full"), f"{r['fwd_ms']:.3f}",
                 _fmt_tflops(r["fwd_tflops"]), f"{r['fb_ms']:.3f}", _fmt_tflops(r["fb_tflops"]),
                 "-" if r["err"] is None else f"{r['err']:.1e}",
                 "-" if r["grad_err"] is None else f"{r['grad_err']:.1e}", r["config"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bench_shape(T: int, window, backends: list[str], cfg: BenchConfig, interpret: bool, rng, notes) -> list[dict]:
    """One row per backend for one (T, window), XLA first: the others are compared against it."""
    B, H, D, K = cfg.tokens // T, cfg.n_head, cfg.head_dim, cfg.n_kv_head or cfg.n_head
    arrays = [jnp.asarray(rng.standard_normal(shape), cfg.dtype)
              for shape in ((B, T, H, D), (B, T, K, D), (B, T, K, D), (B, T, H, D))]
    flops_fwd = attention_flops(B, T, T, H, D, causal=True, window=window)
    log(f"T={T} B={B} window={window or 'full'}: {flops_fwd / 1e12:.3f} TFLOP forward")
    rows, reference = [], None
    for backend in sorted(backends, key=lambda b: b != "xla"):
        pallas_kwargs, config_str = cfg.pallas_kwargs(), ""
        if backend == "pallas":
            if cfg.sweep:
                pallas_kwargs, failed = sweep_pallas(window, arrays, cfg, interpret)
                notes += [f"T={T} window={window}: {n}" for n in failed]
            config_str = ("q{block_q}k{block_k} w{num_warps} s{num_stages} / dkdv q{block_q_dkv}k{block_k_dkv} "
                          "dq q{block_q_dq}k{block_k_dq} w{num_warps_bwd} s{num_stages_bwd}").format(
                              **{k: ("auto" if v is None else v) for k, v in pallas_kwargs.items()})
        try:
            t_fwd, t_fb, outs = measure(backend, window, arrays, cfg, interpret, pallas_kwargs)
        except Exception as e:  # noqa: BLE001 - report and keep benchmarking the others
            log(f"  {backend}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            notes.append(f"{backend} T={T} window={window}: {type(e).__name__}")
            continue
        err = grad_err = None
        if backend == "xla":
            reference = outs
        elif reference is not None:
            err = rel_err(outs[0], reference[0])
            grad_err = max(rel_err(g, r) for g, r in zip(outs[1:], reference[1:]))
            if max(err, grad_err) > 5e-2:  # far beyond bf16 rounding: something is wrong
                notes.append(f"CHECK {backend} T={T} window={window}: rel err vs xla o {err:.1e}, "
                             f"grads {grad_err:.1e}")
        row = dict(backend=backend, T=T, B=B, window=window, fwd_ms=t_fwd * 1e3, fwd_tflops=flops_fwd / t_fwd / 1e12,
                   fb_ms=t_fb * 1e3, fb_tflops=3.5 * flops_fwd / t_fb / 1e12, err=err, grad_err=grad_err,
                   config=config_str)
        rows.append(row)
        log(f"  {backend}: fwd {row['fwd_ms']:.3f} ms ({_fmt_tflops(row['fwd_tflops'])} TFLOP/s), "
            f"fwd+bwd {row['fb_ms']:.3f} ms ({_fmt_tflops(row['fb_tflops'])} TFLOP/s)"
            + ("" if err is None else f", rel err vs xla: o {err:.1e}, grads {grad_err:.1e}"))
    return rows


def main(argv=None) -> list[dict]:
    cfg = parse_flags(BenchConfig, argv)
    if cfg.tiny:
        cfg = dataclasses.replace(cfg, **TINY)
    print_config(cfg)
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not cfg.tiny:
        log("warning: no GPU; Pallas runs in interpret mode (very slow). Use --tiny for a CPU smoke run.")
    backends = _split(cfg.backends)
    if "cudnn" in backends and not on_gpu:
        log(f"cudnn: skipped (needs an NVIDIA GPU; JAX runs on {jax.default_backend()!r})")
        backends.remove("cudnn")
    rows, notes, rng = [], [], np.random.default_rng(0)
    for T, window in itertools.product(cfg.seq_lens_list, cfg.window_list):
        if window is None or window < T - 1:  # larger windows are the same as full
            rows += bench_shape(T, window, backends, cfg, not on_gpu, rng, notes)

    mode = jax.default_backend() + ("" if on_gpu else ", Pallas interpreted")
    title = (f"Attention benchmark on {jax.devices()[0].device_kind} ({mode}): {cfg.dtype}, causal, H={cfg.n_head}, "
             f"H_kv={cfg.n_kv_head or cfg.n_head}, D={cfg.head_dim}, B*T={cfg.tokens}, median of {cfg.iters}")
    table = markdown_table(rows, title)
    if notes:
        table += "\nNotes:\n" + "".join(f"- {n}\n" for n in notes)
    print("\n" + table)
    if cfg.out:
        with atomic_write(cfg.out, "w") as f:
            f.write(table)
        log(f"wrote {cfg.out}")
    return rows


if __name__ == "__main__":
    main()
