"""Checkpoints: params, optimizer state and JSON metadata in one orbax step directory.

Layout as nanochat/checkpoint_manager.py: <base dir>/{base,mid,chatsft,chatrl}_checkpoints/<tag>/<step>/ holding
params/ (sharded arrays, each process writes its shards), opt_state/ (optional: only resuming needs it) and meta/
(JSON: model_config, user_config, loader and loop state, val_bpb, step). `Checkpointer` saves (async, collective)
and restores a run; `load_model` gives eval/inference the params only. Nothing half-written is ever picked up:
orbax writes `<step>.orbax-checkpoint-tmp-<t>/` and renames it once every process has finished. Once `save`
returns, the arrays are on host, so the caller may donate or overwrite them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from nanochat_jax import gpt, sharding
from nanochat_jax.common import UserError, get_base_dir, held_background_errors, path_str

PHASE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
              "rl": "chatrl_checkpoints"}
# What writes each phase's checkpoints (for "how do I get one" hints).
PHASE_SCRIPTS = {"base": "scripts/pretrain.py", "mid": "scripts/midtrain.py", "sft": "scripts/sft.py",
                 "rl": "scripts/rl.py"}


def _phase_dir(phase: str) -> Path:
    if phase not in PHASE_DIRS:
        raise ValueError(f"unknown checkpoint phase {phase!r}; expected one of {sorted(PHASE_DIRS)}")
    return get_base_dir() / PHASE_DIRS[phase]


def checkpoint_dir(phase: str, model_tag: str) -> Path:
    """<base dir>/<phase dir>/<model_tag>, e.g. ~/.cache/nanochat_jax/base_checkpoints/d12."""
    return _phase_dir(phase) / model_tag


# ----------------------------------------------------------------------------------------------
# Pytree helpers

def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {path_str(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def with_sharding(shapes, sharding: jax.sharding.Sharding):
    """The same ShapeDtypeStructs, every leaf placed with `sharding` (a restore target)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _jsonable(meta: dict) -> dict:
    """A JSON copy of meta (numpy/jax values as Python ones): fails here rather than in orbax's background thread."""
    def default(x):
        if isinstance(x, (np.generic, np.ndarray, jax.Array)):
            return np.asarray(x).tolist()
        if isinstance(x, os.PathLike):
            return os.fspath(x)
        raise TypeError(f"checkpoint meta: {type(x).__name__} value {x!r} is not JSON-serialisable; store plain "
                        f"numbers/strings/lists/dicts (e.g. dataclasses.asdict(cfg))")
    return json.loads(json.dumps(meta, default=default))


def _one_line(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    text = text.split(" See full TensorStore details")[0]  # then a multi-page spec dump
    return text if len(text) <= 200 else text[:197] + "..."


# ----------------------------------------------------------------------------------------------
# Checkpointer

class Checkpointer:
    """One orbax CheckpointManager over a directory of step checkpoints. Every JAX process must make the same
    save/restore calls (they are collective). keep=None keeps every checkpoint (nanochat never deletes)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = None, async_save: bool = True):
        if keep is not None and keep < 1:
            raise ValueError(f"Checkpointer: keep must be >= 1 or None (keep all), got {keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        # Explicit handlers, so a fresh manager can read metadata of steps it did not write itself.
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest step, counting one still being written asynchronously (restore waits for it)."""
        return self._mngr.latest_step()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:  # idempotent
        if self._mngr is not None:
            self._mngr.wait_until_finished()
            self._mngr.close()
            self._mngr = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save(self, step: int, *, params, opt_state=None, meta: dict, overwrite: bool = False) -> None:
        """Start saving `step` (async unless async_save=False); meta gets "step". Orbax only saves steps above the
        latest: overwrite=True first deletes every saved step >= `step` (e.g. after resuming from an earlier one)."""
        step = int(step)
        if not isinstance(meta, dict):
            raise TypeError(f"Checkpointer.save: meta must be a dict, got {type(meta).__name__}")
        if meta.get("step", step) != step:
            raise ValueError(f"Checkpointer.save: meta['step']={meta['step']} but saving step {step}")
        meta = _jsonable({**meta, "step": step})
        later = [s for s in self.all_steps() if s >= step]
        if later:
            if not overwrite:
                raise FileExistsError(
                    f"cannot save step {step} in {self.directory}: steps {later} are already there and orbax "
                    f"only saves steps after the latest. Pass overwrite=True to delete them, or use another "
                    f"model tag / directory")
            self.wait()
            for s in later:
                self._mngr.delete(s)
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if not self._mngr.save(step, args=ocp.args.Composite(**items)):
            raise RuntimeError(f"orbax declined to save step {step} in {self.directory} "
                               f"(latest is {self.latest_step()})")

    def resolve_step(self, step: int | None) -> int:
        """`step` if it was saved, the latest if None (after any in-flight save); else an error naming the steps."""
        self.wait()  # never read a step that is still being written
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no checkpoints in {self.directory} (empty, or only unfinished "
                f"'<step>.orbax-checkpoint-tmp-*' saves). Produce one by training, e.g. `python "
                f"{PHASE_SCRIPTS['base']}` for base_checkpoints, or point at the right directory")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        return int(step)

    def _check_target(self, step: int, name: str, abstract) -> None:
        """The target needs shardings, and the checkpoint's paths and shapes: name every difference."""
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
            if getattr(leaf, "sharding", None) is None:
                raise ValueError(f"restore {name}: leaf {path_str(path)!r} has no sharding. Restore targets must be "
                                 f"ShapeDtypeStructs with .sharding (that is where the arrays land); build them with "
                                 f"jax.tree.map(ocp.utils.to_shape_dtype_struct, live_tree) or "
                                 f"checkpoint.with_sharding(shapes, sharding)")
        with self._reading(step):
            saved = _shapes(self._mngr.item_metadata(step)[name].tree)
        want = _shapes(abstract)
        problems = [f"{k}: checkpoint {saved[k]}, target {want[k]}" for k in sorted(saved.keys() & want.keys())
                    if saved[k] != want[k]]
        problems += [f"{k}: in the target but not in the checkpoint" for k in sorted(want.keys() - saved.keys())]
        problems += [f"{k}: in the checkpoint but not in the target" for k in sorted(saved.keys() - want.keys())]
        if problems:
            shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20
                                                 else "")
            raise ValueError(f"checkpoint {self.directory / str(step)} {name} does not match the restore target "
                             f"(a different model config or optimizer?):\n  {shown}")

    def restore(self, step: int | None = None, *, abstract_params, abstract_opt_state=None):
        """(params, opt_state or None, meta) of `step` (None: latest). The abstract trees are ShapeDtypeStructs
        with shardings: arrays come back placed that way (however they were saved) and cast to the target dtypes."""
        step = self.resolve_step(step)
        targets = {"params": abstract_params}
        if abstract_opt_state is not None:
            if not (self.directory / str(step) / "opt_state").is_dir():
                raise ValueError(f"checkpoint {self.directory / str(step)} has no optimizer state (it was saved "
                                 f"with opt_state=None); restore with abstract_opt_state=None and start the "
                                 f"optimizer fresh")
            targets["opt_state"] = abstract_opt_state
        for name, abstract in targets.items():
            self._check_target(step, name, abstract)
        args = {name: ocp.args.StandardRestore(abstract) for name, abstract in targets.items()}
        with self._reading(step):
            out = self._mngr.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))
        opt_state = out.opt_state if abstract_opt_state is not None else None
        return out.params, opt_state, out.meta

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of `step` (None: latest), without touching the arrays."""
        step = self.resolve_step(step)
        with self._reading(step):
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(meta, dict):
            raise UserError(f"checkpoint {self.directory / str(step)}: its meta is not a JSON object; "
                            f"{self._damaged_hint(step)}")
        return meta

    def _damaged_hint(self, step: int) -> str:
        earlier = [s for s in self.all_steps() if s < step]
        return (f"delete {self.directory / str(step)} to fall back to step {earlier[-1]}" if earlier else
                f"delete {self.directory} and train again")

    @contextlib.contextmanager
    def _reading(self, step: int):
        """A checkpoint that fails to read (truncated or corrupt files) becomes one UserError naming it and the fix;
        orbax's own error (often a chain of asyncio tracebacks) stays behind NANOCHAT_JAX_DEBUG=1."""
        try:
            with held_background_errors():
                yield
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"checkpoint {self.directory / str(step)} cannot be read ({_one_line(e)}); "
                            f"it is damaged or incomplete: {self._damaged_hint(step)}") from e


# ----------------------------------------------------------------------------------------------
# Resuming a training run

# GPTConfig fields a run may change when it resumes (how it computes, not what it computes with).
RUNTIME_FIELDS = ("compute_dtype", "attn_backend", "remat")


def _saved_setting(meta: dict, key: str):
    """A run setting as a checkpoint's meta records it: top level, else its model_config, else its user_config."""
    for where in (meta, meta.get("model_config") or {}, meta.get("user_config") or {}):
        if key in where:
            return where[key]
    return None


def resume_step(ckpt: "Checkpointer", resume: bool | None, settings: dict, *, from_step: int = -1,
                close_on_error: tuple = ()) -> int | None:
    """The step a training run restores, or None for a fresh start; never overwrites silently. resume None (auto):
    the latest checkpoint if any, else fresh; True: a checkpoint is required; False: fresh, refusing if checkpoints
    exist. from_step >= 0 picks the step. The checkpoint's recorded `settings` (model config, batch, horizon...)
    must equal these, RUNTIME_FIELDS aside. Refusals are UserErrors; `close_on_error` checkpointers close first."""
    try:
        steps = ckpt.all_steps()
        where = ckpt.directory
        if from_step >= 0:
            if from_step not in steps:
                raise UserError(f"--resume-from-step={from_step}: no such checkpoint in {where} (steps there: {steps})")
            step = from_step
        elif not steps:
            if resume:
                raise UserError(f"--resume: no checkpoint in {where} to continue from; drop --resume to start fresh")
            return None
        elif resume is False:
            raise UserError(f"{where} already holds checkpoints (steps {steps}) and --resume=0 would overwrite them: "
                            f"continue that run (drop --resume=0), pick another --model-tag, or delete the directory")
        else:
            step = steps[-1]
        meta = ckpt.read_meta(step)
        changed = [f"{k}: {_saved_setting(meta, k)!r} → {v!r}" for k, v in settings.items()
                   if k not in RUNTIME_FIELDS and _saved_setting(meta, k) != v]
        if changed:
            raise UserError(f"{where} step {step} was trained with other settings ({'; '.join(changed)}): rerun with "
                            f"the original flags to continue it, or pick another --model-tag (or delete the directory)")
        return step
    except BaseException:
        for c in close_on_error:
            c.close()
        raise


# ----------------------------------------------------------------------------------------------
# Inference / eval loading

def find_largest_model(phase_dir: str | os.PathLike) -> str:
    """The model tag with the largest depth ('d<N>...'), else the most recently modified tag (nanochat's rule)."""
    phase_dir = Path(phase_dir)
    tags = sorted(p.name for p in phase_dir.iterdir() if p.is_dir()) if phase_dir.is_dir() else []
    if not tags:
        raise FileNotFoundError(f"no model tags in {phase_dir}")
    depths = {tag: int(m.group(1)) for tag in tags if (m := re.match(r"d(\d+)", tag))}
    if depths:
        return max(depths, key=depths.get)
    return max(tags, key=lambda tag: (phase_dir / tag).stat().st_mtime)


def _as_sharding(mesh_or_sharding) -> jax.sharding.Sharding:
    if mesh_or_sharding is None:
        return jax.sharding.SingleDeviceSharding(sharding.local_devices()[0])
    if isinstance(mesh_or_sharding, jax.sharding.Mesh):
        return jax.sharding.NamedSharding(mesh_or_sharding, jax.sharding.PartitionSpec())
    if isinstance(mesh_or_sharding, jax.sharding.Sharding):
        return mesh_or_sharding
    raise TypeError(f"mesh_or_sharding must be None, a jax Mesh or a Sharding, got {type(mesh_or_sharding)}")


def resolve_model_tag(phase: str, model_tag: str | None = None, *, required: bool = False) -> str | None:
    """model_tag, else the largest d<N> under the phase's checkpoint dir; with none there, None (or
    FileNotFoundError when required). Scripts that name outputs after the tag resolve it with this first."""
    if model_tag is not None:
        return model_tag
    phase_dir = _phase_dir(phase)
    if phase_dir.is_dir() and any(p.is_dir() for p in phase_dir.iterdir()):
        return find_largest_model(phase_dir)
    if required:
        raise FileNotFoundError(f"no {phase} checkpoints: {phase_dir} is missing or empty; "
                                f"train one with `python {PHASE_SCRIPTS[phase]}`")
    return None


def require_same_vocab(model_cfg, tokenizer, what: str = "the checkpoint") -> None:
    """A model and a tokenizer that disagree on the vocab would produce garbage: refuse, naming the fix."""
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"{what} has vocab_size {model_cfg.vocab_size} but the tokenizer has {tokenizer.vocab_size}: "
                         f"use the tokenizer it was trained with (--tokenizer-dir)")


def load_model(phase: str = "base", model_tag: str | None = None, step: int | None = None, *,
               mesh_or_sharding=None, config_overrides: dict[str, Any] | None = None):
    """(params, GPTConfig, meta) for eval/inference; model_tag None: the largest d<N>; step None: latest. Params are
    replicated on the mesh (or on one local device). config_overrides sets runtime fields, e.g. attn_backend."""
    phase_dir = _phase_dir(phase)
    hint = f"train one with `python {PHASE_SCRIPTS[phase]}`"
    model_tag = resolve_model_tag(phase, model_tag, required=True)
    directory = phase_dir / model_tag
    if not directory.is_dir():
        have = sorted(p.name for p in phase_dir.iterdir() if p.is_dir()) if phase_dir.is_dir() else []
        raise FileNotFoundError(f"no checkpoint directory {directory} (model tags there: {have}); {hint}")
    with Checkpointer(directory, async_save=False) as ckpt:
        if not ckpt.all_steps():
            raise FileNotFoundError(f"no finished checkpoints in {directory}; {hint}")
        step = ckpt.resolve_step(step)
        meta = ckpt.read_meta(step)
        if "model_config" not in meta:
            raise ValueError(f"checkpoint meta in {directory} (step {step}) has no 'model_config'; "
                             f"it was not written by this project's train loop")
        cfg = gpt.GPTConfig.from_dict({**meta["model_config"], **(config_overrides or {})})
        abstract = with_sharding(gpt.param_shapes(cfg), _as_sharding(mesh_or_sharding))
        try:
            params, _, meta = ckpt.restore(step, abstract_params=abstract)
        except ValueError as e:
            raise ValueError(f"model_config in the checkpoint meta (plus config_overrides={config_overrides}) does not "
                             f"describe its arrays: {e}") from e
    return params, cfg, meta


def load_tokenizer(meta: dict, tokenizer_dir: str | os.PathLike | None = None):
    """`tokenizer_dir` if given, else the one the checkpoint's run recorded (if that folder still exists), else the
    default <base dir>/tokenizer."""
    from nanochat_jax.tokenizer import get_tokenizer

    trained_with = (meta.get("user_config") or {}).get("tokenizer_dir")
    if tokenizer_dir is None and trained_with and Path(trained_with).is_dir():
        tokenizer_dir = trained_with
    return get_tokenizer(tokenizer_dir)


@dataclass
class Source:
    """The checkpoint a later stage (mid, SFT, RL) starts from; close `ckpt` when done. model_cfg carries this run's
    runtime settings."""
    phase: str
    tag: str
    step: int
    meta: dict
    model_cfg: gpt.GPTConfig
    ckpt: Checkpointer

    def lrs(self, **flags: float) -> dict[str, float]:
        """Each learning-rate flag if >= 0, else what the source stage used (before its init_lr_frac), else the
        pretraining default."""
        used = self.meta.get("lrs", self.meta.get("user_config", {}))
        defaults = {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5}
        return {k: flags[k] if flags.get(k, -1) >= 0 else float(used.get(k, d)) for k, d in defaults.items()}


def open_source(phase: str, model_tag: str | None, step: int | None, *, config_overrides: dict | None = None
                ) -> Source:
    """The Source at `step` (None: latest) of `phase`/`model_tag` (None: the largest tag), its model config with
    `config_overrides` (this run's runtime settings, `RuntimeFlags.model_settings`)."""
    tag = resolve_model_tag(phase, model_tag, required=True)
    ckpt = Checkpointer(checkpoint_dir(phase, tag), async_save=False)
    step = ckpt.resolve_step(step)
    meta = ckpt.read_meta(step)
    model_cfg = gpt.GPTConfig.from_dict({**meta["model_config"], **(config_overrides or {})})
    return Source(phase, tag, step, meta, model_cfg, ckpt)
