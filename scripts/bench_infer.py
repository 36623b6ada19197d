"""Inference speed of the engine: time to first token, time per output token, tokens/s and memory-bandwidth
utilisation at several batch sizes, with random weights (no checkpoint needed) or a checkpoint.

    python scripts/bench_infer.py --depth=20                                  # GPU, random d20 weights
    python scripts/bench_infer.py --source=sft --model-tag=d20                # GPU, a trained model
    python scripts/bench_infer.py --depth=2 --max-new-tokens=8 --batch-sizes=1,2 --prompt-len=8 \\
        --max-seq-len=64 --vocab-size=512 --head-dim=32                      # CPU smoke run

Each batch size runs `batch` distinct random prompts of --prompt-len tokens through Engine.generate (greedy, no
stop tokens, so exactly --max-new-tokens per row) once to compile, then once timed. Decode is memory bound, so
the interesting number is bandwidth utilisation: bytes a decode step must read (params once + the live KV cache,
window-aware) / step time / the device's peak HBM bandwidth. The last line is JSON. Imports neither grain nor
flask.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import jax
import numpy as np

from nanochat_jax import gpt
from nanochat_jax.common import run_main
from nanochat_jax.config import flag, parse_flags, print_config, require, runtime_settings
from nanochat_jax.engine import Engine
from nanochat_jax.sharding import local_devices

# Peak HBM bandwidth (bytes/s) from NVIDIA's datasheets, matched against jax's device_kind (first match wins, so
# the more specific names come first). Used only for the utilisation column; unknown devices (CPU) report none.
PEAK_HBM_BANDWIDTH = [
    ("H200", 4.8e12),             # H200 SXM, 141 GB HBM3e
    ("H100 PCIE", 2.0e12),        # H100 PCIe, 80 GB HBM2e
    ("H100 NVL", 3.9e12),         # H100 NVL, 94 GB HBM3
    ("H100", 3.35e12),            # H100 SXM5, 80 GB HBM3
    ("A100-SXM4-80GB", 2.039e12), # A100 SXM4, 80 GB HBM2e
    ("A100 80GB PCIE", 1.935e12), # A100 PCIe, 80 GB HBM2e
    ("A100", 1.555e12),           # A100 40 GB (SXM4 and PCIe), HBM2
    ("A800 80GB PCIE", 1.935e12), # A800 PCIe, 80 GB HBM2e
    ("A800", 2.039e12),           # A800 SXM4, 80 GB HBM2e
]


def peak_bandwidth(device_kind: str) -> float | None:
    kind = device_kind.upper()
    for name, bw in PEAK_HBM_BANDWIDTH:
        if name in kind:
            return bw
    return None


@dataclass(frozen=True)
class BenchInferConfig:
    """Engine latency/throughput benchmark (random weights by default)."""
    source: str = flag("random", "random, or a checkpoint phase: base|mid|sft|rl")
    model_tag: str | None = flag(None, "checkpoint tag with --source=base|mid|sft|rl (default: the largest)")
    step: int | None = flag(None, "checkpoint step (default: the latest)")
    depth: int = flag(20, "transformer layers of the random model")
    aspect_ratio: int = flag(64, "model width per layer of depth (random model)")
    head_dim: int = flag(128, "attention head size (random model)")
    max_seq_len: int = flag(2048, "context length (random model)")
    window_pattern: str = flag("SSSL", "attention windows per layer, S/L (random model)")
    vocab_size: int = flag(32768, "vocabulary size (random model)")
    # not RuntimeFlags: one device, no tokenizer, no --attention (the engine decodes with XLA attention)
    compute_dtype: str = flag("auto", "auto: bfloat16 on GPU, float32 on CPU (a checkpoint: its own, as chat_web "
                                      "serves it) | bfloat16 | float32")
    batch_sizes: str = flag("1,8,32", "comma-separated batch sizes to measure")
    prompt_len: int = flag(128, "prompt tokens per row")
    max_new_tokens: int = flag(128, "tokens generated per row")
    chunk: int = flag(16, "decode steps per host round trip (the engine's on-device loop)")
    repeats: int = flag(3, "timed generate calls per batch size after the compiling one (medians reported)")
    seed: int = flag(0, "seed of the random weights and prompts")

    def __post_init__(self):
        require(self.source in ("random", "base", "mid", "sft", "rl"),
                f"--source must be random|base|mid|sft|rl, got {self.source!r}")
        require(self.compute_dtype in ("auto", "bfloat16", "float32"),
                f"--compute-dtype must be auto|bfloat16|float32, got {self.compute_dtype!r}")
        require(self.chunk >= 1 and self.repeats >= 1, "--chunk and --repeats must be >= 1")
        require(self.prompt_len >= 1 and self.max_new_tokens >= 2,
                "--prompt-len must be >= 1 and --max-new-tokens >= 2 (time per token needs two tokens)")
        try:
            sizes = [int(b) for b in self.batch_sizes.split(",")]
        except ValueError:
            sizes = []
        require(bool(sizes) and min(sizes) >= 1, f"--batch-sizes must be a comma list of ints >= 1, got "
                                                 f"{self.batch_sizes!r}")


def decode_bytes_per_step(params, cfg: gpt.GPTConfig, batch: int, context: float) -> float:
    """Bytes one decode step must read: every parameter once in the compute dtype (the engine casts them), except
    the embedding tables, of which only `batch` rows are gathered; plus each layer's live K and V (the last
    min(context, window + 1) positions of every row)."""
    itemsize = np.dtype(cfg.dtype).itemsize
    total = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path[:1], simple=True)
        if name in ("wte", "value_embeds"):
            total += batch * leaf.shape[-1] * (leaf.shape[0] if name == "value_embeds" else 1) * itemsize
        else:
            total += leaf.size * itemsize
    kv_row = 2 * cfg.n_kv_head * cfg.head_dim * itemsize
    total += sum(batch * min(context, w + 1) * kv_row for w in gpt.layer_windows(cfg))
    return total


def run_batch(engine: Engine, batch: int, prompt_len: int, max_new_tokens: int, seed: int, repeats: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, engine.cfg.vocab_size, (batch, prompt_len)).tolist()

    def timed():
        t0 = time.perf_counter()
        stamps = [time.perf_counter() for _ in engine.generate(prompts, max_tokens=max_new_tokens, temperature=0.0)]
        assert len(stamps) == max_new_tokens, (len(stamps), max_new_tokens)
        # TTFT, time per later token (tokens arrive a decode chunk at a time: the mean over the call), whole call
        return stamps[0] - t0, (stamps[-1] - stamps[0]) / (len(stamps) - 1), stamps[-1] - t0

    n_compiled = len(engine.compilations)
    timed()  # compile
    compile_count = len(engine.compilations) - n_compiled
    ttft, tpot, wall = (float(np.median(x)) for x in zip(*[timed() for _ in range(repeats)]))
    context = prompt_len + max_new_tokens / 2  # mean cached length over the decode steps
    step_bytes = decode_bytes_per_step(engine.params, engine.cfg, batch, context)
    peak = peak_bandwidth(engine.device.device_kind)
    result = {"batch": batch, "ttft_ms": 1e3 * ttft, "tpot_ms": 1e3 * tpot, "decode_tokens_per_s": batch / tpot,
              "tokens_per_s": batch * max_new_tokens / wall,  # the whole call, prefill included (as the reference)
              "bytes_per_step": step_bytes, "achieved_gb_per_s": step_bytes / tpot / 1e9,
              "bandwidth_util_percent": None if peak is None else 100 * step_bytes / tpot / peak,
              "compilations": compile_count}
    try:
        stats = engine.device.memory_stats() or {}
        result["peak_memory_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9 or None
    except Exception:  # not every backend reports memory
        result["peak_memory_gb"] = None
    return result


def main(argv=None) -> dict:
    cfg = parse_flags(BenchInferConfig, argv)
    print_config(cfg)
    device = local_devices()[0]
    on_gpu = device.platform == "gpu"
    if cfg.source == "random":
        dtype = runtime_settings(cfg.compute_dtype, "xla", on_gpu)["compute_dtype"]
        model_cfg = gpt.GPTConfig.from_depth(cfg.depth, aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim,
                                             max_seq_len=cfg.max_seq_len, vocab_size=cfg.vocab_size,
                                             window_pattern=cfg.window_pattern, compute_dtype=dtype)
        params = jax.jit(lambda k: gpt.init_params(model_cfg, k), out_shardings=jax.sharding.SingleDeviceSharding(
            device))(jax.random.key(cfg.seed))  # speed does not depend on the values
    else:
        from nanochat_jax.checkpoint import load_model  # lazy: orbax only when reading a checkpoint

        overrides = {} if cfg.compute_dtype == "auto" else {"compute_dtype": cfg.compute_dtype}
        params, model_cfg, _ = load_model(cfg.source, cfg.model_tag, cfg.step, config_overrides=overrides)
    engine = Engine(params, model_cfg, device=device, chunk=cfg.chunk)
    del params
    counts = gpt.num_params(model_cfg)
    print(f"model: {model_cfg.n_layer} layers, width {model_cfg.n_embd}, {counts['total']:,} params, "
          f"{model_cfg.compute_dtype}; device {device.device_kind}; peak HBM bandwidth "
          f"{peak_bandwidth(device.device_kind) or 'unknown'}")
    results = []
    print(f"{'batch':>5} {'TTFT ms':>9} {'ms/token':>9} {'decode tok/s':>12} {'call tok/s':>10} {'MB/step':>9} "
          f"{'GB/s':>8} {'BW util %':>9}")
    for batch in [int(b) for b in cfg.batch_sizes.split(",")]:
        r = run_batch(engine, batch, cfg.prompt_len, cfg.max_new_tokens, cfg.seed, cfg.repeats)
        results.append(r)
        util = "-" if r["bandwidth_util_percent"] is None else f"{r['bandwidth_util_percent']:.1f}"
        print(f"{batch:>5} {r['ttft_ms']:>9.1f} {r['tpot_ms']:>9.2f} {r['decode_tokens_per_s']:>12.1f} "
              f"{r['tokens_per_s']:>10.1f} "
              f"{r['bytes_per_step'] / 1e6:>9.1f} {r['achieved_gb_per_s']:>8.1f} {util:>9}")
    out = {"device_kind": device.device_kind, "params": counts["total"], "compute_dtype": model_cfg.compute_dtype,
           "n_layer": model_cfg.n_layer, "results": results, "compilations": len(engine.compilations),
           "config": dataclasses.asdict(cfg)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_main(main)
