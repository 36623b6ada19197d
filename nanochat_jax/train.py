"""The one train step and loop, shared by every stage (pretraining, midtraining, SFT, RL).

`make_train_step` is a pure (state, batch) -> (state, metrics) with gradient accumulation in a `lax.scan`;
`compile_train_step` jits it with shardings and donation and compiles it ahead of time; `fit` runs it with
`Periodic` actions (evals, samples, checkpoints) between steps; `StepLogger` prints each step's line.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanochat_jax import gpt, sharding
from nanochat_jax.common import format_duration, get_peak_flops, print0

SAMPLE_PROMPTS = ("The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is")


# The step

def make_train_step(model_cfg: gpt.GPTConfig, tx: optax.GradientTransformation, *, lr_input: bool = False,
                    loss_fn=None, micro_reduce: str = "mean"):
    """state = {"step", "params", "opt_state"}; batch = {"inputs", "targets", ...} of A micro-batches (A, B, ...).

    The step's loss and gradient (accumulated in fp32) average the micro-batches' mean CE (nanochat's
    `loss / grad_accum`); loss_fn(params, micro) replaces that CE (RL), micro_reduce="sum" adds instead.
    lr_input: the batch carries "lrm", a scalar times this step's update. Every update of our optimizer is linear
    in its lr, so this is exactly lr × lrm: how mid/SFT apply schedules on data progress, which only the host knows.
    """
    if micro_reduce not in ("mean", "sum"):
        raise ValueError(f"micro_reduce must be 'mean' or 'sum', got {micro_reduce!r}")
    if loss_fn is None:
        def loss_fn(params, micro):
            return gpt.forward(params, micro["inputs"], model_cfg, targets_BT=micro["targets"])

    def train_step(state, batch):
        params = state["params"]
        micro_batches = {k: v for k, v in batch.items() if k != "lrm"}
        n_micro = batch["inputs"].shape[0]
        scale = 1.0 / n_micro if micro_reduce == "mean" else 1.0

        def micro(carry, mb):
            grads_acc, loss_acc = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, mb)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return (grads_acc, loss_acc + loss), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, loss), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), micro_batches)
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        if lr_input:
            updates = jax.tree.map(lambda u: u * batch["lrm"].astype(u.dtype), updates)
        params = optax.apply_updates(params, updates)
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, {"loss": loss * scale}

    return train_step


def init_state(model_cfg: gpt.GPTConfig, tx: optax.GradientTransformation, key):
    params = gpt.init_params(model_cfg, key)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def abstract_state(model_cfg: gpt.GPTConfig, tx: optax.GradientTransformation):
    """ShapeDtypeStructs of init_state(model_cfg, tx, key), without allocating anything."""
    return jax.eval_shape(lambda k: init_state(model_cfg, tx, k), jax.random.key(0))


def state_shardings(model_cfg: gpt.GPTConfig, state_shapes, mesh, shard: bool = True):
    """Params and optimizer state as the model's Params say (gpt.param_sharding_axes); the step counter replicated."""
    axes = gpt.param_sharding_axes(model_cfg)
    return {"step": sharding.replicated(mesh),
            "params": sharding.tree_shardings(state_shapes["params"], mesh, axes, shard=shard),
            "opt_state": sharding.tree_shardings(state_shapes["opt_state"], mesh, axes, shard=shard)}


def abstract_tree(shapes, shardings):
    """ShapeDtypeStructs carrying their target shardings (for AOT lowering and checkpoint restores)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def compile_train_step(model_cfg, tx, mesh, state_shapes, batch_shape, *, shard_params: bool = True,
                       lr_input: bool = False, loss_fn=None, micro_reduce: str = "mean", extra_inputs=None):
    """jit with explicit shardings + donation, compiled ahead of time: (compiled, shardings, info). batch_shape =
    (micro-batches, rows, T) of "inputs"/"targets"; extra_inputs {name: (shape, dtype)} adds arrays sharded by row."""
    shardings = state_shardings(model_cfg, state_shapes, mesh, shard_params)
    inputs = {"inputs": (batch_shape, jnp.int32), "targets": (batch_shape, jnp.int32), **(extra_inputs or {})}
    batch_abstract = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, 1, len(shape)))
                      for k, (shape, dtype) in inputs.items()}
    if lr_input:
        batch_abstract["lrm"] = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    batch_shardings = {k: a.sharding for k, a in batch_abstract.items()}
    step_fn = jax.jit(make_train_step(model_cfg, tx, lr_input=lr_input, loss_fn=loss_fn, micro_reduce=micro_reduce),
                      in_shardings=(shardings, batch_shardings), out_shardings=(shardings, sharding.replicated(mesh)),
                      donate_argnums=(0,))
    t0 = time.perf_counter()
    lowered = step_fn.lower(abstract_tree(state_shapes, shardings), batch_abstract)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    info = {"compile_seconds": time.perf_counter() - t0, "trace_seconds": t1 - t0}  # compile_seconds: both
    with contextlib.suppress(Exception):  # not every backend reports memory
        mem = compiled.memory_analysis()
        keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
        info["memory"] = {k: int(getattr(mem, k)) for k in keys if hasattr(mem, k)}
    return compiled, shardings, info


@dataclass
class LoopState:
    """What the loop carries between steps and across a resume (saved in the checkpoint's meta)."""
    smooth_loss: float = 0.0
    total_training_time: float = 0.0
    min_val_bpb: float = float("inf")
    val_bpb: float | None = None
    core_metric: float | None = None
    history: list = field(default_factory=list)  # [(step, loss)] of this process, for tests and reports


def mfu_percent(flops_per_token: float, tokens: int, seconds: float, device_kind: str, n_devices: int) -> float | None:
    """Model FLOPs utilisation in %, or None where the device's peak FLOP/s is unknown (CPUs)."""
    peak = get_peak_flops(device_kind)
    return 100.0 * flops_per_token * tokens / seconds / (peak * n_devices) if math.isfinite(peak) else None


# The loop (pretraining, midtraining and SFT all run this)

@dataclass
class Periodic:
    """An action between steps, at multiples of `every` (-1: never) and after the last. fn(step, state, loader_state):
    `step` steps are done; loader_state is where step `step`'s batch starts (what a checkpoint stores to resume)."""
    every: int
    fn: Callable[[int, dict, object], None] | None
    after_start: bool = False  # skip the first step of this run (saves, samples)
    at_end: bool = True        # also after the last step, even when every = -1 (final eval, final checkpoint)

    def due(self, step: int, start: int, last: bool) -> bool:
        if self.fn is None or (self.after_start and step == start):  # fn None: an action this run leaves out
            return False
        return (last and self.at_end) or (self.every > 0 and step % self.every == 0)


def fit(step_fn, state, batches: Iterator, *, start: int, n_iter: int | None,
        report: Callable[[int, dict, float], None], periodic: Sequence[Periodic] = (),
        profile: tuple[int, int] | None = None, profile_dir=None):
    """Run `step_fn` from step `start` to `n_iter` or until `batches` (yielding (device batch, loader state before
    it)) runs out: mid/SFT's data-driven horizon. Returns the final state. The next batch is prepared while a step
    runs and metrics reach `report(step, metrics, seconds)` one step late, so the host waits for the device only at
    the periodic actions. A step's seconds end when its metrics arrive, or when its dispatch returned if they were
    ready before we asked (XLA:CPU runs the step while dispatching it)."""
    pending = None  # (step, metrics still on device, time its dispatch returned)
    prev_done = time.perf_counter()

    def flush():
        nonlocal pending, prev_done
        step_, metrics, dispatched = pending
        ready = all(x.is_ready() for x in jax.tree.leaves(metrics))
        # The loop's one device read, a step late (the next step is already queued). Tests run steady-state steps
        # with device-to-host transfers disallowed outside this block.
        with jax.transfer_guard_device_to_host("allow"):
            metrics = jax.device_get(metrics)
        done = dispatched if ready else time.perf_counter()
        report(step_, metrics, max(done - prev_done, 1e-9))
        pending, prev_done = None, done

    def pull():
        if n_iter is not None and step >= n_iter:
            return None
        return next(batches, None)

    step = start
    item = pull()
    while True:
        last = item is None
        due = [p for p in periodic if p.due(step, start, last)]
        if pending is not None and due:
            flush()  # log the previous step before this step's eval/sample/save lines
        for p in due:
            p.fn(step, state, None if last else item[1])
        if due:
            prev_done = time.perf_counter()  # evals, samples and saves are not step time
        if last:
            break
        if profile and step == profile[0]:
            jax.profiler.start_trace(str(profile_dir))
        state, metrics = step_fn(state, item[0])
        dispatched = time.perf_counter()
        if profile and step == profile[1] - 1:
            jax.block_until_ready(metrics)
            jax.profiler.stop_trace()
            print0(f"wrote a profiler trace of steps {profile[0]}..{profile[1] - 1} to {profile_dir}")
        step += 1
        item = pull()  # host work for the next step overlaps this one
        if pending is not None:
            flush()
        pending = (step - 1, metrics, dispatched)
    if pending is not None:
        flush()
    return state


@dataclass
class StepLogger:
    """Each step's log line and TensorBoard scalars (smoothed loss, lrm, dt, tokens/s, MFU or `-` on CPU, ETA)."""
    loop: LoopState
    log: Callable  # report.ScalarLog
    n_iter: int                 # planned steps (an estimate for the data-driven stages)
    tokens_per_step: int
    flops_per_token: float
    device_kind: str
    n_devices: int
    log_every: int = 1
    step_seconds: list = field(default_factory=list)

    def __call__(self, step: int, metrics: dict, dt: float, lrm: float, where: str) -> None:
        loop, n_iter = self.loop, self.n_iter
        loss = float(metrics["loss"])
        self.step_seconds.append(dt)
        beta = 0.9
        loop.smooth_loss = beta * loop.smooth_loss + (1 - beta) * loss
        smooth = loop.smooth_loss / (1 - beta ** (step + 1))
        if step > 10:  # like nanochat: the first steps (compilation, warm-up) do not count
            loop.total_training_time += dt
        loop.history.append((step, loss))
        tok_s = self.tokens_per_step / dt
        mfu = mfu_percent(self.flops_per_token, self.tokens_per_step, dt, self.device_kind, self.n_devices)
        if step % self.log_every == 0 or step + 1 == n_iter:
            print0(f"step {step:05d}/{n_iter} ({100 * (step + 1) / n_iter:.1f}%) | loss {smooth:.6f} | lrm {lrm:.2f} | "
                   f"dt {dt * 1e3:.0f}ms | tok/s {tok_s:,.0f} | mfu {'-' if mfu is None else f'{mfu:.2f}'} | {where} | "
                   f"total time {format_duration(loop.total_training_time)} | "
                   f"eta {format_duration(max(n_iter - step - 1, 0) * dt)}")
        self.log(step, **{"train/loss": smooth, "train/raw_loss": loss, "train/lrm": lrm, "train/tok_per_sec": tok_s,
                          "train/dt": dt, **({} if mfu is None else {"train/mfu": mfu})})

    def steady_mfu(self) -> float | None:
        """MFU over the median step time, leaving out the first 10 steps (compilation) when there are more."""
        steady = self.step_seconds[10:] or self.step_seconds
        return mfu_percent(self.flops_per_token, self.tokens_per_step, float(np.median(steady)), self.device_kind,
                           self.n_devices) if steady else None
