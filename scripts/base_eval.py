"""CORE evaluation of a base-model checkpoint (nanochat's scripts/base_eval.py, CORE part; bpb and samples are in
scripts/base_loss.py).

    python scripts/base_eval.py                                   # largest base model, latest step, all examples
    python scripts/base_eval.py --model-tag=d20 --step=5000 --max-per-task=100
    python scripts/base_eval.py --eval-bundle=../shared/data/core_eval --tasks=copa,winograd

A task whose data file is missing (coqa in the local bundle) is skipped with a warning and CORE, labelled "k/22
tasks", is the mean over the others. Writes <base dir>/base_eval/base_model_<tag>_<step:06d>.csv (Task, Accuracy,
Centered, last row CORE) and prints a table, the CORE metric and a final JSON line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nanochat_jax.common import run_main
from nanochat_jax.config import EvalFlags, fixed, flag, parse_flags, print_config, require


@dataclass(frozen=True)
class BaseEvalConfig(EvalFlags):
    """CORE metric of a base checkpoint."""
    model_tag: str | None = flag(None, "default: the largest d<N> under base_checkpoints")
    step: int | None = flag(None, "default: the latest step")
    max_per_task: int = flag(-1, "examples per task after the seed-1337 shuffle; -1 = all")
    eval_bundle: str | None = flag(None, "a local eval bundle directory (core.yaml, eval_meta_data.csv, eval_data/); "
                                         "default: <base dir>/eval_bundle, downloaded on first use")
    tasks: str = flag("", "comma-separated task labels; empty = all of core.yaml")
    require_all: bool = flag(False, "fail if a task's data file is missing (default: CORE over those present)")
    batch_tokens: int = flag(16384, "tokens per device in one scoring batch")
    max_len: int = flag(-1, "top length bucket; -1 = the model's sequence_len")
    crop: bool = flag(False, "crop longer prompts from the left to max_len (default: score them whole in larger "
                             "power-of-two buckets, as nanochat does for its own GPT)")
    min_bucket: int = flag(64, "shortest length bucket, a power of two (buckets: powers of two up to max_len)")
    seed: int = fixed(1337, "no sampling; each task's examples are shuffled with nanochat's fixed seed 1337")

    def __post_init__(self):
        super().__post_init__()
        require(self.max_per_task == -1 or self.max_per_task > 0, "--max-per-task must be > 0 or -1 (all)")
        require(self.batch_tokens >= 1, "--batch-tokens must be >= 1")
        require(self.max_len == -1 or self.max_len >= 2, "--max-len must be >= 2 or -1 (the model's sequence_len)")
        require(self.min_bucket >= 2 and self.min_bucket & (self.min_bucket - 1) == 0,
                "--min-bucket must be a power of two >= 2")


def main(cfg: BaseEvalConfig) -> dict:
    import jax

    from nanochat_jax import core_eval, sharding
    from nanochat_jax.checkpoint import load_model, load_tokenizer, require_same_vocab, resolve_model_tag
    from nanochat_jax.common import get_base_dir, print0
    from nanochat_jax.report import get_report

    sharding.maybe_initialize_distributed(cfg.distributed)
    mesh = sharding.make_mesh(cfg.mesh)
    bundle = core_eval.ensure_eval_bundle(cfg.eval_bundle)
    tag = resolve_model_tag("base", cfg.model_tag)  # resolved here: the CSV is named after it
    params, model_cfg, meta = load_model("base", tag, cfg.step, mesh_or_sharding=mesh,
                                         config_overrides=cfg.model_settings(mesh.devices.flat[0].platform == "gpu"))
    tokenizer = load_tokenizer(meta, cfg.tokenizer_dir)
    require_same_vocab(model_cfg, tokenizer, f"checkpoint {tag}")
    step = int(meta["step"])
    print0(f"evaluating base model {tag} step {step} on {mesh.size} × {mesh.devices.flat[0].device_kind}; "
           f"bundle {bundle}")
    scorer = core_eval.make_model_scorer(params, model_cfg, mesh, pad_id=tokenizer.bos_id,
                                         max_len=None if cfg.max_len == -1 else cfg.max_len, crop=cfg.crop,
                                         min_bucket=cfg.min_bucket, batch_tokens=cfg.batch_tokens)
    print0(f"length buckets {scorer.buckets} ({'longer rows cropped' if cfg.crop else 'more added for longer rows'});"
           f" rows per batch {[scorer.rows_per_batch(b) for b in scorer.buckets]}")
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()] or None
    out = core_eval.evaluate_core(scorer, tokenizer, bundle, max_per_task=cfg.max_per_task, tasks=tasks,
                                  require_all=cfg.require_all)
    csv_path = get_base_dir() / "base_eval" / f"base_model_{tag}_{step:06d}.csv"
    n_present, missing = len(out["results"]), ", ".join(out["missing"])
    if jax.process_index() == 0:
        core_eval.write_core_csv(csv_path, out)
        get_report().log("Base model evaluation", [
            {"model": f"{tag} step {step}", "tasks": n_present, "missing": missing or "none",
             "max_per_task": cfg.max_per_task, "CORE": out["core_metric"]}, dict(out["centered_results"])])
    print0("\n" + core_eval.format_core_table(out) + f"\n\nresults written to {csv_path}")
    partial = f" over {n_present}/{out['num_tasks']} tasks (missing: {missing})" if missing else ""
    print0(f"CORE metric: {out['core_metric']:.4f}{partial}")
    summary = {"model_tag": tag, "step": step, "core_metric": out["core_metric"], "tasks": n_present,
               "missing": out["missing"], "max_per_task": cfg.max_per_task, "examples": out["examples"],
               "examples_per_second": round(out["examples_per_second"], 2), "compilations": out["compilations"],
               "buckets": list(scorer.buckets), "csv": str(csv_path)}
    print0(json.dumps(summary))
    return out


if __name__ == "__main__":
    config = parse_flags(BaseEvalConfig)
    print_config(config)
    run_main(main, config)
