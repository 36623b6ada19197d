"""Convert checkpoints between nanochat (PyTorch .pt + meta JSON) and nanochat-jax (orbax). Needs torch (CPU build).

    python scripts/convert_checkpoint.py --direction=import --source-dir=~/.cache/nanochat/base_checkpoints/d24
    python scripts/convert_checkpoint.py --direction=export --source-dir=/tmp/d24_torch --model-tag=d24 --phase=sft
"""

from dataclasses import dataclass, field
from pathlib import Path

from nanochat_jax import convert
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir, load_model
from nanochat_jax.common import run_main
from nanochat_jax.config import parse_flags, print_config


@dataclass(frozen=True)
class ConvertConfig:
    """Convert a checkpoint between nanochat's PyTorch format and ours."""

    direction: str = field(default="import",
                           metadata={"help": "import (nanochat -> ours) or export (ours -> nanochat)"})
    source_dir: str = field(default="", metadata={"help": "nanochat checkpoint dir: read on import, written on export"})
    step: int = field(default=-1, metadata={"help": "step to convert; -1 = the latest"})
    phase: str = field(default="base", metadata={"help": "our checkpoint phase: base|mid|sft|rl"})
    model_tag: str | None = field(default=None, metadata={
        "help": "our model tag (import default: d<n_layer>; export default: the largest)"})
    overwrite: bool = field(default=False, metadata={"help": "import: replace existing steps >= step"})


def main(cfg: ConvertConfig) -> None:
    if not cfg.source_dir:
        raise SystemExit("--source-dir is required (the nanochat checkpoint directory)")
    nanochat_dir = Path(cfg.source_dir).expanduser()
    step = None if cfg.step < 0 else cfg.step
    if cfg.direction == "import":
        sd, meta, step = convert.read_nanochat_checkpoint(nanochat_dir, step)
        model_cfg = convert.config_from_nanochat(meta, sd.keys())
        params = convert.params_from_state_dict(sd, model_cfg)
        tag = cfg.model_tag or f"d{model_cfg.n_layer}"
        out = checkpoint_dir(cfg.phase, tag)
        our_meta = {"model_config": model_cfg.to_dict(), "converted_from": str(nanochat_dir),
                    "nanochat_meta": meta, **{k: meta[k] for k in ("val_bpb",) if k in meta}}
        with Checkpointer(out, async_save=False) as ckpt:
            ckpt.save(step, params=params, meta=our_meta, overwrite=cfg.overwrite)
        kind = convert.nanochat_format(sd.keys())
        print(f"imported nanochat {kind} checkpoint {nanochat_dir}/model_{step:06d}.pt ({len(sd)} tensors) "
              f"-> {out}/{step}")
    elif cfg.direction == "export":
        params, model_cfg, meta = load_model(cfg.phase, cfg.model_tag, step)
        step = int(meta["step"])
        extra = {k: meta[k] for k in ("val_bpb",) if k in meta}
        path = convert.save_nanochat_checkpoint(nanochat_dir, step, params, model_cfg, extra)
        print(f"exported {cfg.phase} checkpoint (step {step}, n_layer {model_cfg.n_layer}) -> {path} "
              f"and meta_{step:06d}.json")
    else:
        raise SystemExit(f"--direction must be 'import' or 'export', got {cfg.direction!r}")


if __name__ == "__main__":
    config = parse_flags(ConvertConfig)
    print_config(config)
    run_main(main, config)
