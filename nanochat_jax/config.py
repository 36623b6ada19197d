"""Frozen dataclass configs and the one flag parser every script uses.

`parse_flags(Config)` turns `--key=value` / `--key value` flags (nanochat's dash style, underscores accepted too)
into a frozen dataclass, checking types and the dataclass's `__post_init__`: a bad flag stops at start-up with one
line. Every field carries its `--help` text: `depth: int = flag(20, "transformer layers")`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

C = TypeVar("C")

_INT_EXPR = re.compile(r"^\s*-?[\d_]+(\s*\*\s*[\d_]+)*\s*$")


def flag(default: Any, help: str) -> Any:
    """A config field with its --help text (the default must be immutable: configs are frozen)."""
    return dataclasses.field(default=default, metadata={"help": help})


def _parse_int(text: str) -> int:
    """Integers, with `_` separators and products (`80*524288`, as nanochat's defaults are written)."""
    if not _INT_EXPR.match(text):
        raise ValueError(f"not an integer: {text!r}")
    value = 1
    for part in text.split("*"):
        value *= int(part.strip().replace("_", ""))
    return value


def _parse_bool(text: str) -> bool:
    for value, words in ((True, ("1", "true", "yes", "on")), (False, ("0", "false", "no", "off"))):
        if text.strip().lower() in words:
            return value
    raise ValueError(f"not a boolean: {text!r} (use 1/0 or true/false)")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, else (tp, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _converter(tp: Any):
    base, optional = _unwrap_optional(tp)
    parse = {bool: _parse_bool, int: _parse_int, float: float, str: str}.get(base)
    if parse is None:
        raise TypeError(f"unsupported config field type {tp!r}")

    def convert(text: str):
        if optional and text.strip().lower() in ("none", "null", ""):
            return None
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(base, "__name__", str(base))
    return convert


def parse_flags(cls: type[C], argv: Sequence[str] | None = None, *, description: str | None = None,
                aliases: dict[str, str] | None = None, prog: str | None = None) -> C:
    """Parse command-line flags into the frozen dataclass `cls`; aliases maps extra option strings to field names,
    e.g. {"-i": "source"} for chat_eval's short flags."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip(),
                                     allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    extra = {}
    for short, name in (aliases or {}).items():
        extra.setdefault(name, []).append(short)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        names = [*extra.get(f.name, []), f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kwargs: dict[str, Any] = dict(dest=f.name, type=_converter(hints[f.name]), default=default,
                                      help=f.metadata.get("help", " "), required=required)
        if _unwrap_optional(hints[f.name])[0] is bool:
            kwargs.update(nargs="?", const=True)  # `--flag` alone means true
        parser.add_argument(*names, **kwargs)
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except (ValueError, TypeError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def require(ok: bool, msg: str) -> None:
    """The one config check: raise ValueError(msg) unless ok (parse_flags turns it into a clean exit)."""
    if not ok:
        raise ValueError(msg)


def print_config(cfg: Any, file=None) -> None:
    """Print the resolved config as one JSON block, so every run's settings are in its log."""
    from nanochat_jax.common import print0

    print0(f"{type(cfg).__name__} {json.dumps(dataclasses.asdict(cfg), indent=2)}", file=file or sys.stdout)


def fixed(value: Any, why: str) -> Any:
    """A base flag that a script does not take: the field keeps `value` (printed with the config), and `why` says
    why there is no flag for it."""
    return dataclasses.field(default=value, init=False, metadata={"help": why})


def runtime_settings(compute_dtype: str, attention: str, on_gpu: bool) -> dict:
    """The `auto` flags resolved: bf16 + cuDNN attention on GPU, fp32 + XLA attention elsewhere."""
    return {"compute_dtype": compute_dtype if compute_dtype != "auto" else ("bfloat16" if on_gpu else "float32"),
            "attn_backend": attention if attention != "auto" else ("cudnn" if on_gpu else "xla")}


@dataclass(frozen=True)
class RuntimeFlags:
    """Where and how a script runs its model: every config with one of these flags extends this class (a script
    without one of them fixes it with `fixed`), and `model_settings` is the one resolution of `auto`."""
    mesh: int = flag(-1, "devices in the (\"data\",) mesh; -1 = all")
    distributed: bool | None = flag(None, "multi-process run (jax.distributed); None: auto-detect a launcher")
    fsdp: bool = flag(True, "shard params/optimizer state over the mesh (ZeRO/FSDP); else replicate")
    attention: str = flag("auto", "auto | xla | cudnn | pallas (auto: cudnn on GPU, xla elsewhere)")
    compute_dtype: str = flag("auto", "auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32")
    tokenizer_dir: str | None = flag(None, "tokenizer folder (default <base dir>/tokenizer)")
    seed: int = flag(42, "seed of the parameter init and the sampling")

    def __post_init__(self):
        require(self.attention in ("auto", "xla", "cudnn", "pallas"),
                f"--attention must be auto|xla|cudnn|pallas, got {self.attention!r}")
        require(self.compute_dtype in ("auto", "bfloat16", "float32"), "--compute-dtype must be auto|bfloat16|float32")

    def model_settings(self, on_gpu: bool) -> dict:
        """The GPTConfig fields these flags set (compute_dtype, attn_backend), `auto` resolved for the platform."""
        return runtime_settings(self.compute_dtype, self.attention, on_gpu)


# --tokenizer-dir of every script that reads a checkpoint (resolved by checkpoint.load_tokenizer)
CHECKPOINT_TOKENIZER = "tokenizer folder (default: the one the checkpoint was trained with, else <base dir>/tokenizer)"


@dataclass(frozen=True)
class EvalFlags(RuntimeFlags):
    """RuntimeFlags of the scripts that evaluate a saved checkpoint (base_eval, base_loss, chat_eval)."""
    fsdp: bool = fixed(False, "evaluation replicates the params on every device")
    tokenizer_dir: str | None = flag(None, CHECKPOINT_TOKENIZER)


@dataclass(frozen=True)
class SourceFlags(RuntimeFlags):
    """RuntimeFlags plus what the chat stages (mid/SFT in chat_train.py, RL in rl.py) take from their source
    checkpoint (-1 / None: inherit it)."""
    model_tag: str | None = flag(None, "source model tag (default: the largest); the output uses the same tag")
    model_step: int | None = flag(None, "source step (default: latest)")
    embedding_lr: float = flag(-1.0, "AdamW lr of the token embedding (-1: the source's), times init_lr_frac")
    unembedding_lr: float = flag(-1.0, "AdamW lr of lm_head (-1: the source's), times init_lr_frac")
    matrix_lr: float = flag(-1.0, "Muon lr of the transformer matrices (-1: the source's), times init_lr_frac")
    scalar_lr: float = flag(-1.0, "AdamW lr of the per-layer scalars (-1: the source's), times init_lr_frac")
    task_data: str | None = flag(None, "a shared/data-style folder for the task files ($NANOCHAT_JAX_TASK_DATA)")

    def lr_flags(self) -> dict[str, float]:
        """The four lr flags, for checkpoint.Source.lrs."""
        return {k: getattr(self, k) for k in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")}
