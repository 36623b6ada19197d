"""What every training stage (pretrain.py, chat_train.py, rl.py) sets up the same way: mesh and tokenizer (`Stage`),
the compiled step and its state, fresh or restored (`Program`), val bpb, checkpoints, and the run's end.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from nanochat_jax import sharding
from nanochat_jax.checkpoint import Source, open_source
from nanochat_jax.checkpoint import resume_step as resume_from
from nanochat_jax.common import print0
from nanochat_jax.config import RuntimeFlags
from nanochat_jax.loss_eval import evaluate_bpb, make_bpb_fn
from nanochat_jax.report import get_report
from nanochat_jax.tokenizer import get_tokenizer
from nanochat_jax.train import LoopState, abstract_state, abstract_tree, compile_train_step, init_state


@dataclass(frozen=True)
class Stage:
    """A stage's runtime from its flags: the mesh (after jax.distributed, when launched so) and the tokenizer."""
    flags: RuntimeFlags
    mesh: jax.sharding.Mesh
    tokenizer: Any

    @classmethod
    def open(cls, flags: RuntimeFlags) -> Stage:
        sharding.maybe_initialize_distributed(flags.distributed)
        return cls(flags, sharding.make_mesh(flags.mesh), get_tokenizer(flags.tokenizer_dir))

    @property
    def device(self):
        return self.mesh.devices.flat[0]

    @property
    def on_gpu(self) -> bool:
        return self.device.platform == "gpu"

    def source(self, phase: str, model_tag: str | None, step: int | None) -> Source:
        """The checkpoint a later stage starts from, with this run's runtime settings."""
        return open_source(phase, model_tag, step, config_overrides=self.flags.model_settings(self.on_gpu))

    def compile(self, model_cfg, tx, batch_shape: tuple, **kw) -> Program:
        """train.compile_train_step (kw: lr_input, loss_fn, ...) for batches of batch_shape."""
        shapes = abstract_state(model_cfg, tx)
        step_fn, shardings, info = compile_train_step(model_cfg, tx, self.mesh, shapes, batch_shape,
                                                      shard_params=self.flags.fsdp, **kw)
        return Program(model_cfg, tx, step_fn, shardings, abstract_tree(shapes, shardings), info)


@dataclass(frozen=True)
class Program:
    """A stage's compiled train step and the layout of the state it takes: {"step", "params", "opt_state"}."""
    model_cfg: Any
    tx: Any
    step_fn: Callable
    shardings: dict
    abstract: dict  # the state's ShapeDtypeStructs with their shardings
    info: dict      # compile_seconds, memory

    def init(self, seed: int) -> dict:
        init = jax.jit(lambda k: init_state(self.model_cfg, self.tx, k), out_shardings=self.shardings)
        return init(jax.random.key(seed))

    def state(self, step: int, params, opt_state=None) -> dict:
        """The state at `step` from params and an optimizer state (None: a fresh one)."""
        if opt_state is None:
            opt_state = jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])(params)
        return {"step": jax.device_put(jnp.asarray(step, jnp.int32), self.shardings["step"]), "params": params,
                "opt_state": opt_state}

    def restore(self, ckpt, step: int, *, optimizer: bool = True, at: int | None = None) -> tuple[dict, dict]:
        """(state, meta) of checkpoint `step`, the state counting from `at` (default `step`); optimizer False, or a
        checkpoint without one: a fresh optimizer state."""
        params, opt_state, meta = ckpt.restore(step, abstract_params=self.abstract["params"],
                                               abstract_opt_state=self.abstract["opt_state"] if optimizer else None)
        return self.state(step if at is None else at, params, opt_state), meta

    def continue_or_start(self, ckpt, resume: bool | None, settings: dict, src: Source, what: str, *,
                          optimizer: bool = False) -> tuple[dict, int, dict | None]:
        """(state, start step, meta or None) of a later stage: this stage's checkpoint to continue (checkpoint.
        resume_step's rules on `resume` and `settings`), else the source's params (and optimizer state, if asked)."""
        step = resume_from(ckpt, resume, settings, close_on_error=(ckpt, src.ckpt))
        if step is not None:
            state, meta = self.restore(ckpt, step)
            print0(f"resumed {what} from step {step}")
        else:
            (state, _), meta = self.restore(src.ckpt, src.step, optimizer=optimizer, at=0), None
        src.ckpt.close()
        return state, step or 0, meta


def loop_state(meta: dict) -> LoopState:
    """The LoopState a checkpoint's meta saved (`saver(loop=...)`), without its history."""
    return LoopState(**{k: v for k, v in meta["loop_state"].items() if k != "history"})


def gathered(mine: dict) -> dict:
    """Every process's entries of `mine` in one dict: a collective, for the meta that process 0 alone writes."""
    return {k: v for part in sharding.allgather_json(mine) for k, v in part.items()}


def bpb_eval(stage: Stage, program: Program, loop: LoopState, log, val_batches: Callable, steps: int):
    """The Periodic action of validation bits per byte over `steps` batches of val_batches(), into `loop` and `log`."""
    rows = sharding.batch_sharding(stage.mesh)
    bpb_fn = jax.jit(make_bpb_fn(program.model_cfg),
                     in_shardings=(program.shardings["params"], rows, rows, sharding.replicated(stage.mesh)))
    token_bytes = jnp.asarray(stage.tokenizer.token_bytes(), jnp.int32)

    def evaluate(step, state, _):
        loop.val_bpb = evaluate_bpb(bpb_fn, state["params"], val_batches(), token_bytes, steps)
        loop.min_val_bpb = min(loop.min_val_bpb, loop.val_bpb)
        print0(f"step {step:05d} | validation bpb {loop.val_bpb:.4f}")
        log(step, **{"val/bpb": loop.val_bpb})

    return evaluate


def saver(ckpt, cfg, model_cfg, what: str, *, loop: LoopState | None = None, data_meta: Callable | None = None,
          **meta):
    """The Periodic action that saves the state with its meta: step, model config, flags, `meta`, the loop state
    (given `loop`) and data_meta(loader_state) (the data position; None after the last step)."""

    def save(step, state, loader_state=None):
        full = {"step": step, "model_config": model_cfg.to_dict(), "user_config": dataclasses.asdict(cfg), **meta}
        if loop is not None:
            full.update(val_bpb=loop.val_bpb,
                        loop_state={k: v for k, v in dataclasses.asdict(loop).items() if k != "history"})
        if data_meta is not None:
            full.update(data_meta(loader_state))
        ckpt.save(step, params=state["params"], opt_state=state["opt_state"], meta=full, overwrite=True)
        print0(f"saved {what} step {step} to {ckpt.directory}")

    return save


def finish(run: Path, title: str, section: dict | list, done: str, summary: dict, **series) -> None:
    """A stage's end: its report section, a line for people, `summary` as the last stdout line (JSON) and, with the
    per-step series, one line appended to <run>/history.jsonl."""
    if jax.process_index() == 0:
        get_report().log(title, section, run_dir=run)
        Path(run).mkdir(parents=True, exist_ok=True)
        with open(Path(run) / "history.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({**summary, **series}) + "\n")
    print0(done)
    print0(json.dumps(summary))
