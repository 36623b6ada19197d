"""Per-device GPU memory of the training step, estimated on CPU (no GPU needed).

    python scripts/memory_estimate.py --depth=20 --device-batch-size=32 --max-seq-len=2048 --mesh=8 --gpu=a800-80gb
    python scripts/memory_estimate.py --depth=24 --device-batch-size=16 --gpu=h100

Compiles the training step (train.compile_train_step) for `--mesh` simulated CPU devices in bf16 and reads XLA's
buffer assignment: peak per device = arguments + outputs - donated (aliased) buffers + temporaries. Saved
activations per sequence are the slope of the temporaries between the target device batch and half of it.
Attention is a stand-in with the memory of cuDNN's fused flash attention (what GPU training uses; it cannot compile
on CPU): q, k, v and the output in bf16 plus fp32 row statistics, never the T×T scores. XLA:CPU's buffers are not
XLA:GPU's, so this is an estimate; bench_train.py reports `peak_bytes_in_use` on a GPU to check it. Last line: JSON.
"""

from __future__ import annotations

import os
import sys


def _force_host_devices(argv: list[str]) -> None:
    """Simulated CPU devices must be requested before jax is imported: one per --mesh device (default 8)."""
    n = next((a.split("=", 1)[1] for a in argv if a.startswith("--mesh=")), "8")
    if "--mesh" in argv[:-1]:
        n = argv[argv.index("--mesh") + 1]
    n = n if n.isdigit() and int(n) > 0 else "8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"


if __name__ == "__main__":
    _force_host_devices(sys.argv[1:])

import json  # noqa: E402
import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from unittest import mock  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nanochat_jax import gpt, optim, pretrain, sharding, train  # noqa: E402
from nanochat_jax.common import run_main  # noqa: E402
from nanochat_jax.config import flag, parse_flags, print_config, require  # noqa: E402

GB = 1e9
# Memory per device (bytes) of the GPUs we plan for (NVIDIA datasheets).
GPU_MEMORY = {"a800-80gb": 80e9, "a100-80gb": 80e9, "a100-40gb": 40e9, "h100": 80e9, "h200": 141e9}


@dataclass(frozen=True)
class MemoryEstimateConfig:
    """Per-device memory of the train step at this size, estimated on simulated CPU devices."""
    depth: int = flag(20, "transformer layers")
    aspect_ratio: int = flag(64, "model width per layer of depth")
    head_dim: int = flag(128, "attention head size")
    n_kv_head: int = flag(-1, "key/value heads (GQA); -1 = n_head")
    max_seq_len: int = flag(2048, "context length in tokens")
    window_pattern: str = flag("SSSL", "attention windows per layer, repeated: L = full context, S = short")
    vocab_size: int = flag(32768, "vocabulary size")
    device_batch_size: int = flag(32, "sequences per device per micro-batch")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    # not RuntimeFlags: the devices are simulated CPUs, attention a stand-in, the dtype bf16 (what GPU training uses)
    mesh: int = flag(8, "devices (simulated on CPU; the script asks XLA for this many)")
    fsdp: bool = flag(True, "shard params and optimizer state over the devices; else replicate")
    remat: bool = flag(False, "recompute each block's activations in the backward pass (pretrain.py --remat)")
    gpu: str = flag("a800-80gb", f"the GPU whose memory the peak is checked against: {'|'.join(GPU_MEMORY)}")
    usable_fraction: float = flag(0.9, "share of the GPU's memory JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION; "
                                       "JAX's own default is 0.75)")

    def __post_init__(self):
        require(self.gpu in GPU_MEMORY, f"--gpu must be one of {'|'.join(GPU_MEMORY)}, got {self.gpu!r}")
        require(0 < self.usable_fraction <= 1, f"--usable-fraction must be in (0, 1], got {self.usable_fraction}")
        require(self.device_batch_size >= 1 and self.grad_accum >= 1 and self.mesh >= 1,
                "--device-batch-size, --grad-accum and --mesh must be >= 1")


@jax.custom_vjp
def _flash_standin(q, k, v):
    """Same inputs, output and saved tensors as a fused flash attention (not its math: a few cheap reductions)."""
    return _flash_standin_fwd(q, k, v)[0]


def _flash_standin_fwd(q, k, v):
    o = (q * jnp.mean(k) + jnp.mean(v)).astype(q.dtype)
    stats_BTH = jnp.sum(q.astype(jnp.float32), axis=-1)  # the fp32 log-sum-exp per query row and head
    return o, (q, k, v, o, stats_BTH)


def _flash_standin_bwd(res, do):
    q, k, v, o, stats_BTH = res
    s = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32))
    dq = (do * jnp.mean(k) + stats_BTH[..., None].astype(do.dtype)).astype(q.dtype)
    dk = (k * jnp.mean(q) + s).astype(k.dtype)
    dv = (v * jnp.mean(do) + s).astype(v.dtype)
    return dq, dk, dv


_flash_standin.defvjp(_flash_standin_fwd, _flash_standin_bwd)


def flash_attention_standin():
    """Context manager: gpt.attention replaced by the stand-in while tracing."""
    return mock.patch.object(gpt, "attention", lambda q, k, v, **_: _flash_standin(q, k, v))


def per_device_bytes(shapes, shardings) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs laid out with these shardings."""
    return sum(math.prod(sh.shard_shape(s.shape)) * jnp.dtype(s.dtype).itemsize
               for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def compiled_memory(model_cfg, tx, mesh, state_shapes, batch_shape, shard: bool) -> dict:
    """memory_analysis() of the compiled train step, in bytes per device."""
    with flash_attention_standin():
        _, _, info = train.compile_train_step(model_cfg, tx, mesh, state_shapes, batch_shape, shard_params=shard)
    mem = info.get("memory")
    require(mem is not None, "this JAX backend gives no memory analysis of compiled programs")
    mem["peak"] = mem["argument_size_in_bytes"] + mem["output_size_in_bytes"] - mem["alias_size_in_bytes"] \
        + mem["temp_size_in_bytes"]
    mem["compile_seconds"] = info["compile_seconds"]
    return mem


def estimate(cfg: MemoryEstimateConfig) -> dict:
    mesh = sharding.make_mesh(cfg.mesh)
    pcfg = pretrain.PretrainConfig(depth=cfg.depth, aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim,
                                n_kv_head=cfg.n_kv_head, max_seq_len=cfg.max_seq_len, window_pattern=cfg.window_pattern,
                                attention="xla", compute_dtype="bfloat16", remat=cfg.remat)
    model_cfg = pretrain.build_model_config(pcfg, cfg.vocab_size, on_gpu=False)
    opt_cfg = optim.OptimConfig(num_iterations=1000, model_dim=model_cfg.n_embd)
    tx = optim.build_optimizer(gpt.param_shapes(model_cfg), opt_cfg)
    state_shapes = train.abstract_state(model_cfg, tx)
    shardings = train.state_shardings(model_cfg, state_shapes, mesh, cfg.fsdp)
    batches = sorted({cfg.device_batch_size, max(1, cfg.device_batch_size // 2)})
    mems = {b: compiled_memory(model_cfg, tx, mesh, state_shapes, (cfg.grad_accum, b * cfg.mesh, cfg.max_seq_len),
                               cfg.fsdp) for b in batches}
    full = mems[cfg.device_batch_size]
    if len(batches) == 2:
        lo, hi = batches
        per_seq = (mems[hi]["temp_size_in_bytes"] - mems[lo]["temp_size_in_bytes"]) / (hi - lo)
        method = f"slope of XLA temporaries between device batch {lo} and {hi}"
    else:
        per_seq = full["temp_size_in_bytes"]
        method = "XLA temporaries at device batch 1 (an upper bound: includes the batch-independent part)"
    budget = GPU_MEMORY[cfg.gpu] * cfg.usable_fraction
    return {"depth": cfg.depth, "device_batch_size": cfg.device_batch_size, "max_seq_len": cfg.max_seq_len,
            "grad_accum": cfg.grad_accum, "devices": cfg.mesh, "gpu": cfg.gpu, "compute_dtype": "bfloat16",
            "remat": cfg.remat, "params": gpt.num_params(model_cfg)["total"],
            "param_bytes_per_device": per_device_bytes(state_shapes["params"], shardings["params"]),
            "optimizer_bytes_per_device": per_device_bytes(state_shapes["opt_state"], shardings["opt_state"]),
            "temp_bytes_per_device": full["temp_size_in_bytes"],
            "saved_activation_bytes_per_sequence": per_seq,
            "peak_bytes_per_device": full["peak"], "usable_bytes_per_device": budget,
            "fits": full["peak"] <= budget, "method": method,
            "attention": "flash stand-in (q, k, v, out in bf16 + fp32 row stats saved)",
            "compile_seconds": sum(m["compile_seconds"] for m in mems.values())}


def main(argv=None) -> dict:
    cfg = parse_flags(MemoryEstimateConfig, argv)
    print_config(cfg)
    require(len(jax.devices()) >= cfg.mesh,
            f"--mesh={cfg.mesh} but only {len(jax.devices())} devices exist (run this script directly: it sets "
            f"XLA_FLAGS=--xla_force_host_platform_device_count before importing jax)")
    r = estimate(cfg)
    print(f"model d{r['depth']}: {r['params']:,} params; {r['devices']} devices, device batch {r['device_batch_size']}"
          f" x {r['max_seq_len']} (x{r['grad_accum']} micro-batches), bf16, remat={int(r['remat'])}")
    print(f"params            {r['param_bytes_per_device'] / GB:7.2f} GB per device")
    print(f"optimizer state   {r['optimizer_bytes_per_device'] / GB:7.2f} GB per device")
    print(f"saved activations {r['saved_activation_bytes_per_sequence'] / GB:7.3f} GB per sequence "
          f"({r['method']}); x{r['device_batch_size']} = "
          f"{r['saved_activation_bytes_per_sequence'] * r['device_batch_size'] / GB:.1f} GB")
    print(f"temporaries       {r['temp_bytes_per_device'] / GB:7.2f} GB per device (XLA buffer assignment)")
    print(f"peak              {r['peak_bytes_per_device'] / GB:7.2f} GB per device vs "
          f"{r['usable_bytes_per_device'] / GB:.1f} GB usable on {r['gpu']}: {'fits' if r['fits'] else 'DOES NOT FIT'}")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    run_main(main)
