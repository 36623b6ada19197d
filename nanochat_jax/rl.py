"""Reinforcement learning on GSM8K: REINFORCE with a group-mean baseline, on-policy (nanochat's scripts/chat_rl.py).

Each step takes `examples_per_step` training problems, samples `num_samples` completions of each with the engine
(temperature 1.0, top-k 50, tool use on), grades them (reward 0/1), and takes one optimizer step on

    loss = Σ_groups Σ_samples Σ_tokens  −log p(token) · A_sample / (n_tokens(group) · n_groups),
    A_sample = reward − mean(reward of its group)

over sampled tokens only: the prompt, tool-forced tokens (engine mask 0) and padding have target −1. This is the
reference's token-level normalisation within a group (its "num_passes" is 1 here because a group is one batch);
there is no KL term and no ratio (each step samples from the current policy).

Sampling runs on one Engine per local device in threads (examples split over devices and processes); the gradient
step is the shared train step (`make_train_step` with this loss and micro_reduce="sum"), sharded over the mesh.
Every --eval-every steps: pass@1..k on held-out test problems. Rollouts are seeded by (step, example), so a resumed
run (params, optimizer state and step restored) continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import gpt, optim, sharding
from nanochat_jax.common import format_duration, print0
from nanochat_jax.config import flag, require


@dataclass(frozen=True)
class RLConfig:
    """Flags of scripts/rl.py: REINFORCE on GSM8K from a chat checkpoint (-1 / None: inherit or auto)."""
    source: str = flag("sft", "checkpoint phase to start from: base | mid | sft | rl")
    model_tag: str | None = flag(None, "source model tag (default: the largest); the output uses the same tag")
    model_step: int | None = flag(None, "source step (default: latest)")
    num_epochs: int = flag(1, "passes over GSM8K train (when --num-steps is -1)")
    num_steps: int = flag(-1, "optimizer steps; -1: len(train) // examples_per_step × epochs")
    examples_per_step: int = flag(16, "problems per step (over all devices)")
    num_samples: int = flag(16, "completions per problem")
    max_new_tokens: int = flag(256, "longest completion")
    temperature: float = flag(1.0, "sampling temperature of the training rollouts")
    top_k: int = flag(50, "top-k of the training rollouts (0 = off)")
    train_seq_len: int = flag(512, "rollouts are padded to this (longer ones are cut)")
    device_batch_size: int = flag(8, "rows per device per micro-batch")
    embedding_lr: float = flag(-1.0, "AdamW lr of the token embedding (-1: the source's), times init_lr_frac")
    unembedding_lr: float = flag(-1.0, "AdamW lr of lm_head (-1: the source's), times init_lr_frac")
    matrix_lr: float = flag(-1.0, "Muon lr of the transformer matrices (-1: the source's), times init_lr_frac")
    scalar_lr: float = flag(-1.0, "AdamW lr of the per-layer scalars (-1: the source's), times init_lr_frac")
    init_lr_frac: float = flag(0.05, "multiplier of every lr")
    eval_every: int = flag(60, "steps between pass@k evaluations on GSM8K test, and after the last step (-1 = off)")
    eval_examples: int = flag(400, "GSM8K test problems per evaluation")
    eval_samples: int = flag(8, "completions per evaluation problem: pass@1..eval_samples")
    save_every: int = flag(60, "steps between checkpoints (-1: only after the last step)")
    resume: bool | None = flag(None, "None: continue the latest rl checkpoint if its settings match; "
                                     "1: require one; 0: start fresh (refused if checkpoints exist)")
    task_data: str | None = flag(None, "a shared/data-style folder with GSM8K ($NANOCHAT_JAX_TASK_DATA)")
    mesh: int = flag(-1, "devices in the (\"data\",) mesh; -1 = all")
    distributed: bool | None = flag(None, "multi-process run (jax.distributed); None: auto-detect a launcher")
    fsdp: bool = flag(True, "shard params/optimizer state over the mesh (ZeRO/FSDP); else replicate")
    attention: str = flag("auto", "auto | xla | cudnn | pallas (auto: cudnn on GPU, xla elsewhere)")
    compute_dtype: str = flag("auto", "auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32")
    tokenizer_dir: str | None = flag(None, "tokenizer folder (default <base dir>/tokenizer)")
    seed: int = flag(0, "seed of the rollouts (each group's seed is a hash of it, the step and the problem)")

    def __post_init__(self):
        require(self.source in ("base", "mid", "sft", "rl"), f"--source must be base|mid|sft|rl, got {self.source!r}")
        require(self.examples_per_step >= 1 and self.num_samples >= 1, "--examples-per-step and --num-samples >= 1")
        require(self.max_new_tokens >= 1 and self.train_seq_len >= 2, "--max-new-tokens >= 1, --train-seq-len >= 2")
        require(self.eval_every != 0 and self.save_every != 0, "--eval-every/--save-every must be > 0 or -1 (off)")


def rollout_seed(seed: int, kind: str, step: int, example: int) -> int:
    """The sampling seed of one group of rollouts: a pure function of its arguments, the same in every process and
    every run (Python's hash() of a str is salted per process, so it cannot be used here)."""
    digest = hashlib.blake2b(f"{seed}/{kind}/{step}/{example}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------
# The loss and the batch

def pg_loss_fn(model_cfg: gpt.GPTConfig):
    """(params, micro-batch {"inputs", "targets", "weights"}) → Σ_rows Σ_tokens CE · weight_row, i.e. −Σ logp·A/N."""

    def loss(params, micro):
        ce_BT = gpt.forward(params, micro["inputs"], model_cfg, targets_BT=micro["targets"], loss_reduction="none")
        return jnp.sum(ce_BT * micro["weights"][:, None])

    return loss


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """(groups, samples) rewards → reward − group mean (no division by the std, as the reference)."""
    return rewards - rewards.mean(axis=1, keepdims=True)


def rollout_batch(prompt_lens, seqs, masks, rewards, *, seq_len: int, pad_id: int, n_groups_total: int):
    """Training rows from one process's rollouts.

    prompt_lens (G,), seqs/masks: G × S lists (prompt + completion ids / engine masks, prompt part 0), rewards (G, S).
    Returns inputs/targets (G·S, seq_len) with target −1 where the token was not sampled (prompt, forced, padding or
    cut), weights (G·S,) = A / (sampled tokens in the group · n_groups_total), and stats.
    """
    G, S = rewards.shape
    inputs = np.full((G * S, seq_len), pad_id, np.int32)
    targets = np.full((G * S, seq_len), -1, np.int32)
    cut = 0
    counts = np.zeros((G, S), np.int64)
    for g in range(G):
        for s in range(S):
            r, seq, mask = g * S + s, seqs[g][s], masks[g][s]
            n = min(len(seq), seq_len + 1)
            cut += len(seq) > seq_len + 1
            inputs[r, :n - 1] = seq[:n - 1]
            tgt = np.asarray(seq[1:n], np.int32)
            sampled = np.asarray(mask[1:n], bool)
            targets[r, :n - 1] = np.where(sampled, tgt, -1)
            counts[g, s] = sampled.sum()
    adv = group_advantages(rewards)
    per_group = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    weights = (adv / (per_group * n_groups_total)).reshape(-1).astype(np.float32)
    stats = {"cut": cut, "sampled_tokens": int(counts.sum()),
             "mean_completion_len": float(np.mean([len(seqs[g][s]) - prompt_lens[g] for g in range(G)
                                                   for s in range(S)]))}
    return {"inputs": inputs, "targets": targets, "weights": weights}, stats


def pass_at_k(correct: np.ndarray) -> np.ndarray:
    """correct (problems, samples) bool → pass@k for k = 1..samples: any of the first k samples correct."""
    return np.cumsum(correct, axis=1).clip(0, 1).mean(axis=0)


# ----------------------------------------------------------------------------------------------
# Sampling with one engine per device

def sample_groups(engines, tokenizer, task, example_ids, *, num_samples, max_new_tokens, temperature, top_k,
                  seed_of, reward_fn=None):
    """For each example: its prompt ids, num_samples (prompt + completion) sequences, engine masks and rewards.
    Engines in threads, one example per engine call."""
    from nanochat_jax.engine import map_on_engines

    reward_fn = reward_fn or task.reward

    def rollout(engine, ex):
        conv = task[ex]
        prompt = tokenizer.render_for_completion(conv)
        seqs, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                            temperature=temperature, top_k=top_k, seed=seed_of(ex))
        rewards = [float(reward_fn(conv, tokenizer.decode(s[len(prompt):]))) for s in seqs]
        return len(prompt), seqs, masks, rewards

    return map_on_engines(engines, list(example_ids), rollout)


# ----------------------------------------------------------------------------------------------
# The loop

def rl_train(cfg: RLConfig, *, train_task=None, eval_task=None, reward_fn=None) -> dict:
    """Run RL. train_task/eval_task (tasks with `reward(conversation, completion)`) replace GSM8K (tests)."""
    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
    from nanochat_jax.checkpoint import resume_step as resume_from
    from nanochat_jax.engine import make_engines
    from nanochat_jax.tokenizer import get_tokenizer
    from nanochat_jax.checkpoint import open_source
    from nanochat_jax.train import (LoopState, ScalarLog, abstract_state, abstract_tree, compile_train_step,
                                    finish_run, run_dir)

    sharding.maybe_initialize_distributed(cfg.distributed)
    mesh = sharding.make_mesh(cfg.mesh)
    device = mesh.devices.flat[0]
    on_gpu = device.platform == "gpu"
    pi, pc = jax.process_index(), jax.process_count()
    tokenizer = get_tokenizer(cfg.tokenizer_dir)
    if train_task is None or eval_task is None:
        from nanochat_jax.tasks import GSM8K
        train_task = train_task or GSM8K("main", "train", data_dir=cfg.task_data)
        eval_task = eval_task or GSM8K("main", "test", data_dir=cfg.task_data)

    src = open_source(cfg.source, cfg.model_tag, cfg.model_step, compute_dtype=cfg.compute_dtype,
                      attention=cfg.attention, on_gpu=on_gpu)
    tag, src_step, model_cfg = src.tag, src.step, src.model_cfg

    E, S = cfg.examples_per_step, cfg.num_samples
    require(E % pc == 0, f"--examples-per-step={E} must be a multiple of the {pc} processes")
    rows = E * S
    micro_rows = cfg.device_batch_size * mesh.size
    require(rows % micro_rows == 0, f"examples_per_step × num_samples = {rows} rows must be a multiple of "
                                    f"device_batch_size × devices = {micro_rows}; change one of them")
    grad_accum = rows // micro_rows
    num_steps = cfg.num_steps if cfg.num_steps > 0 else (len(train_task) // E) * cfg.num_epochs
    require(num_steps >= 1, f"no RL steps: {len(train_task)} problems < --examples-per-step={E}")

    lrs = src.lrs(matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
                  scalar_lr=cfg.scalar_lr)
    opt_cfg = optim.OptimConfig(num_iterations=num_steps, model_dim=model_cfg.n_embd, **lrs, weight_decay=0.0,
                                init_lr_frac=cfg.init_lr_frac, warmup_steps=0, muon_momentum_start=0.95,
                                muon_momentum_peak=0.95, muon_momentum_final=0.95)
    tx = optim.build_optimizer(gpt.param_shapes(model_cfg), opt_cfg,
                               lr_schedule=lambda it: 1.0 - it.astype(jnp.float32) / num_steps)  # reference: 1 − step/N
    state_shapes = abstract_state(model_cfg, tx)
    T = cfg.train_seq_len
    A, R = grad_accum, micro_rows
    step_fn, shardings, info = compile_train_step(
        model_cfg, tx, mesh, state_shapes, (A, R, T), shard_params=cfg.fsdp, loss_fn=pg_loss_fn(model_cfg),
        micro_reduce="sum", extra_inputs={"weights": ((A, R), jnp.float32)})
    abstract = abstract_tree(state_shapes, shardings)

    ckpt = Checkpointer(checkpoint_dir("rl", tag), keep=2)
    loop = LoopState()

    start = resume_from(ckpt, cfg.resume, {**model_cfg.to_dict(), "source": f"{cfg.source}/{tag}/{src_step}",
                                           "num_steps": num_steps, "examples_per_step": E, "num_samples": S},
                        close_on_error=(ckpt, src.ckpt))
    if start is not None:
        params, opt_state, meta = ckpt.restore(start, abstract_params=abstract["params"],
                                               abstract_opt_state=abstract["opt_state"])
        print0(f"resumed rl/{tag} from step {start}")
    else:
        start = 0
        params, _, _ = src.ckpt.restore(src_step, abstract_params=abstract["params"])
        opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    src.ckpt.close()
    state = {"step": jax.device_put(jnp.asarray(start, jnp.int32), shardings["step"]), "params": params,
             "opt_state": opt_state}
    engines = make_engines(state["params"], model_cfg, tokenizer,
                           [d for d in mesh.devices.flat if d.process_index == pi])
    print0(f"rl: from {cfg.source}/{tag} step {src_step}; {num_steps} steps × {E} problems × {S} samples "
           f"({rows} rows = {A} × {R} × {T} tokens); {len(engines)} engine(s) on this process; "
           f"train step compiled in {info['compile_seconds']:.1f}s")

    log = ScalarLog(run_dir(f"rl_{tag}"))
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    history = {"reward": [], "pass@k": []}

    def put(host: dict) -> dict:
        arrs = {k: v.reshape(A, -1, *v.shape[1:]) for k, v in host.items()}
        return {k: sharding.global_batch(v, mesh, batch_axis=1) for k, v in arrs.items()}

    def refresh_engines(params):
        for e in engines:
            e.set_params(params)

    def evaluate(step):
        n = min(cfg.eval_examples, len(eval_task))
        mine = list(range(pi, n, pc))
        groups = sample_groups(engines, tokenizer, eval_task, mine, num_samples=cfg.eval_samples,
                               max_new_tokens=cfg.max_new_tokens, temperature=1.0, top_k=50,
                               seed_of=functools.partial(rollout_seed, cfg.seed, "eval", step), reward_fn=reward_fn)
        correct = np.array([[r > 0 for r in g[3]] for g in groups], bool).reshape(len(mine), cfg.eval_samples)
        passed_k = np.cumsum(correct, 1).clip(0, 1).sum(0)  # problems solved within the first k samples
        sums = sharding.process_sum(np.concatenate([passed_k, [len(mine)]]).astype(np.float64))
        passk = sums[:-1] / max(sums[-1], 1)
        print0(f"step {step:05d} | " + " | ".join(f"pass@{k + 1} {v:.4f}" for k, v in enumerate(passk)))
        log(step, **{f"eval/pass@{k + 1}": float(v) for k, v in enumerate(passk)})
        history["pass@k"].append((step, passk.tolist()))

    def save(step):
        meta = {"step": step, "model_config": model_cfg.to_dict(), "user_config": dataclasses.asdict(cfg),
                "source": f"{cfg.source}/{tag}/{src_step}", "lrs": lrs, "num_steps": num_steps}
        ckpt.save(step, params=state["params"], opt_state=state["opt_state"], meta=meta, overwrite=True)
        print0(f"saved rl checkpoint {tag} step {step}")

    t_start = time.perf_counter()
    try:
        for step in range(start, num_steps + 1):
            last = step == num_steps
            if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or last):
                evaluate(step)
            if step > start and (last or (cfg.save_every > 0 and step % cfg.save_every == 0)):
                save(step)
            if last:
                break
            t0 = time.perf_counter()
            first = (step * E) % len(train_task)
            examples = [(first + i) % len(train_task) for i in range(E)][pi::pc]
            groups = sample_groups(engines, tokenizer, train_task, examples, num_samples=S,
                                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                   seed_of=functools.partial(rollout_seed, cfg.seed, "train", step),
                                   reward_fn=reward_fn)
            t_sample = time.perf_counter() - t0
            rewards = np.array([g[3] for g in groups], np.float64)
            host, stats = rollout_batch([g[0] for g in groups], [g[1] for g in groups], [g[2] for g in groups],
                                        rewards, seq_len=T, pad_id=pad_id, n_groups_total=E)
            state, metrics = step_fn(state, put(host))
            refresh_engines(state["params"])
            loss = float(metrics["loss"])
            tot = sharding.process_sum(np.array([rewards.sum(), stats["mean_completion_len"] * rewards.size,
                                                 rewards.size]))
            mean_reward, mean_len = tot[0] / tot[2], tot[1] / tot[2]
            dt = time.perf_counter() - t0
            loop.history.append((step, loss))
            history["reward"].append((step, float(mean_reward)))
            lrm = 1.0 - step / num_steps
            print0(f"step {step:05d}/{num_steps} | reward {mean_reward:.4f} | completion length {mean_len:.1f} | "
                   f"loss {loss:+.6f} | lrm {lrm:.3f} | sampling {t_sample:.1f}s | step {dt:.1f}s"
                   + (f" | {stats['cut']} rollouts cut at {T}" if stats["cut"] else ""))
            log(step, **{"rl/reward": mean_reward, "rl/sequence_length": mean_len, "rl/lrm": lrm, "rl/loss": loss,
                         "rl/step_seconds": dt})
    finally:
        ckpt.close()
        log.close()
    summary = {"stage": "rl", "steps": num_steps, "wall_seconds": time.perf_counter() - t_start,
               "reward": history["reward"], "pass@k": history["pass@k"],
               "losses": [[s, loss] for s, loss in loop.history]}
    print0(f"rl done: {num_steps} steps in {format_duration(summary['wall_seconds'])}")
    if pi == 0:
        from nanochat_jax.report import get_report

        last_pass = history["pass@k"][-1][1] if history["pass@k"] else []
        get_report().log("Chat RL", {
            "source": f"{cfg.source}/{tag}/{src_step}", "steps": num_steps, "examples per step": E,
            "samples per example": S, "first reward": history["reward"][0][1] if history["reward"] else float("nan"),
            "last reward": history["reward"][-1][1] if history["reward"] else float("nan"),
            **{f"pass@{k + 1}": v for k, v in enumerate(last_pass)},
            "wall time": format_duration(summary["wall_seconds"])}, run_dir=run_dir(f"rl_{tag}"))
    finish_run(run_dir(f"rl_{tag}"), {k: summary[k] for k in ("stage", "steps", "wall_seconds")},
               **{k: summary[k] for k in ("reward", "pass@k", "losses")})
    return summary
