"""Midtraining and SFT: the base model learns the chat format, tool use and multiple choice.

The pretraining machinery (train step with a host-fed lr multiplier, as the schedules run on data progress; `fit`)
with other data and hyperparameters:

    stage  reads   data (TaskMixture → ConversationPacker)                    loss on          lr schedule
    mid    base    best fit with crop, like pretraining                       every token      flat, last 20% → 0
    sft    mid     best fit of whole conversations, BOS padding, never crops  assistant tokens  flat, last 50% → 0

Each trains one epoch of its mixture (or --num-iterations steps), evaluates val bpb (on the tokens it trains on)
and saves `mid_checkpoints/<tag>` or `chatsft_checkpoints/<tag>` with the loader position, to resume exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import gpt, optim, sharding, tasks
from nanochat_jax.chat_eval import ChatEvalCache, evaluate_chat_model
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir, require_same_vocab
from nanochat_jax.common import format_duration, print0
from nanochat_jax.config import SourceFlags, flag, require
from nanochat_jax.dataloader import ConversationPacker
from nanochat_jax.stage import Stage, bpb_eval, finish, gathered, loop_state, saver
from nanochat_jax.report import ScalarLog, run_dir
from nanochat_jax.train import LoopState, Periodic, StepLogger, fit

SOURCE_OF = {"mid": "base", "sft": "mid"}


@dataclass(frozen=True)
class ChatTrainConfig(SourceFlags):
    """Flags shared by scripts/midtrain.py and scripts/sft.py (-1 / None: inherit from the source checkpoint)."""
    stage: str = flag("sft", "mid | sft (set by the script)")
    source: str = flag("", "checkpoint phase to start from: \"\" = base for mid, mid for sft")
    load_optimizer: bool = flag(False, "start from the source's optimizer state (momentum buffers)")
    # data
    mixture: str = flag("default", "default (the reference's) | local (offline: tasks from --task-data)")
    identity_file: str | None = flag(None, "a JSONL of identity conversations (CustomJSON), trained twice")
    max_seq_len: int = flag(-1, "context length of the packed rows (-1: the source's)")
    device_batch_size: int = flag(-1, "rows per device per micro-batch (-1: the source's)")
    total_batch_size: int = flag(-1, "tokens per optimizer step (-1: the source's)")
    num_iterations: int = flag(-1, "optimizer steps (-1: one epoch of the mixture)")
    max_conversations: int = flag(-1, "cap the train mixture (quick runs; -1 = all)")
    # optimizer (the lr flags, in SourceFlags: × init_lr_frac and this stage's batch-size scale; Muon wd 0)
    init_lr_frac: float = flag(-1.0, "multiplier of every lr (-1: 1.0 for mid, 0.8 for sft)")
    warmdown_ratio: float = flag(-1.0, "fraction of the data over which the lr decays (-1: 0.2 for mid, 0.5 for sft)")
    final_lr_frac: float = flag(0.0, "lr at the end, as a fraction of the peak")
    # eval, checkpoints
    eval_every: int = flag(150, "steps between validation bpb evaluations (-1: only after the last step)")
    eval_tokens: int = flag(20 * 524288, "validation tokens per evaluation")
    chatcore_tasks: str = flag("ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval|SpellingBee",
                               "tasks of the periodic ChatCORE in SFT, |-separated (\"\" = off)")
    chatcore_max_problems: int = flag(24, "problems per task in the periodic ChatCORE (-1: all)")
    chatcore_max_new_tokens: int = flag(256, "longest generated answer in the periodic ChatCORE")
    save_every: int = flag(-1, "steps between checkpoints (-1: only after the last step)")
    keep_checkpoints: int = flag(2, "checkpoints kept on disk (the oldest are deleted)")
    resume: bool | None = flag(None, "None: continue this stage's latest checkpoint if its settings match; "
                                     "1: require one; 0: start fresh (refused if checkpoints exist)")
    log_every: int = flag(1, "steps between log lines")
    seed: int = flag(42, "recorded with the run (the mixture's order is fixed by the tasks' own seeds)")

    def __post_init__(self):
        super().__post_init__()
        require(self.stage in SOURCE_OF, f"stage must be mid or sft, got {self.stage!r}")
        require(self.source in ("", "base", "mid", "sft"), f"--source must be base|mid|sft, got {self.source!r}")
        require(self.mixture in ("default", "local"), f"--mixture must be default|local, got {self.mixture!r}")
        require(self.eval_every != 0 and self.save_every != 0, "--eval-every/--save-every must be > 0 or -1 (off)")
        require(self.final_lr_frac >= 0 and (self.warmdown_ratio == -1 or 0 <= self.warmdown_ratio <= 1),
                "--warmdown-ratio must be in [0, 1] and --final-lr-frac >= 0")

    @property
    def source_phase(self) -> str:
        return self.source or SOURCE_OF[self.stage]


def lr_multiplier(progress: float, warmdown_ratio: float, final_lr_frac: float = 0.0) -> float:
    """The reference's chat schedules on data progress p ∈ [0, 1]: 1 until 1 − warmdown, then linear to final.
    (Classic nanochat's midtraining ramped *up*, its issue #68; we use the fixed, decaying schedule.)"""
    if warmdown_ratio <= 0 or progress < 1 - warmdown_ratio:
        return 1.0
    frac = min(max((1 - progress) / warmdown_ratio, 0.0), 1.0)
    return frac + (1 - frac) * final_lr_frac


def build_mixture(cfg: ChatTrainConfig, split: str) -> tasks.TaskMixture:
    """The stage's TaskMixture (train) or its validation mixture, from HF (default) or a local folder (local)."""
    d = {"data_dir": cfg.task_data}
    if cfg.mixture == "local":  # offline: real conversations and the task files of a shared/data-style folder
        parts = ([tasks.LocalChat("train", **d), tasks.ARC("ARC-Easy", "train", **d),
                  tasks.ARC("ARC-Challenge", "train", **d), tasks.GSM8K("main", "train", **d),
                  tasks.SimpleSpelling(300, "train", **d), tasks.SpellingBee(300, "train", **d)] if split == "train"
                 else [tasks.LocalChat("test", **d), tasks.ARC("ARC-Easy", "validation", **d, stop=200),
                       tasks.GSM8K("main", "test", **d, stop=200)])
    elif split != "train":
        parts = [tasks.SmolTalk("test", **d), tasks.MMLU("all", "test", **d, stop=5200),
                 tasks.GSM8K("main", "test", **d, stop=420)]
    elif cfg.stage == "mid":
        parts = [tasks.SmolTalk("train", **d), tasks.MMLU("auxiliary_train", "train", **d),
                 tasks.GSM8K("main", "train", **d), tasks.SimpleSpelling(200_000, "train", **d),
                 tasks.SpellingBee(80_000, "train", **d)]
    elif cfg.source_phase == "base":  # current nanochat's SFT from base: 3 epochs of MMLU aux, 4 of GSM8K
        parts = [tasks.SmolTalk("train", **d), (tasks.MMLU("auxiliary_train", "train", **d), 3),
                 (tasks.GSM8K("main", "train", **d), 4)]
    else:  # after midtraining (the classic pipeline): a small, cleaner mixture
        parts = [tasks.ARC("ARC-Easy", "train", **d), tasks.ARC("ARC-Challenge", "train", **d),
                 tasks.GSM8K("main", "train", **d), tasks.SmolTalk("train", **d, stop=10_000),
                 tasks.SimpleSpelling(300, "train", **d), tasks.SpellingBee(300, "train", **d)]
    if split == "train" and cfg.identity_file:
        parts.append((tasks.CustomJSON(cfg.identity_file), 2))
    # --max-conversations: the first n of the shuffled train mixture
    return tasks.TaskMixture(parts, stop=cfg.max_conversations if split == "train" and cfg.max_conversations > 0
                             else None)


def chat_train(cfg: ChatTrainConfig, *, train_data=None, val_data=None) -> LoopState:
    """Run midtraining or SFT. train_data/val_data (indexable conversation datasets) replace the mixtures (tests)."""
    st = Stage.open(cfg)
    mesh, tokenizer, stage = st.mesh, st.tokenizer, cfg.stage
    src = st.source(cfg.source_phase, cfg.model_tag, cfg.model_step)
    tag, model_cfg, source = src.tag, src.model_cfg, f"{src.phase}/{src.tag}/{src.step}"
    require_same_vocab(model_cfg, tokenizer, f"the {src.phase} checkpoint {tag}")
    T_len, dev_B, B = _batch_shape(cfg, src, mesh.size)
    grad_accum = B // (dev_B * T_len * mesh.size)
    train_data = build_mixture(cfg, "train") if train_data is None else train_data
    val_data = build_mixture(cfg, "val") if val_data is None else val_data
    pi, pc = jax.process_index(), jax.process_count()  # this process reads every pc-th conversation

    def packer(data):
        return ConversationPacker(data, tokenizer, sharding.local_batch_rows(dev_B * mesh.size, mesh), T_len,
                                  mode=stage, shard=pi, num_shards=pc)

    train_rows = packer(train_data)
    mean_len, est_steps = _epoch_steps(tokenizer, train_data, T_len, B)
    n_iter = cfg.num_iterations if cfg.num_iterations > 0 else None
    warmdown = cfg.warmdown_ratio if cfg.warmdown_ratio >= 0 else (0.2 if stage == "mid" else 0.5)
    opt_cfg, lrs = _optim_config(cfg, src, n_iter or est_steps, B)
    tx = optim.build_optimizer(gpt.param_shapes(model_cfg), opt_cfg, lr_schedule=lambda it: jnp.float32(1.0))
    prog = st.compile(model_cfg, tx, (grad_accum, dev_B * mesh.size, T_len), lr_input=True)
    print0(f"{stage}: from {src.phase}/{tag} step {src.step}; devices {mesh.size} × {st.device.device_kind}; "
           f"{len(train_data):,} train / {len(val_data):,} val conversations; batch {B:,} tokens = {grad_accum} × "
           f"{dev_B} × {T_len} × {mesh.size}; ~{est_steps:,} steps per epoch (mean {mean_len:.0f} "
           f"tokens/conversation); compiled in {prog.info['compile_seconds']:.1f}s")

    ckpt = Checkpointer(checkpoint_dir(stage, tag), keep=cfg.keep_checkpoints)
    state, start, meta = prog.continue_or_start(
        ckpt, cfg.resume, {**model_cfg.to_dict(), "source": source, "total_batch_size": B, "max_seq_len": T_len},
        src, f"{stage}/{tag}", optimizer=cfg.load_optimizer)
    loop = LoopState() if meta is None else loop_state(meta)
    if meta is not None:
        train_rows.set_state(meta["loader_state"][str(pi)])
    lrm_of: dict[int, float] = {}  # step → the lr multiplier its batch carried (for the log line)

    def batches():
        step = start
        while True:
            pos = {str(pi): train_rows.get_state()}
            # The lrm is a replicated input, so every process must compute the same one: average the progress.
            progress = float(sharding.process_sum([train_rows.progress])[0]) / pc
            lrm_of[step] = lr_multiplier(progress if n_iter is None else step / n_iter, warmdown, cfg.final_lr_frac)
            rows = [next(train_rows) for _ in range(grad_accum)]
            batch = {k: sharding.global_batch(np.stack([r[k] for r in rows]), mesh, batch_axis=1)
                     for k in ("inputs", "targets")}
            batch["lrm"] = jax.device_put(jnp.float32(lrm_of[step]), sharding.replicated(mesh))
            step += 1
            yield batch, pos
            # one epoch: the batch that wrapped the data was the last (on any process: all stop together)
            if n_iter is None and sharding.process_sum([train_rows.epochs_done > 0])[0]:
                return

    def val_batches():
        val = packer(val_data)
        while True:
            yield {k: sharding.global_batch(v, mesh) for k, v in next(val).items()}

    run = run_dir(f"{stage}_{tag}")
    log, last_chat = ScalarLog(run), {}
    step_log = StepLogger(loop, log, n_iter or est_steps, B, gpt.flops_per_token(model_cfg), st.device.device_kind,
                          mesh.size, cfg.log_every)
    save = saver(ckpt, cfg, model_cfg, f"{stage} checkpoint {tag}", loop=loop, stage=stage, source=source, lrs=lrs,
                 device_batch_size=dev_B, max_seq_len=T_len, total_batch_size=B,
                 data_meta=lambda pos: {"loader_state": gathered(pos or {str(pi): train_rows.get_state()})})
    periodic = [Periodic(cfg.eval_every, bpb_eval(st, prog, loop, log, val_batches,
                                                  max(1, cfg.eval_tokens // (dev_B * T_len * mesh.size)))),
                Periodic(cfg.eval_every, _chat_eval(cfg, st, model_cfg, log, last_chat), at_end=cfg.eval_every > 0),
                Periodic(cfg.save_every, save, after_start=True)]
    t0 = time.perf_counter()
    try:
        fit(prog.step_fn, state, batches(), start=start, n_iter=n_iter, periodic=periodic,
            report=lambda s, m, dt: step_log(s, m, dt, lrm_of.pop(s, 1.0), f"progress {train_rows.progress:.3f}"))
    finally:
        ckpt.close()
        log.close()
    steps = loop.history[-1][0] + 1 if loop.history else start
    took = format_duration(time.perf_counter() - t0)
    finish(run, "Midtraining" if stage == "mid" else "Chat SFT", {
        "source": source, "train conversations": len(train_data), "steps": steps, "total batch size": B,
        "max seq len": T_len, **{k: v * opt_cfg.init_lr_frac * opt_cfg.batch_lr_scale for k, v in lrs.items()},
        "init_lr_frac": opt_cfg.init_lr_frac, "batch lr scale": opt_cfg.batch_lr_scale,
        "min val bpb": loop.min_val_bpb, "final val bpb": loop.val_bpb if loop.val_bpb is not None else float("nan"),
        **{f"last eval {k}": v for k, v in last_chat.items()}, "wall time": took},
           f"{stage} done: {steps} steps, val bpb {loop.val_bpb:.4f}, wall time {took}",
           {"stage": stage, "final_step": steps, "val_bpb": loop.val_bpb},
           start=start, losses=loop.history)
    return loop


def _batch_shape(cfg: ChatTrainConfig, src, n_devices: int) -> tuple[int, int, int]:
    """(max_seq_len, device_batch_size, total_batch_size): each flag, else the source run's."""
    base_user = src.meta.get("user_config", {})
    pick = lambda v, key, default: v if v != -1 else src.meta.get(key, base_user.get(key, default))  # noqa: E731
    T_len = pick(cfg.max_seq_len, "max_seq_len", src.model_cfg.sequence_len)
    dev_B = pick(cfg.device_batch_size, "device_batch_size", 16)
    B = pick(cfg.total_batch_size, "total_batch_size", dev_B * T_len * n_devices)
    require(B % (dev_B * T_len * n_devices) == 0, f"total batch {B} tokens is not a multiple of device_batch_size × "
            f"max_seq_len × devices = {dev_B} × {T_len} × {n_devices}; set --total-batch-size")
    return T_len, dev_B, B


def _epoch_steps(tokenizer, data, T_len: int, B: int) -> tuple[float, int]:
    """(mean tokens per conversation, steps of one epoch), estimated from a sample of rendered lengths (only for the
    schedule's ETA and Muon's horizon; the loop itself stops when the data is consumed)."""
    sample = np.random.default_rng(0).choice(len(data), size=min(256, len(data)), replace=False)
    mean_len = np.mean([len(tokenizer.render_conversation(data[int(i)], T_len + 1)[0]) for i in sample])
    return mean_len, max(1, math.ceil(len(data) * mean_len / B))


def _optim_config(cfg: ChatTrainConfig, src, planned: int, B: int) -> tuple[optim.OptimConfig, dict]:
    lrs = src.lrs(**cfg.lr_flags())
    # The lr flags are written for a 2^19-token batch, which pretraining scales by sqrt(B / 2^19); the reference's
    # chat stages inherit them unscaled, harmless at its 2^19-token batches (scale 1) but an 11x lr shock at the CPU
    # demo's 4,096 (midtraining's loss went 6.4 → 13.4 at step 1). So scale by this stage's batch, as pretraining does.
    return optim.OptimConfig(
        num_iterations=planned, model_dim=src.model_cfg.n_embd, **lrs, weight_decay=0.0,
        batch_lr_scale=optim.batch_lr_scale(B), warmup_steps=0,
        init_lr_frac=cfg.init_lr_frac if cfg.init_lr_frac >= 0 else (1.0 if cfg.stage == "mid" else 0.8),
        # Muon momentum 0.85 → 0.95 over 300 steps, then flat (reference chat_sft/mid_train)
        muon_momentum_start=0.85, muon_momentum_peak=0.95, muon_momentum_warmup_steps=300,
        muon_momentum_final=0.95), lrs


def _chat_eval(cfg: ChatTrainConfig, st: Stage, model_cfg, log, last: dict):
    """SFT's periodic ChatCORE subset (None in midtraining or with --chatcore-tasks=""); `last` keeps its scores."""
    names = [t for t in cfg.chatcore_tasks.split("|") if t.strip()] if cfg.stage == "sft" else []
    if not names:
        return None
    cache = ChatEvalCache()  # the evaluator, engines and tasks, kept between evaluations

    def chat_evals(step, state, _):
        out = evaluate_chat_model(state["params"], model_cfg, st.tokenizer, st.mesh, names, data_dir=cfg.task_data,
                                  max_problems=None if cfg.chatcore_max_problems < 0 else cfg.chatcore_max_problems,
                                  max_new_tokens=cfg.chatcore_max_new_tokens, cache=cache)
        out.pop("details")
        last.update(out)
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in out.items()))
        log(step, **{f"chat_eval/{k}": v for k, v in out.items()})

    return chat_evals
