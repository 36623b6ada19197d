"""Bits per byte of a base checkpoint on the train and val splits, and samples (nanochat's scripts/base_loss.py;
current nanochat folds it into base_eval --eval=bpb,sample).

    python scripts/base_loss.py                                   # largest base model, latest step
    python scripts/base_loss.py --model-tag=d20 --split-tokens=524288 --device-batch-size=16
    python scripts/base_loss.py --eval=sample --num-samples=4 --temperature=0.8

bpb: --split-tokens tokens per split (whole steps of device_batch_size × sequence_len × devices) from the
pretraining loader (train = every shard but the last, val = the last). Samples, from the Engine: greedy 16-token
continuations of nanochat's 7 prompts, and --num-samples unconditioned ones (from BOS alone) at --temperature.
Writes <base dir>/base_eval/base_loss_<tag>_<step:06d>.json atomically and prints a final JSON line.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from nanochat_jax.common import run_main
from nanochat_jax.config import EvalFlags, flag, parse_flags, print_config, require

EVALS = ("bpb", "sample")


@dataclass(frozen=True)
class BaseLossConfig(EvalFlags):
    """Train/val bits per byte and samples of a base checkpoint."""
    model_tag: str | None = flag(None, "default: the largest d<N> under base_checkpoints")
    step: int | None = flag(None, "default: the latest step")
    eval: str = flag("bpb,sample", "any of bpb, sample (comma-separated)")
    device_batch_size: int = flag(32, "rows per device per bpb step (each of the model's sequence_len)")
    split_tokens: int = flag(40 * 524288, "tokens per split")
    num_samples: int = flag(8, "unconditioned samples")
    sample_tokens: int = flag(128, "tokens per unconditioned sample")
    temperature: float = flag(1.0, "for the unconditioned samples (0 = greedy)")
    seed: int = flag(42, "seed of the unconditioned samples")
    data_dir: str | None = flag(None, "pretraining shards (default: $NANOCHAT_JAX_DATA_DIR or the base dir's)")

    def __post_init__(self):
        super().__post_init__()
        evals = [e.strip() for e in self.eval.split(",") if e.strip()]
        require(evals and set(evals) <= set(EVALS),
                f"--eval must be a comma-separated subset of {EVALS}, got {self.eval!r}")
        require(self.device_batch_size >= 1, "--device-batch-size must be >= 1")
        require(self.split_tokens >= 1, "--split-tokens must be >= 1")
        require(self.num_samples >= 0 and self.sample_tokens >= 1, "--num-samples >= 0 and --sample-tokens >= 1")
        require(self.temperature >= 0, "--temperature must be >= 0")


def main(cfg: BaseLossConfig) -> dict:
    import jax
    import jax.numpy as jnp

    from nanochat_jax import sharding
    from nanochat_jax.checkpoint import load_model, load_tokenizer, require_same_vocab, resolve_model_tag
    from nanochat_jax.common import atomic_write, get_base_dir, print0
    from nanochat_jax.dataloader import ShardedLoader
    from nanochat_jax.dataset import list_parquet_files, resolve_data_dir, split_files
    from nanochat_jax.engine import Engine
    from nanochat_jax.loss_eval import evaluate_bpb, make_bpb_fn
    from nanochat_jax.report import get_report
    from nanochat_jax.train import SAMPLE_PROMPTS

    evals = [e.strip() for e in cfg.eval.split(",") if e.strip()]
    sharding.maybe_initialize_distributed(cfg.distributed)
    mesh = sharding.make_mesh(cfg.mesh)
    tag = resolve_model_tag("base", cfg.model_tag)  # resolved here: the output is named after it
    params, model_cfg, meta = load_model("base", tag, cfg.step, mesh_or_sharding=mesh,
                                         config_overrides=cfg.model_settings(mesh.devices.flat[0].platform == "gpu"))
    tokenizer = load_tokenizer(meta, cfg.tokenizer_dir)
    require_same_vocab(model_cfg, tokenizer, f"checkpoint {tag}")
    step = int(meta["step"])
    T = model_cfg.sequence_len
    print0(f"base model {tag} step {step} on {mesh.size} × {mesh.devices.flat[0].device_kind}")
    result = {"model_tag": tag, "step": step}

    if "bpb" in evals:
        tokens_per_step = cfg.device_batch_size * T * mesh.size
        steps = cfg.split_tokens // tokens_per_step
        if steps == 0 or cfg.split_tokens % tokens_per_step:
            steps = max(steps, 1)
            print0(f"--split-tokens={cfg.split_tokens} is not a multiple of device_batch_size × sequence_len × "
                   f"devices = {cfg.device_batch_size} × {T} × {mesh.size}; evaluating {steps * tokens_per_step} "
                   f"tokens per split")
        files = list_parquet_files(resolve_data_dir(cfg.data_dir))
        # one reader per device, strided by its place in the mesh (as in pretraining)
        shards = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
        batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        bpb_fn = jax.jit(make_bpb_fn(model_cfg), in_shardings=(replicated, batch, batch, replicated))
        token_bytes = jnp.asarray(tokenizer.token_bytes(), jnp.int32)
        result["bpb"] = {}
        for split in ("train", "val"):
            t0 = time.perf_counter()
            with ShardedLoader(tokenizer, cfg.device_batch_size, T, split, files=split_files(files, split),
                               shard_indices=shards, num_shards=mesh.size) as loader:
                batches = ({k: sharding.global_batch(v, mesh) for k, v in b.items()} for b in loader)
                bpb = evaluate_bpb(bpb_fn, params, batches, token_bytes, steps)
            dt = time.perf_counter() - t0
            result["bpb"][split] = bpb
            print0(f"{split} bpb: {bpb:.6f} ({steps * tokens_per_step:,} tokens in {dt:.1f}s, "
                   f"{steps * tokens_per_step / dt:,.0f} tok/s)")

    if "sample" in evals:
        # as nanochat's scripts/base_eval.py: the Engine, on this process's first device, with the params gathered
        # whole (every process joins; process 0 prints)
        engine = Engine(sharding.gather_to_process(params), model_cfg, tokenizer)
        prompts = [tokenizer.encode(p, prepend=tokenizer.bos_id) for p in SAMPLE_PROMPTS]
        rows, _ = engine.generate_batch(prompts, max_tokens=16, temperature=0)
        result["samples"] = [tokenizer.decode(r) for r in rows]
        print0("\nconditioned samples (greedy):" + "".join(f"\n{'-' * 80}\n{s}" for s in result["samples"]))
        result["unconditioned_samples"] = []
        if cfg.num_samples > 0:
            rows, _ = engine.generate_batch([tokenizer.bos_id], num_samples=cfg.num_samples,
                                            max_tokens=cfg.sample_tokens, temperature=cfg.temperature, seed=cfg.seed)
            result["unconditioned_samples"] = [tokenizer.decode(r) for r in rows]
            print0(f"\nunconditioned samples (temperature {cfg.temperature}, {cfg.sample_tokens} tokens):" +
                   "".join(f"\n{'-' * 80}\n{s}" for s in result["unconditioned_samples"]))

    path = get_base_dir() / "base_eval" / f"base_loss_{tag}_{step:06d}.json"
    if jax.process_index() == 0:
        with atomic_write(path, "w") as f:
            json.dump(result, f, indent=2)
        bpbs = {f"{split} bpb": v for split, v in result.get("bpb", {}).items()}
        get_report().log("Base model loss", [{"model": f"{tag} step {step}", **bpbs},
                                             *[f"sample: {s}" for s in result.get("samples", [])]])
    print0(f"\nresults written to {path}")
    print0(json.dumps({k: v for k, v in result.items() if k in ("model_tag", "step", "bpb")} | {"json": str(path)}))
    return result


if __name__ == "__main__":
    config = parse_flags(BaseLossConfig)
    print_config(config)
    run_main(main, config)
