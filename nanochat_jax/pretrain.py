"""Base-model pretraining (nanochat's scripts/base_train.py): the flags (`PretrainConfig`), the horizon and batch
plan (`plan_horizon`), and the driver (`pretrain`), which builds the model, optimizer and loader, compiles the one
train step of nanochat_jax/train.py and runs its `fit` loop with evaluation, sampling, CORE and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass

import jax
import numpy as np

from nanochat_jax import core_eval, gpt, optim, sharding
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.checkpoint import resume_step as resume_from
from nanochat_jax.common import format_duration, print0
from nanochat_jax.config import RuntimeFlags, flag, require
from nanochat_jax.dataloader import ShardedLoader
from nanochat_jax.dataset import list_parquet_files, resolve_data_dir, split_files
from nanochat_jax.engine import Engine
from nanochat_jax.stage import Stage, bpb_eval, finish, gathered, loop_state, saver
from nanochat_jax.report import ScalarLog, run_dir
from nanochat_jax.train import SAMPLE_PROMPTS, LoopState, Periodic, StepLogger, fit


@dataclass(frozen=True)
class PretrainConfig(RuntimeFlags):
    """Base-model pretraining (nanochat's base_train flags, dash style, plus --mesh/--data-dir/--attention/--resume)."""
    # model
    depth: int = flag(20, "transformer layers; width = depth * aspect_ratio rounded up to head_dim")
    aspect_ratio: int = flag(64, "model width per layer of depth")
    head_dim: int = flag(128, "attention head size")
    n_kv_head: int = flag(-1, "key/value heads (GQA); -1 = n_head (no GQA)")
    max_seq_len: int = flag(2048, "context length in tokens")
    window_pattern: str = flag("SSSL", "attention windows per layer, repeated: L = full context, S = a quarter of it")
    remat: bool = flag(False, "recompute each block's activations in the backward pass (less memory, more time)")
    # horizon and batch
    num_iterations: int = flag(-1, "optimizer steps; -1 = from --target-flops or --target-param-data-ratio")
    target_flops: float = flag(-1.0, "training FLOPs budget that sets the steps (-1 = off)")
    target_param_data_ratio: float = flag(12.0, "tokens per scaling parameter that set the steps (-1 = off)")
    device_batch_size: int = flag(32, "sequences per device per micro-batch")
    total_batch_size: int = flag(-1, "tokens per optimizer step; -1 = auto (Power Lines rule)")
    # optimizer
    embedding_lr: float = flag(0.3, "AdamW lr of the token embedding (before batch-size scaling)")
    unembedding_lr: float = flag(0.008, "AdamW lr of lm_head (before batch-size scaling)")
    matrix_lr: float = flag(0.02, "Muon lr of the transformer matrices (before batch-size scaling)")
    scalar_lr: float = flag(0.5, "AdamW lr of the per-layer scalars (before batch-size scaling)")
    weight_decay: float = flag(0.28, "Muon weight decay at the reference d12 run (scaled by sqrt(B/B_ref)·D_ref/D)")
    warmup_steps: int = flag(40, "linear lr warmup steps")
    warmdown_ratio: float = flag(0.65, "fraction of the steps at the end over which the lr decays")
    final_lr_frac: float = flag(0.05, "lr at the last step, as a fraction of the peak")
    lr_schedule: str = flag("reference", "reference (warmup, flat, warmdown) | constant")
    muon_momentum_schedule: str = flag("reference", "reference | constant (the peak momentum throughout)")
    weight_decay_schedule: str = flag("cosine", "cosine (to 0 at the end) | constant")
    adamw_style: str = flag("current", "current (per-group betas/wd) | classic (the October 2025 AdamW groups)")
    adamw_weight_decay: float = flag(0.0, "weight decay of the classic AdamW groups")
    grad_clip: float = flag(0.0, "> 0: clip the global gradient norm first (the October 2025 run used 1.0)")
    # evaluation, sampling, checkpoints, logging
    eval_every: int = flag(250, "steps between validation bpb evaluations (-1: only after the last step)")
    eval_tokens: int = flag(80 * 524288, "validation tokens per evaluation")
    sample_every: int = flag(2000, "steps between printing greedy samples of fixed prompts (-1: only after the "
                                   "last step)")
    core_metric_every: int = flag(-1, "steps between CORE evaluations during training (the reference uses 2000; "
                                      "-1 = off)")
    core_metric_max_per_task: int = flag(500, "examples per CORE task during training")
    eval_bundle: str | None = flag(None, "CORE tasks folder (None: download nanochat's eval_bundle once)")
    save_every: int = flag(-1, "steps between checkpoints (-1: only after the last step)")
    keep_checkpoints: int = flag(3, "checkpoints kept on disk (the oldest are deleted)")
    model_tag: str | None = flag(None, "checkpoint folder name (default d<depth>)")
    resume: bool | None = flag(None, "None: continue this tag's latest checkpoint if its settings match; "
                                     "1: require one; 0: start fresh (refused if checkpoints exist)")
    resume_from_step: int = flag(-1, "resume from this step instead of the latest (-1 = latest)")
    log_every: int = flag(1, "steps between log lines")
    profile_steps: str = flag("", "START:STOP, writes a jax.profiler trace under the run dir")
    # where (mesh, fsdp, attention, compute dtype, tokenizer, seed: RuntimeFlags)
    data_dir: str | None = flag(None, "pretraining shards folder (default <base dir>/base_data)")

    def __post_init__(self):
        super().__post_init__()
        require(self.depth >= 1, f"--depth must be >= 1, got {self.depth}")
        require(self.max_seq_len >= 2, f"--max-seq-len must be >= 2, got {self.max_seq_len}")
        require(self.device_batch_size >= 1, f"--device-batch-size must be >= 1, got {self.device_batch_size}")
        require(self.num_iterations > 0 or self.target_flops > 0 or self.target_param_data_ratio > 0,
                "set one of --num-iterations, --target-flops or --target-param-data-ratio to a positive value")
        require(self.total_batch_size == -1 or self.total_batch_size > 0,
                "--total-batch-size must be > 0 or -1 (auto)")
        require(0 not in (self.eval_every, self.sample_every, self.save_every, self.core_metric_every)
                and self.log_every >= 1, "--eval-every/--sample-every/--save-every/--core-metric-every must be > 0 "
                "or -1 (off); --log-every >= 1")
        require(self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1")
        for name, value, allowed in (("lr-schedule", self.lr_schedule, ("reference", "constant")),
                                     ("muon-momentum-schedule", self.muon_momentum_schedule, ("reference", "constant")),
                                     ("weight-decay-schedule", self.weight_decay_schedule, ("cosine", "constant")),
                                     ("adamw-style", self.adamw_style, ("current", "classic"))):
            require(value in allowed, f"--{name} must be one of {'|'.join(allowed)}, got {value!r}")
        require(self.adamw_weight_decay >= 0 and self.grad_clip >= 0,
                "--adamw-weight-decay and --grad-clip must be >= 0")
        parse_profile_steps(self.profile_steps)


def build_model_config(cfg: PretrainConfig, vocab_size: int, on_gpu: bool) -> gpt.GPTConfig:
    return gpt.GPTConfig.from_depth(cfg.depth, aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim,
                                    max_seq_len=cfg.max_seq_len, vocab_size=vocab_size,
                                    n_kv_head=None if cfg.n_kv_head == -1 else cfg.n_kv_head,
                                    window_pattern=cfg.window_pattern, remat=cfg.remat,
                                    **cfg.model_settings(on_gpu))


def plan_horizon(cfg: PretrainConfig, model_cfg: gpt.GPTConfig, n_devices: int) -> dict:
    """Batch size, grad accumulation, iterations, LR/WD scaling (nanochat's scripts/base_train.py), validated."""
    counts = gpt.num_params(model_cfg)
    d12 = gpt.GPTConfig.from_depth(12, vocab_size=model_cfg.vocab_size, max_seq_len=model_cfg.sequence_len)
    ref = gpt.num_params(d12)
    ratio = cfg.target_param_data_ratio if cfg.target_param_data_ratio > 0 else 12.0
    target = optim.target_tokens(ratio, counts["scaling"])
    d_ref = ratio * ref["scaling"]
    B = cfg.total_batch_size if cfg.total_batch_size > 0 else optim.auto_batch_size(target, d_ref)
    micro_tokens = cfg.device_batch_size * cfg.max_seq_len * n_devices
    if B % micro_tokens:
        raise ValueError(f"--total-batch-size={B} is not a multiple of device_batch_size × max_seq_len × devices = "
                         f"{cfg.device_batch_size} × {cfg.max_seq_len} × {n_devices} = {micro_tokens}; "
                         f"change one of them")
    n_iter = optim.horizon(total_batch_size=B, num_iterations=cfg.num_iterations, target_flops=cfg.target_flops,
                           target_param_data_ratio=cfg.target_param_data_ratio, scaling_params=counts["scaling"],
                           flops_per_token=gpt.flops_per_token(model_cfg))
    if n_iter < 1:
        raise ValueError(f"the horizon works out to {n_iter} steps; raise --num-iterations/--target-flops/ratio")
    return {"total_batch_size": B, "grad_accum": B // micro_tokens, "num_iterations": n_iter,
            "target_tokens": target, "batch_lr_scale": optim.batch_lr_scale(B),
            "weight_decay_scaled": optim.scaled_weight_decay(B, target, d_ref, cfg.weight_decay),
            "params": counts, "flops_per_token": gpt.flops_per_token(model_cfg)}


def optim_config(cfg: PretrainConfig, model_cfg: gpt.GPTConfig, plan: dict) -> optim.OptimConfig:
    names = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay", "warmup_steps",
             "warmdown_ratio", "final_lr_frac", "lr_schedule", "muon_momentum_schedule", "weight_decay_schedule",
             "adamw_style", "adamw_weight_decay", "grad_clip")
    return optim.OptimConfig(num_iterations=plan["num_iterations"], model_dim=model_cfg.n_embd,
                             weight_decay_scaled=plan["weight_decay_scaled"], batch_lr_scale=plan["batch_lr_scale"],
                             **{k: getattr(cfg, k) for k in names})


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """--profile-steps "START:STOP" → (START, STOP); "" → None."""
    m = re.fullmatch(r"(\d+):(\d+)", spec)
    require(not spec or (m and int(m[1]) < int(m[2])),
            f"--profile-steps must be START:STOP with 0 <= START < STOP (e.g. 5:8), got {spec!r}")
    return (int(m[1]), int(m[2])) if spec else None


def pretrain(cfg: PretrainConfig) -> LoopState:
    """The base-training loop. Returns the final LoopState (loss history of this run included)."""
    with contextlib.ExitStack() as cleanup:  # checkpointer, loader threads, log: closed however the run ends
        return _pretrain(cfg, cleanup)


def _pretrain(cfg: PretrainConfig, cleanup: contextlib.ExitStack) -> LoopState:
    st = Stage.open(cfg)
    mesh, tokenizer = st.mesh, st.tokenizer
    # Inputs first (tokenizer, shards, the checkpoint to continue): a wrong path fails in a second, not after compiling.
    files = list_parquet_files(resolve_data_dir(cfg.data_dir))
    model_cfg = build_model_config(cfg, tokenizer.vocab_size, st.on_gpu)
    plan = plan_horizon(cfg, model_cfg, mesh.size)
    n_iter, grad_accum, B = plan["num_iterations"], plan["grad_accum"], plan["total_batch_size"]
    tag = cfg.model_tag or f"d{cfg.depth}"
    ckpt = Checkpointer(checkpoint_dir("base", tag), keep=cfg.keep_checkpoints)
    cleanup.callback(ckpt.close)  # however the run ends, an in-flight async save is committed before exit
    must_match = {**model_cfg.to_dict(), "total_batch_size": B, "num_iterations": n_iter}  # to continue a run
    resume_step = resume_from(ckpt, cfg.resume, must_match, from_step=cfg.resume_from_step)
    meta = ckpt.read_meta(resume_step) if resume_step is not None else {}
    # one reader per device, strided by the device's place in the mesh: same global batches however many processes
    shards = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]

    def reader(split, state=None):
        return ShardedLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, split, files=split_files(files, split),
                             shard_indices=shards, num_shards=mesh.size, state=state)

    loader = cleanup.enter_context(reader("train", meta.get("loader_state")))
    _print_plan(cfg, st, model_cfg, plan, files, ckpt)
    opt_cfg = optim_config(cfg, model_cfg, plan)
    prog = st.compile(model_cfg, optim.build_optimizer(gpt.param_shapes(model_cfg), opt_cfg),
                      (grad_accum, cfg.device_batch_size * mesh.size, cfg.max_seq_len))
    print0(f"compiled the train step in {prog.info['compile_seconds']:.1f}s; memory {prog.info.get('memory', 'n/a')}")
    if resume_step is not None:
        state, meta = prog.restore(ckpt, resume_step)
        loop = loop_state(meta)
        print0(f"resumed {tag} from step {resume_step} of {n_iter}"
               + (" (already finished)" if resume_step >= n_iter else ""))
    else:
        state, loop = prog.init(cfg.seed), LoopState()
    start = resume_step or 0

    def val_batches():
        with reader("val") as val:
            for b in val:
                yield {k: sharding.global_batch(v, mesh) for k, v in b.items()}

    def batches():
        while True:
            pos = loader.get_state()  # where this batch starts: what a checkpoint taken before its step stores
            micro = [next(loader) for _ in range(grad_accum)]
            host = {k: np.stack([b[k] for b in micro]) for k in ("inputs", "targets")}
            yield {k: sharding.global_batch(v, mesh, batch_axis=1) for k, v in host.items()}, pos

    prompts = [tokenizer.encode(p, prepend=tokenizer.bos_id) for p in SAMPLE_PROMPTS]
    engine = None

    def sample(step, state, _):
        # every process gathers the params whole (they may span processes) and samples on its first device;
        # process 0 prints. One Engine for the run: later samplings reuse its compiled prefill and decode.
        nonlocal engine
        params = sharding.gather_to_process(state["params"])
        if engine is None:
            engine = Engine(params, model_cfg, tokenizer)
        else:
            engine.set_params(params)
        for seq in engine.generate_batch(prompts, max_tokens=16, temperature=0)[0]:
            print0(f"  sample: {tokenizer.decode(seq)!r}")

    log = ScalarLog(run_dir(tag))
    cleanup.callback(log.close)
    step_log = StepLogger(loop, log, n_iter, B, plan["flops_per_token"], st.device.device_kind, mesh.size,
                          cfg.log_every)
    save = saver(ckpt, cfg, model_cfg, f"checkpoint {tag}", loop=loop, device_batch_size=cfg.device_batch_size,
                 max_seq_len=cfg.max_seq_len, total_batch_size=B, num_iterations=n_iter,
                 data_meta=lambda pos: {"loader_state": {"shards": gathered((pos or loader.get_state())["shards"])}})
    eval_steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * mesh.size))
    periodic = [Periodic(cfg.eval_every, bpb_eval(st, prog, loop, log, val_batches, eval_steps)),
                Periodic(cfg.core_metric_every, _core_metric(cfg, st, model_cfg, loop, log),
                         at_end=cfg.core_metric_every > 0),
                Periodic(cfg.sample_every, sample, after_start=True),
                Periodic(cfg.save_every, save, after_start=True)]

    def report(step, metrics, dt):  # the lr multiplier: host arithmetic, no device round trip
        step_log(step, metrics, dt, optim.current_hyperparams(opt_cfg, step)["lrm"], f"epoch {loader.epoch}")

    fit(prog.step_fn, state, batches(), start=start, n_iter=n_iter, report=report, periodic=periodic,
        profile=parse_profile_steps(cfg.profile_steps), profile_dir=run_dir(tag) / "profile")
    cleanup.close()  # checkpointer, loader, log: before the report, so the last save is complete
    _finish(cfg, st, model_cfg, plan, tag, loop, step_log.steady_mfu(), start)
    return loop


def _print_plan(cfg, st: Stage, model_cfg, plan: dict, files: list, ckpt) -> None:
    n_iter, B, flops, scaling = (plan["num_iterations"], plan["total_batch_size"], plan["flops_per_token"],
                                 plan["params"]["scaling"])
    print0(f"devices: {st.mesh.size} × {st.device.device_kind} ({jax.process_count()} process(es)); "
           f"compute {model_cfg.compute_dtype}, attention {model_cfg.attn_backend}")
    print0("model config " + json.dumps(model_cfg.to_dict()))
    print0("parameters " + ", ".join(f"{k} {v:,}" for k, v in plan["params"].items()))
    print0(f"FLOPs/token {flops:.6e}; total batch {B:,} tokens = grad_accum {plan['grad_accum']} × "
           f"{cfg.device_batch_size} rows × {cfg.max_seq_len} × {st.mesh.size} devices; {n_iter:,} iterations "
           f"({n_iter * B:,} tokens, {n_iter * B / scaling:.2f} tokens/scaling param, {n_iter * B * flops:.3e} FLOPs); "
           f"lr scale {plan['batch_lr_scale']:.4f}, wd {plan['weight_decay_scaled']:.4f}")
    print0(f"data: {len(split_files(files, 'train'))} train + 1 val shard(s) in {files[0].parent}; "
           f"checkpoints: {ckpt.directory}")


def _core_metric(cfg: PretrainConfig, st: Stage, model_cfg, loop: LoopState, log):
    """The Periodic CORE evaluation, with its bundle resolved now (a missing one fails here, not hours into the run)
    and one scorer (and its compilations) for the whole run."""
    if cfg.core_metric_every <= 0:
        return None
    bundle, scorer = core_eval.ensure_eval_bundle(cfg.eval_bundle), None

    def core_metric(step, state, _):
        nonlocal scorer
        if scorer is None:  # params as trained
            scorer = core_eval.make_model_scorer(state["params"], model_cfg, st.mesh, pad_id=st.tokenizer.bos_id,
                                                 place_params=False)
        scorer.set_params(state["params"], place=False)
        out = core_eval.evaluate_core(scorer, st.tokenizer, bundle, max_per_task=cfg.core_metric_max_per_task,
                                      log=lambda *a, **k: None)
        loop.core_metric = out["core_metric"]
        print0(f"step {step:05d} | CORE {out['core_metric']:.4f} over {len(out['results'])} tasks "
               f"({out['examples']:,} examples, {out['seconds']:.0f}s)")
        log(step, **{"eval/core_metric": out["core_metric"]})

    return core_metric


def _finish(cfg: PretrainConfig, st: Stage, model_cfg, plan: dict, tag: str, loop: LoopState, mfu, start: int):
    n_iter, B, flops, params = (plan["num_iterations"], plan["total_batch_size"], plan["flops_per_token"],
                                plan["params"])
    took = format_duration(loop.total_training_time)
    finish(run_dir(tag), "Base model training", [
        {"model_tag": tag, "depth": cfg.depth, "parameters": params["total"], "scaling parameters": params["scaling"],
         "FLOPs per token": f"{flops:.6e}", "iterations": n_iter, "total batch size": B, "tokens": n_iter * B,
         "tokens per scaling parameter": n_iter * B / params["scaling"],
         "devices": f"{st.mesh.size} × {st.device.device_kind}", "attention": model_cfg.attn_backend,
         "compute dtype": model_cfg.compute_dtype, "min val bpb": loop.min_val_bpb,
         "final val bpb": loop.val_bpb if loop.val_bpb is not None else float("nan"),
         **({"CORE estimate": loop.core_metric} if loop.core_metric is not None else {}),
         "MFU %": "-" if mfu is None else mfu, "total training FLOPs": f"{n_iter * B * flops:.4e}",
         "training time": took}],
           f"done: {n_iter} steps, min val bpb {loop.min_val_bpb:.4f}, training time {took}",
           {"final_step": n_iter, "val_bpb": loop.val_bpb, "min_val_bpb": loop.min_val_bpb},
           start=start, losses=loop.history)
