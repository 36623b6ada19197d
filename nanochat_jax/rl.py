"""Reinforcement learning on GSM8K: on-policy REINFORCE with a group-mean baseline (nanochat's scripts/chat_rl.py).

Each step samples `num_samples` completions of `examples_per_step` problems (engines in threads, one per local
device), grades them (reward 0/1) and takes one shared train step (`make_train_step`, micro_reduce="sum") on

    loss = Σ_groups Σ_samples Σ_tokens  −log p(token) · A_sample / (n_tokens(group) · n_groups),
    A_sample = reward − mean(reward of its group)

over sampled tokens only (prompt, tool-forced tokens and padding have target −1): the reference's token-level
normalisation within a group, no KL term, no ratio. Rollouts are seeded by (step, example), so a resumed run
continues exactly; every --eval-every steps, pass@1..k on held-out test problems.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import gpt, optim, sharding
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.common import format_duration, print0
from nanochat_jax.config import SourceFlags, flag, require
from nanochat_jax.engine import make_engines, map_on_engines
from nanochat_jax.stage import Stage, finish, saver
from nanochat_jax.tasks import GSM8K
from nanochat_jax.report import ScalarLog, run_dir


@dataclass(frozen=True)
class RLConfig(SourceFlags):
    """Flags of scripts/rl.py: REINFORCE on GSM8K from a chat checkpoint (-1 / None: inherit or auto)."""
    source: str = flag("sft", "checkpoint phase to start from: base | mid | sft | rl")
    num_epochs: int = flag(1, "passes over GSM8K train (when --num-steps is -1)")
    num_steps: int = flag(-1, "optimizer steps; -1: len(train) // examples_per_step × epochs")
    examples_per_step: int = flag(16, "problems per step (over all devices)")
    num_samples: int = flag(16, "completions per problem")
    max_new_tokens: int = flag(256, "longest completion")
    temperature: float = flag(1.0, "sampling temperature of the training rollouts")
    top_k: int = flag(50, "top-k of the training rollouts (0 = off)")
    train_seq_len: int = flag(512, "rollouts are padded to this (longer ones are cut)")
    device_batch_size: int = flag(8, "rows per device per micro-batch")
    init_lr_frac: float = flag(0.05, "multiplier of every lr")
    eval_every: int = flag(60, "steps between pass@k evaluations on GSM8K test, and after the last step (-1 = off)")
    eval_examples: int = flag(400, "GSM8K test problems per evaluation")
    eval_samples: int = flag(8, "completions per evaluation problem: pass@1..eval_samples")
    save_every: int = flag(60, "steps between checkpoints (-1: only after the last step)")
    resume: bool | None = flag(None, "None: continue the latest rl checkpoint if its settings match; "
                                     "1: require one; 0: start fresh (refused if checkpoints exist)")
    seed: int = flag(0, "seed of the rollouts (each group's seed is a hash of it, the step and the problem)")

    def __post_init__(self):
        super().__post_init__()
        require(self.source in ("base", "mid", "sft", "rl"), f"--source must be base|mid|sft|rl, got {self.source!r}")
        require(self.examples_per_step >= 1 and self.num_samples >= 1, "--examples-per-step and --num-samples >= 1")
        require(self.max_new_tokens >= 1 and self.train_seq_len >= 2, "--max-new-tokens >= 1, --train-seq-len >= 2")
        require(self.eval_every != 0 and self.save_every != 0, "--eval-every/--save-every must be > 0 or -1 (off)")


def rollout_seed(seed: int, kind: str, step: int, example: int) -> int:
    """The sampling seed of one group of rollouts: a pure function of its arguments, the same in every process and
    every run (Python's hash() of a str is salted per process, so it cannot be used here)."""
    digest = hashlib.blake2b(f"{seed}/{kind}/{step}/{example}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


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
    """Training rows from one process's rollouts: prompt_lens (G,), seqs/masks G × S lists (prompt + completion ids,
    engine masks), rewards (G, S) → inputs/targets (G·S, seq_len), target −1 where no token was sampled (prompt,
    forced, padding, cut), weights (G·S,) = A / (sampled tokens in the group · n_groups_total); and stats."""
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
            sampled = np.asarray(mask[1:n], bool)
            targets[r, :n - 1] = np.where(sampled, np.asarray(seq[1:n], np.int32), -1)
            counts[g, s] = sampled.sum()
    adv = group_advantages(rewards)
    per_group = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    weights = (adv / (per_group * n_groups_total)).reshape(-1).astype(np.float32)
    stats = {"cut": cut, "sampled_tokens": int(counts.sum()),
             "mean_completion_len": float(np.mean([len(seqs[g][s]) - prompt_lens[g] for g in range(G)
                                                   for s in range(S)]))}
    return {"inputs": inputs, "targets": targets, "weights": weights}, stats


def pass_at_k(correct: np.ndarray) -> np.ndarray:
    """correct (problems, samples) bool, each process passing its own problems → pass@k for k = 1..samples over
    all of them: the share of problems with a correct answer among their first k samples (a collective)."""
    solved_k = np.cumsum(correct, axis=1).clip(0, 1).sum(axis=0)
    sums = sharding.process_sum(np.concatenate([solved_k, [len(correct)]]).astype(np.float64))
    return sums[:-1] / max(sums[-1], 1)


def sample_groups(engines, tokenizer, task, example_ids, *, num_samples, max_new_tokens, temperature, top_k,
                  seed_of, reward_fn=None):
    """Per example (one engine call each, engines in threads): (prompt length, sequences, engine masks, rewards)."""
    reward_fn = reward_fn or task.reward

    def rollout(engine, ex):
        conv = task[ex]
        prompt = tokenizer.render_for_completion(conv)
        seqs, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                            temperature=temperature, top_k=top_k, seed=seed_of(ex))
        rewards = [float(reward_fn(conv, tokenizer.decode(s[len(prompt):]))) for s in seqs]
        return len(prompt), seqs, masks, rewards

    return map_on_engines(engines, list(example_ids), rollout)


def rl_train(cfg: RLConfig, *, train_task=None, eval_task=None, reward_fn=None) -> dict:
    """Run RL. train_task/eval_task (tasks with `reward(conversation, completion)`) replace GSM8K (tests)."""
    st = Stage.open(cfg)
    mesh, tokenizer = st.mesh, st.tokenizer
    pi, pc = jax.process_index(), jax.process_count()
    train_task = train_task or GSM8K("main", "train", data_dir=cfg.task_data)
    eval_task = eval_task or GSM8K("main", "test", data_dir=cfg.task_data)
    src = st.source(cfg.source, cfg.model_tag, cfg.model_step)
    tag, model_cfg, source = src.tag, src.model_cfg, f"{cfg.source}/{src.tag}/{src.step}"
    E, S, T = cfg.examples_per_step, cfg.num_samples, cfg.train_seq_len
    R = cfg.device_batch_size * mesh.size  # rows per micro-batch
    require(E % pc == 0, f"--examples-per-step={E} must be a multiple of the {pc} processes")
    require(E * S % R == 0, f"examples_per_step × num_samples = {E * S} rows must be a multiple of "
                            f"device_batch_size × devices = {R}; change one of them")
    A = E * S // R
    num_steps = cfg.num_steps if cfg.num_steps > 0 else (len(train_task) // E) * cfg.num_epochs
    require(num_steps >= 1, f"no RL steps: {len(train_task)} problems < --examples-per-step={E}")
    lrs = src.lrs(**cfg.lr_flags())
    opt_cfg = optim.OptimConfig(num_iterations=num_steps, model_dim=model_cfg.n_embd, **lrs, weight_decay=0.0,
                                init_lr_frac=cfg.init_lr_frac, warmup_steps=0, muon_momentum_start=0.95,
                                muon_momentum_peak=0.95, muon_momentum_final=0.95)
    tx = optim.build_optimizer(gpt.param_shapes(model_cfg), opt_cfg,
                               lr_schedule=lambda it: 1.0 - it.astype(jnp.float32) / num_steps)  # reference: 1 − step/N
    prog = st.compile(model_cfg, tx, (A, R, T), loss_fn=pg_loss_fn(model_cfg), micro_reduce="sum",
                      extra_inputs={"weights": ((A, R), jnp.float32)})
    ckpt = Checkpointer(checkpoint_dir("rl", tag), keep=2)
    state, start, _ = prog.continue_or_start(ckpt, cfg.resume, {
        **model_cfg.to_dict(), "source": source, "num_steps": num_steps, "examples_per_step": E, "num_samples": S},
        src, f"rl/{tag}")
    engines = make_engines(state["params"], model_cfg, tokenizer, sharding.local_devices(mesh=mesh))
    print0(f"rl: from {cfg.source}/{tag} step {src.step}; {num_steps} steps × {E} problems × {S} samples "
           f"({E * S} rows = {A} × {R} × {T} tokens); {len(engines)} engine(s) on this process; "
           f"train step compiled in {prog.info['compile_seconds']:.1f}s")
    run = run_dir(f"rl_{tag}")
    log, rewards, passes, losses = ScalarLog(run), [], [], []
    sample = functools.partial(sample_groups, engines, tokenizer, max_new_tokens=cfg.max_new_tokens,
                               reward_fn=reward_fn)
    save = saver(ckpt, cfg, model_cfg, f"rl checkpoint {tag}", source=source, lrs=lrs, num_steps=num_steps)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    t_start = time.perf_counter()
    try:
        for step in range(start, num_steps + 1):
            last = step == num_steps
            if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or last):
                passes.append((step, _evaluate(cfg, sample, eval_task, step, log).tolist()))
            if step > start and (last or (cfg.save_every > 0 and step % cfg.save_every == 0)):
                save(step, state)
            if last:
                break
            t0 = time.perf_counter()
            first = (step * E) % len(train_task)
            groups = sample(train_task, [(first + i) % len(train_task) for i in range(E)][pi::pc], num_samples=S,
                            temperature=cfg.temperature, top_k=cfg.top_k,
                            seed_of=functools.partial(rollout_seed, cfg.seed, "train", step))
            t_sample = time.perf_counter() - t0
            prompt_lens, seqs, masks, rewards_G = zip(*groups)
            reward_GS = np.array(rewards_G, np.float64)
            host, stats = rollout_batch(prompt_lens, seqs, masks, reward_GS, seq_len=T, pad_id=pad_id, n_groups_total=E)
            state, metrics = prog.step_fn(state, {k: sharding.global_batch(v.reshape(A, -1, *v.shape[1:]), mesh,
                                                                           batch_axis=1) for k, v in host.items()})
            for engine in engines:
                engine.set_params(state["params"])
            losses.append((step, float(metrics["loss"])))
            rewards.append((step, _log_step(log, step, num_steps, reward_GS, stats, loss=losses[-1][1],
                                            t_sample=t_sample, dt=time.perf_counter() - t0, seq_len=T)))
    finally:
        ckpt.close()
        log.close()
    took = time.perf_counter() - t_start
    summary = {"stage": "rl", "steps": num_steps, "wall_seconds": took}
    series = {"reward": rewards, "pass@k": passes, "losses": [[s, loss] for s, loss in losses]}
    last_pass = passes[-1][1] if passes else []
    finish(run, "Chat RL", {
        "source": source, "steps": num_steps, "examples per step": E, "samples per example": S,
        "first reward": rewards[0][1] if rewards else float("nan"),
        "last reward": rewards[-1][1] if rewards else float("nan"),
        **{f"pass@{k + 1}": v for k, v in enumerate(last_pass)}, "wall time": format_duration(took)},
           f"rl done: {num_steps} steps in {format_duration(took)}", summary, **series)
    return {**summary, **series}


def _evaluate(cfg: RLConfig, sample, task, step: int, log) -> np.ndarray:
    """pass@1..eval_samples on the first --eval-examples problems of `task` (each process sampling its share)."""
    mine = list(range(jax.process_index(), min(cfg.eval_examples, len(task)), jax.process_count()))
    groups = sample(task, mine, num_samples=cfg.eval_samples, temperature=1.0, top_k=50,
                    seed_of=functools.partial(rollout_seed, cfg.seed, "eval", step))
    passk = pass_at_k(np.array([[r > 0 for r in g[3]] for g in groups], bool).reshape(len(mine), cfg.eval_samples))
    print0(f"step {step:05d} | " + " | ".join(f"pass@{k + 1} {v:.4f}" for k, v in enumerate(passk)))
    log(step, **{f"eval/pass@{k + 1}": float(v) for k, v in enumerate(passk)})
    return passk


def _log_step(log, step: int, num_steps: int, reward_GS, stats: dict, *, loss: float, t_sample: float, dt: float,
              seq_len: int) -> float:
    """A train step's line and scalars, means over every process's rollouts; returns the mean reward."""
    tot = sharding.process_sum(np.array([reward_GS.sum(), stats["mean_completion_len"] * reward_GS.size,
                                         reward_GS.size]))
    mean_reward, mean_len, lrm = tot[0] / tot[2], tot[1] / tot[2], 1.0 - step / num_steps
    print0(f"step {step:05d}/{num_steps} | reward {mean_reward:.4f} | completion length {mean_len:.1f} | "
           f"loss {loss:+.6f} | lrm {lrm:.3f} | sampling {t_sample:.1f}s | step {dt:.1f}s"
           + (f" | {stats['cut']} rollouts cut at {seq_len}" if stats["cut"] else ""))
    log(step, **{"rl/reward": mean_reward, "rl/sequence_length": mean_len, "rl/lrm": lrm, "rl/loss": loss,
                 "rl/step_seconds": dt})
    return float(mean_reward)
