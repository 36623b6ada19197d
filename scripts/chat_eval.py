"""Evaluate a chat model: ARC-Easy/Challenge and MMLU (letter logits), GSM8K, HumanEval, SpellingBee (sampled),
and ChatCORE when all of them ran.

    python scripts/chat_eval.py -i sft                                  # every task, the latest SFT model
    python scripts/chat_eval.py -i mid -a "ARC-Easy|GSM8K" -x 100        # some tasks, first 100 problems
    python scripts/chat_eval.py -i sft -a GSM8K -n 8 -t 1.0              # pass@8 with sampling
    python scripts/chat_eval.py -i sft --task-data=../shared/data        # offline task files
"""

import json
from dataclasses import dataclass

from nanochat_jax.common import run_main
from nanochat_jax.config import EvalFlags, flag, parse_flags, print_config, require


@dataclass(frozen=True)
class ChatEvalConfig(EvalFlags):
    source: str = flag("sft", "checkpoint phase: base | mid | sft | rl")
    tasks: str = flag("", "tasks, |-separated, e.g. \"ARC-Easy|MMLU\" (\"\" = all)")
    max_problems: int = flag(-1, "problems per task (-1 = all)")
    num_samples: int = flag(1, "pass@n: completions per generative problem")
    temperature: float = flag(0.0, "sampling temperature (0 = greedy)")
    top_k: int = flag(50, "top-k sampling (0 = off)")
    max_new_tokens: int = flag(512, "longest generated answer")
    batch_size: int = flag(8, "problems per engine call / categorical rows (rounded to the mesh)")
    model_tag: str | None = flag(None, "checkpoint tag (default: the largest)")
    step: int | None = flag(None, "checkpoint step (default: the latest)")
    task_data: str | None = flag(None, "a shared/data-style folder ($NANOCHAT_JAX_TASK_DATA)")

    def __post_init__(self):
        super().__post_init__()
        require(self.source in ("base", "mid", "sft", "rl"),
                f"-i/--source must be base|mid|sft|rl, got {self.source!r}")
        require(self.num_samples >= 1 and self.max_new_tokens >= 1 and self.batch_size >= 1,
                "-n, --max-new-tokens and --batch-size must be >= 1")
        require(0 <= self.temperature <= 2 and self.top_k >= 0, "-t must be in [0, 2] and -k >= 0")


def main(argv=None):
    cfg = parse_flags(ChatEvalConfig, argv, aliases={"-i": "source", "-a": "tasks", "-x": "max_problems",
                                                     "-n": "num_samples", "-t": "temperature", "-k": "top_k",
                                                     "-g": "model_tag", "-s": "step"})
    print_config(cfg)
    import jax

    from nanochat_jax import sharding
    from nanochat_jax.chat_eval import ALL_TASKS, evaluate_chat_model
    from nanochat_jax.checkpoint import load_model, load_tokenizer, resolve_model_tag
    from nanochat_jax.common import print0
    from nanochat_jax.report import ScalarLog, get_report, run_dir

    names = [t.strip() for t in cfg.tasks.split("|") if t.strip()] or list(ALL_TASKS)
    bad = [t for t in names if t not in ALL_TASKS]
    require(not bad, f"-a: unknown task(s) {bad}; choose from {'|'.join(ALL_TASKS)}")
    sharding.maybe_initialize_distributed(cfg.distributed)
    mesh = sharding.make_mesh(cfg.mesh)
    tag = resolve_model_tag(cfg.source, cfg.model_tag)
    params, model_cfg, meta = load_model(cfg.source, tag, cfg.step, mesh_or_sharding=mesh,
                                         config_overrides=cfg.model_settings(mesh.devices.flat[0].platform == "gpu"))
    tokenizer = load_tokenizer(meta, cfg.tokenizer_dir)
    step = meta.get("step")
    print0(f"evaluating {cfg.source}/{tag} step {step} on {names} ({mesh.size} device(s))")
    out = evaluate_chat_model(params, model_cfg, tokenizer, mesh, names, data_dir=cfg.task_data,
                              max_problems=None if cfg.max_problems < 0 else cfg.max_problems,
                              num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, top_k=cfg.top_k, batch_size=cfg.batch_size, seed=cfg.seed)
    details = out.pop("details")
    for name, acc in out.items():
        counts = f" ({details[name]['passed']}/{details[name]['total']})" if name in details else ""
        print0(f"{name}: {acc:.4f}{counts}")
    if jax.process_index() == 0:
        log = ScalarLog(run_dir(f"chat_eval_{cfg.source}_{tag}"))
        log(step or 0, **{f"chat_eval/{k}": v for k, v in out.items()})
        log.close()
        get_report().log(f"Chat evaluation {cfg.source}", [
            {"source": f"{cfg.source}/{tag}/{step}", "max_problems": cfg.max_problems, "num_samples": cfg.num_samples,
             "temperature": cfg.temperature, "top_k": cfg.top_k}, out])
    print0(json.dumps({"source": cfg.source, "results": out}))
    return out


if __name__ == "__main__":
    run_main(main)
