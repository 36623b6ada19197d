"""RL: the policy-gradient loss against NumPy, masking, and a toy reward that a tiny model learns to collect."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax import gpt
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.rl import RLConfig, group_advantages, pass_at_k, pg_loss_fn, rl_train, rollout_batch
from nanochat_jax.tokenizer import train_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog and then sleeps all day long in warm sun".split()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 12)) for _ in range(300)]
    tok = train_tokenizer(iter(texts), vocab_size=300)
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return str(d), tok


def tiny_cfg(vocab):
    return gpt.GPTConfig.from_depth(2, aspect_ratio=32, head_dim=32, max_seq_len=64, vocab_size=vocab,
                                    compute_dtype="float32", short_window=16)


def test_rollout_batch_and_loss_match_numpy():
    rng = np.random.default_rng(1)
    vocab, T = 50, 12
    prompt_lens = [3, 4]
    seqs, masks = [], []
    for pl in prompt_lens:
        gs, gm = [], []
        for s in range(3):
            n = pl + rng.integers(2, 9)
            seq = rng.integers(1, vocab, n).tolist()
            mask = [0] * pl + [1] * (n - pl)
            if s == 1:
                mask[pl + 1] = 0  # a forced tool token
            gs.append(seq)
            gm.append(mask)
        seqs.append(gs)
        masks.append(gm)
    rewards = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    batch, stats = rollout_batch(prompt_lens, seqs, masks, rewards, seq_len=T, pad_id=0, n_groups_total=2)

    # Hand computation: A = r - mean; N_g = sampled target tokens in group g; w = A / (N_g · 2)
    adv = rewards - rewards.mean(1, keepdims=True)
    assert np.allclose(group_advantages(rewards), adv)
    for g in range(2):
        n_g = sum(sum(m[1:T + 1]) for m in masks[g])
        for s in range(3):
            r = g * 3 + s
            assert batch["weights"][r] == pytest.approx(adv[g, s] / (n_g * 2))
            seq, mask = seqs[g][s], masks[g][s]
            for t in range(T):
                want = seq[t + 1] if t + 1 < len(seq) and mask[t + 1] else -1
                assert batch["targets"][r, t] == want
    assert stats["sampled_tokens"] == sum(sum(m[1:]) for gm in masks for m in gm)

    cfg = tiny_cfg(vocab)
    params = gpt.init_params(cfg, jax.random.key(0))
    loss = float(pg_loss_fn(cfg)(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    logits = np.asarray(gpt.forward(params, jnp.asarray(batch["inputs"]), cfg), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top
    obj = 0.0
    for r in range(6):
        for t in range(T):
            tgt = batch["targets"][r, t]
            if tgt >= 0:
                obj += logp[r, t, tgt] * batch["weights"][r]
    assert loss == pytest.approx(-obj, rel=1e-5, abs=1e-7)


def test_masked_tokens_get_zero_gradient():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 6, 10)), jnp.float32)
    targets = jnp.asarray([[3, -1, 4, -1, -1, 1], [-1, -1, 2, 2, 5, -1]])
    w = jnp.asarray([0.7, -0.3])
    grad = jax.grad(lambda lg: jnp.sum(gpt.cross_entropy(lg, targets, "none") * w[:, None]))(logits)
    masked = np.asarray(targets) < 0
    assert np.all(np.asarray(grad)[masked] == 0.0)
    assert np.all(np.abs(np.asarray(grad)[~masked]).sum(-1) > 0)


def test_pass_at_k():
    correct = np.array([[0, 1, 0], [0, 0, 0], [1, 1, 1], [0, 0, 1]], bool)
    assert pass_at_k(correct).tolist() == [0.25, 0.5, 0.75]


class ToyTask:
    """Prompt: a fixed question. Reward: the share of the reply's characters that are 'o' (dense, so a tiny model
    can climb it by REINFORCE in a few dozen steps)."""

    def __init__(self, n=64):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": f"say o {i % 4}"}, {"role": "assistant", "content": "o"}]}

    def reward(self, conversation, completion):
        return completion.count("o") / max(len(completion), 1)


def test_toy_reward_rises(tok_dir):
    d, tok = tok_dir
    cfg = tiny_cfg(tok.vocab_size)
    params = gpt.init_params(cfg, jax.random.key(4))
    with Checkpointer(checkpoint_dir("sft", "d2"), async_save=False) as ck:
        ck.save(0, params=params, meta={"step": 0, "model_config": cfg.to_dict(),
                                        "lrs": {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008,
                                                "scalar_lr": 0.5}})
    rl = RLConfig(tokenizer_dir=d, mesh=2, examples_per_step=4, num_samples=8, max_new_tokens=8, top_k=0,
                  train_seq_len=32, device_batch_size=8, num_steps=30, init_lr_frac=1.0, eval_every=30,
                  eval_examples=4, eval_samples=2, save_every=15)
    task = ToyTask()
    out = rl_train(rl, train_task=task, eval_task=task)
    rewards = [r for _, r in out["reward"]]
    assert len(rewards) == 30
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.2, rewards
    assert [s for s, _ in out["pass@k"]] == [0, 30]
    with Checkpointer(checkpoint_dir("rl", "d2")) as ck:
        assert ck.latest_step() == 30
    from nanochat_jax.report import get_report
    section = get_report().metrics([s for s in get_report().sections() if s["section"] == "Chat RL"][0])
    assert section["steps"] == 30 and section["last reward"] == rewards[-1]


@pytest.mark.slow
def test_resume_is_exact(tok_dir):
    d, tok = tok_dir
    cfg = tiny_cfg(tok.vocab_size)
    with Checkpointer(checkpoint_dir("sft", "r"), async_save=False) as ck:
        ck.save(0, params=gpt.init_params(cfg, jax.random.key(5)), meta={"step": 0, "model_config": cfg.to_dict()})
    kw = dict(tokenizer_dir=d, mesh=2, model_tag="r", examples_per_step=2, num_samples=4, max_new_tokens=6,
              top_k=0, train_seq_len=32, device_batch_size=4, num_steps=6, init_lr_frac=1.0, eval_every=-1,
              save_every=3)
    task = ToyTask()
    full = rl_train(RLConfig(**kw), train_task=task, eval_task=task)
    with Checkpointer(checkpoint_dir("rl", "r")) as ck:
        ck._mngr.delete(6)
    resumed = rl_train(RLConfig(**kw, resume=True), train_task=task, eval_task=task)
    assert [s for s, _ in resumed["losses"]] == [3, 4, 5]
    assert [loss for s, loss in full["losses"] if s >= 3] == [loss for _, loss in resumed["losses"]]
    assert [r for s, r in full["reward"] if s >= 3] == [r for _, r in resumed["reward"]]


def test_rollout_seeds_agree_across_processes():
    """Rollout seeds are a pure function of (seed, kind, step, example): two interpreters with different string-hash
    salts derive the same ones (a str in Python's hash() would differ per process), and they differ per argument."""
    import os
    import subprocess
    import sys

    code = ("from nanochat_jax.rl import rollout_seed; "
            "print([rollout_seed(s, k, st, ex) for s in (0, 1) for k in ('train', 'eval') for st in range(3) "
            "for ex in range(4)])")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": salt}).stdout for salt in ("1", "2")]
    assert outs[0] == outs[1]
    seeds = eval(outs[0])
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**31 for s in seeds)
