"""Convert checkpoints between nanochat (PyTorch .pt + meta JSON) and nanochat-jax (orbax).

    python scripts/convert_checkpoint.py --direction=import --source-dir=~/.cache/nanochat/base_checkpoints/d24
    python scripts/convert_checkpoint.py --direction=export --source-dir=/tmp/d24_torch --model-tag=d24 --phase=sft

Import needs no torch (restricted unpicklers, no code in the files runs) and brings the tokenizer along: nanochat's
tokenizer.pkl from --tokenizer-dir, else the source dir (a downloaded checkpoint folder), else
<source>/../../tokenizer (nanochat's base-dir layout), saved in our format under
<base dir>/imported_tokenizers/<phase>-<tag>/ and recorded in the checkpoint, where `scripts/chat_cli.py -i <phase>
--model-tag=<tag>` finds it. Export needs torch (CPU build).
"""

from dataclasses import dataclass
from pathlib import Path

from nanochat_jax import convert
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir, load_model
from nanochat_jax.common import UserError, get_base_dir, run_main
from nanochat_jax.config import flag, parse_flags, print_config, require
from nanochat_jax.tokenizer import get_tokenizer


@dataclass(frozen=True)
class ConvertConfig:
    """Convert a checkpoint between nanochat's PyTorch format and ours."""

    direction: str = flag("import", "import (nanochat -> ours) or export (ours -> nanochat)")
    source_dir: str = flag("", "nanochat checkpoint dir: read on import, written on export")
    step: int = flag(-1, "step to convert; -1 = the latest")
    phase: str = flag("base", "our checkpoint phase: base|mid|sft|rl")
    model_tag: str | None = flag(None, "our model tag (import default: d<n_layer>; export default: the largest)")
    overwrite: bool = flag(False, "import: replace existing steps >= step")
    tokenizer_dir: str = flag("", "import: nanochat tokenizer folder (tokenizer.pkl); default: the source dir, else "
                                  "<source>/../../tokenizer")

    def __post_init__(self):
        require(self.direction in ("import", "export"),
                f"--direction must be 'import' or 'export', got {self.direction!r}")


def find_nanochat_tokenizer(source: Path, given: str) -> Path | None:
    """The folder holding the checkpoint's tokenizer (tokenizer.pkl, or our tokenizer.json), or None."""
    if given:
        folder = Path(given).expanduser()
        if not ((folder / "tokenizer.pkl").is_file() or (folder / "tokenizer.json").is_file()):
            raise UserError(f"--tokenizer-dir={folder}: no tokenizer.pkl (nanochat) or tokenizer.json (ours) "
                            f"there; pass the folder nanochat's tok_train.py wrote")
        return folder
    return next((f for f in (source, source.parent.parent / "tokenizer") if (f / "tokenizer.pkl").is_file()), None)


def import_tokenizer(folder: Path, out: Path, vocab_size: int) -> Path:
    """Load nanochat's tokenizer (no pickle code runs), check it fits the model, save it in our format."""
    tok = get_tokenizer(folder)
    if tok.vocab_size != vocab_size:
        raise UserError(f"{folder}: the tokenizer has {tok.vocab_size} tokens but the checkpoint's model has "
                        f"vocab_size {vocab_size}; pass the checkpoint's own tokenizer with --tokenizer-dir")
    pt = folder / "token_bytes.pt"
    theirs = convert.read_pt(pt) if pt.is_file() else None
    if getattr(theirs, "shape", None) == tok.token_bytes().shape:  # ours come from the tokenizer: say if they differ
        n_diff = int((theirs != tok.token_bytes()).sum())
        if n_diff:
            print(f"note: {pt} differs from the tokenizer's own byte lengths for {n_diff} tokens (older "
                  f"nanochat counted decoded text); using the tokenizer's")
    tok.save(out)
    return out


def main(cfg: ConvertConfig) -> None:
    if not cfg.source_dir:
        raise SystemExit("--source-dir is required (the nanochat checkpoint directory)")
    nanochat_dir = Path(cfg.source_dir).expanduser()
    step = None if cfg.step < 0 else cfg.step
    if cfg.direction == "export":
        params, model_cfg, meta = load_model(cfg.phase, cfg.model_tag, step)
        step = int(meta["step"])
        extra = {k: meta[k] for k in ("val_bpb",) if k in meta}
        path = convert.save_nanochat_checkpoint(nanochat_dir, step, params, model_cfg, extra)
        print(f"exported {cfg.phase} checkpoint (step {step}, n_layer {model_cfg.n_layer}) -> {path} "
              f"and meta_{step:06d}.json")
        return
    sd, meta, step = convert.read_nanochat_checkpoint(nanochat_dir, step)
    model_cfg = convert.config_from_nanochat(meta, sd.keys())
    params = convert.params_from_state_dict(sd, model_cfg)
    tag = cfg.model_tag or f"d{model_cfg.n_layer}"
    our_meta = {"model_config": model_cfg.to_dict(), "converted_from": str(nanochat_dir), "nanochat_meta": meta,
                **{k: meta[k] for k in ("val_bpb",) if k in meta}}
    tok_folder, tok_out = find_nanochat_tokenizer(nanochat_dir, cfg.tokenizer_dir), None
    if tok_folder is not None:
        tok_out = import_tokenizer(tok_folder, get_base_dir() / "imported_tokenizers" / f"{cfg.phase}-{tag}",
                                   model_cfg.vocab_size)
        our_meta["user_config"] = {"tokenizer_dir": str(tok_out.absolute())}  # what load_tokenizer reads
    out = checkpoint_dir(cfg.phase, tag)
    with Checkpointer(out, async_save=False) as ckpt:
        ckpt.save(step, params=params, meta=our_meta, overwrite=cfg.overwrite)
    print(f"imported nanochat {convert.nanochat_format(sd.keys())} checkpoint {nanochat_dir}/model_{step:06d}.pt "
          f"({len(sd)} tensors) -> {out}/{step}")
    if tok_out is not None:
        print(f"imported its tokenizer {tok_folder} -> {tok_out}")
        print(f"chat with it: python scripts/chat_cli.py -i {cfg.phase} --model-tag={tag}")
    else:
        print(f"no tokenizer.pkl in {nanochat_dir} or {nanochat_dir.parent.parent / 'tokenizer'}: pass "
              f"--tokenizer-dir to bring it along (chat_cli.py needs it, or its own --tokenizer-dir)")


if __name__ == "__main__":
    config = parse_flags(ConvertConfig)
    print_config(config)
    run_main(main, config)
