"""Train-step throughput and MFU on the available devices, without data loading (random tokens).

    python scripts/bench_train.py --depth=20 --device-batch-size=16 --max-seq-len=2048 --attention=cudnn   # GPU
    python scripts/bench_train.py --depth=2 --max-seq-len=128 --device-batch-size=4 --vocab-size=4096     # CPU
    python scripts/bench_train.py --depth=20 --device-batch-size=1 --compute-dtype=float32 --compile-only

The same step as training (scripts/pretrain.py): model, optimizer, sharding and donation; --compile-only stops
after tracing and compiling it. The last line is JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
import time
from dataclasses import dataclass

import jax
import numpy as np

from nanochat_jax import gpt, optim, pretrain, sharding, train
from nanochat_jax.common import run_main
from nanochat_jax.config import RuntimeFlags, fixed, flag, parse_flags, print_config, require


@dataclass(frozen=True)
class BenchTrainConfig(RuntimeFlags):
    """Train-step throughput and MFU of a random model on random tokens."""
    depth: int = flag(12, "transformer layers")
    aspect_ratio: int = flag(64, "model width per layer of depth")
    head_dim: int = flag(128, "attention head size")
    n_kv_head: int = flag(-1, "key/value heads (GQA); -1 = n_head")
    max_seq_len: int = flag(2048, "context length in tokens")
    window_pattern: str = flag("SSSL", "attention windows per layer, repeated: L = full context, S = short")
    vocab_size: int = flag(32768, "vocabulary size")
    device_batch_size: int = flag(16, "sequences per device per micro-batch")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    remat: bool = flag(False, "recompute each block's activations in the backward pass")
    steps: int = flag(10, "timed steps")
    warmup_steps: int = flag(3, "steps run before timing (compilation included)")
    compile_only: bool = flag(False, "stop after compiling (trace + compile time of the step, nothing allocated)")
    profile_dir: str = flag("", "after timing, trace 2 more steps with jax.profiler into this dir (TensorBoard/xprof "
                                "can open it) and print the XLA ops with the most time")
    tokenizer_dir: str | None = fixed(None, "random tokens: no tokenizer")
    seed: int = flag(0, "seed of the random params and tokens (the speed does not depend on them)")

    def __post_init__(self):
        super().__post_init__()
        require(min(self.steps, self.warmup_steps, self.grad_accum) >= 1,
                "--steps, --warmup-steps and --grad-accum must be >= 1")


def print_top_ops(trace_dir: str, hlo_text: str, steps: int, n: int = 15):
    """The n XLA ops with the most time per step in the newest jax.profiler trace under trace_dir, summed over the
    executor's threads (ops that run at the same time both count in full), with the op_name they came from."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
    ns = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" in line.name or line.name == "XLA Ops":  # XLA:CPU worker threads; a GPU's op line
                for ev in line.events:
                    if not ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                        ns[ev.name] += ev.duration_ns
    source = dict(re.findall(r'^\s+(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', hlo_text, re.M))
    print(f"top ops (ms/step; all ops: {sum(ns.values()) / steps / 1e6:.0f} ms/step):")
    for name, t in ns.most_common(n):
        print(f"  {t / steps / 1e6:8.1f}  {name:32} {source.get(name, '')[:100]}")


def main(argv=None) -> dict:
    cfg = parse_flags(BenchTrainConfig, argv)
    print_config(cfg)
    sharding.maybe_initialize_distributed(cfg.distributed)
    mesh = sharding.make_mesh(cfg.mesh)
    device = mesh.devices.flat[0]
    pcfg = pretrain.PretrainConfig(depth=cfg.depth, aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim,
                                n_kv_head=cfg.n_kv_head, max_seq_len=cfg.max_seq_len, window_pattern=cfg.window_pattern,
                                attention=cfg.attention, compute_dtype=cfg.compute_dtype, remat=cfg.remat)
    model_cfg = pretrain.build_model_config(pcfg, cfg.vocab_size, device.platform == "gpu")
    opt_cfg = optim.OptimConfig(num_iterations=1000, model_dim=model_cfg.n_embd)
    tx = optim.build_optimizer(gpt.param_shapes(model_cfg), opt_cfg)
    rows = cfg.device_batch_size * mesh.size
    step_fn, shardings, info = train.compile_train_step(model_cfg, tx, mesh, train.abstract_state(model_cfg, tx),
                                                        (cfg.grad_accum, rows, cfg.max_seq_len), shard_params=cfg.fsdp)
    print(f"traced + compiled in {info['compile_seconds']:.2f}s (trace {info['trace_seconds']:.2f}s); "
          f"memory {info.get('memory')}")
    result = {"devices": mesh.size, "device_kind": device.device_kind, "trace_seconds": info["trace_seconds"],
              "compile_seconds": info["compile_seconds"], "config": dataclasses.asdict(cfg)}
    if cfg.compile_only:
        print(json.dumps(result))
        return result
    state = jax.jit(lambda k: train.init_state(model_cfg, tx, k), out_shardings=shardings)(jax.random.key(cfg.seed))
    shape = (cfg.grad_accum, sharding.local_batch_rows(rows, mesh), cfg.max_seq_len + 1)
    tokens = np.random.default_rng(cfg.seed).integers(0, cfg.vocab_size, shape, dtype=np.int32)
    batch = {"inputs": sharding.global_batch(tokens[..., :-1], mesh, batch_axis=1),
             "targets": sharding.global_batch(tokens[..., 1:], mesh, batch_axis=1)}
    step_times = []  # each step waited for (XLA:CPU runs a step during dispatch anyway; a GPU idles ~ms per step)
    for _ in range(cfg.warmup_steps + cfg.steps):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        step_times.append(time.perf_counter() - t0)
    step_times = step_times[cfg.warmup_steps:]
    dt = float(np.mean(step_times))
    if cfg.profile_dir:
        with jax.profiler.trace(cfg.profile_dir):
            for _ in range(2):
                state, metrics = step_fn(state, batch)
            jax.block_until_ready(metrics)
        print_top_ops(cfg.profile_dir, step_fn.as_text(), steps=2)
    try:  # what the GPU really used (checks scripts/memory_estimate.py); CPUs report nothing
        peak_bytes = (device.memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - not every backend has memory stats
        peak_bytes = None
    tokens_per_step = cfg.grad_accum * rows * cfg.max_seq_len
    mfu = train.mfu_percent(gpt.flops_per_token(model_cfg), tokens_per_step, dt, device.device_kind, mesh.size)
    result = {"depth": cfg.depth, **result, "attention": model_cfg.attn_backend,
              "compute_dtype": model_cfg.compute_dtype, "params": gpt.num_params(model_cfg)["total"],
              "tokens_per_step": tokens_per_step, "step_seconds": dt, "step_seconds_min": min(step_times),
              "step_seconds_median": float(np.median(step_times)), "tokens_per_s": tokens_per_step / dt,
              "mfu_percent": mfu, "peak_bytes_in_use": peak_bytes, "loss": float(metrics["loss"])}
    print(f"{result['tokens_per_s']:,.0f} tokens/s, {dt * 1e3:.1f} ms/step (median {np.median(step_times) * 1e3:.1f}), "
          f"MFU {'-' if mfu is None else f'{mfu:.1f}%'} ({mesh.size} × {device.device_kind})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_main(main)
