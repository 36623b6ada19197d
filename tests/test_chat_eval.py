"""Chat evals: letter-logit scoring vs a direct forward, generative grading with known answers, ChatCORE, the script.
The tasks come from tests/data/tasks, a few rows of each (no ../shared needed)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from nanochat_jax import chat_eval, gpt, sharding
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.common import pow2_bucket
from nanochat_jax.tokenizer import train_tokenizer

TASKS = REPO_ROOT / "tests" / "data" / "tasks"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from nanochat_jax.tasks import ARC

    arc = ARC("ARC-Easy", "train", data_dir=TASKS)
    texts = [arc[i]["messages"][0]["content"] for i in range(len(arc))]
    t = train_tokenizer(iter(texts), vocab_size=400)
    d = tmp_path_factory.mktemp("tok")
    t.save(d)
    t.dir = str(d)
    return t


def tiny_model(vocab, seed=0):
    cfg = gpt.GPTConfig.from_depth(2, aspect_ratio=32, head_dim=32, max_seq_len=128, vocab_size=vocab,
                                   compute_dtype="float32", short_window=32)
    return gpt.init_params(cfg, jax.random.key(seed)), cfg


def test_chatcore_arithmetic():
    # (0.5-0.25)/0.75 = 1/3 and (0.1-0)/1 = 0.1 → mean 0.21667
    assert chat_eval.chatcore({"ARC-Easy": 0.5, "GSM8K": 0.1}) == pytest.approx((1 / 3 + 0.1) / 2)
    assert chat_eval.chatcore({"MMLU": 0.25}) == 0.0


def test_categorical_matches_direct_forward(tok):
    from nanochat_jax.tasks import ARC, MMLU

    params, cfg = tiny_model(tok.vocab_size, seed=1)
    mesh = sharding.make_mesh(4)
    ev = chat_eval.CategoricalEvaluator(params, cfg, mesh, rows_per_batch=6)  # rounds up to 8 rows
    arc = ARC("ARC-Challenge", "test", data_dir=TASKS)
    mmlu = MMLU("all", "test", data_dir=TASKS)
    convs = [arc[i] for i in range(7)] + [mmlu[i] for i in range(5)]
    prompts = [tok.render_for_completion(c) for c in convs]
    letters = [chat_eval.letter_token_ids(tok, c["letters"]) for c in convs]
    got = ev.predict(prompts, letters)
    forward = jax.jit(lambda params, x: gpt.forward(params, x, cfg))  # one compile per length, not per op
    for p, ls, g in zip(prompts, letters, got):  # independent: one unpadded forward per prompt
        logits = np.asarray(forward(params, jnp.asarray([p])))[0, -1]
        assert g == int(np.argmax(logits[ls]))
    assert ev.traces == len({pow2_bucket(len(p), 64) for p in prompts})  # one compilation per length bucket

    out = chat_eval.run_categorical(arc, ev, tok, max_problems=16, name="ARC-Challenge")
    assert out["total"] == 16 and 0 <= out["passed"] <= 16


class ScriptedEngine:
    """Answers every prompt with a fixed text (known-answer tests of the generative path)."""

    def __init__(self, tok, answer_for):
        self.tok, self.answer_for, self.calls = tok, answer_for, 0

    def generate_batch(self, prompts, num_samples=1, **kw):
        self.calls += 1
        seqs = []
        for p in prompts:
            for k in range(num_samples):
                seqs.append(list(p) + self.tok.encode(self.answer_for(p, k)))
        return seqs, [[1] * len(s) for s in seqs]


def test_generative_grading_with_known_answers(tok):
    from nanochat_jax.tasks import GSM8K

    gsm = GSM8K("main", "test", data_dir=TASKS)
    by_prompt = {tuple(tok.render_for_completion(gsm[i])): gsm[i] for i in range(10)}

    def gold(p, k):
        last = by_prompt[tuple(p)]["messages"][-1]["content"][-1]["text"]
        return last  # the reference answer's final part, which ends in "#### <number>"

    engines = [ScriptedEngine(tok, gold), ScriptedEngine(tok, gold)]
    out = chat_eval.run_generative(gsm, engines, tok, max_problems=10, batch_problems=3)
    assert (out["passed"], out["total"]) == (10, 10)
    assert sum(e.calls for e in engines) == 4  # ceil(10 / 3) batches shared by the two threads
    wrong = chat_eval.run_generative(gsm, [ScriptedEngine(tok, lambda p, k: "#### -12345")], tok, max_problems=5)
    assert wrong["passed"] == 0
    # pass@k: right only on the 3rd sample still passes
    k3 = chat_eval.run_generative(gsm, [ScriptedEngine(tok, lambda p, k: gold(p, k) if k == 2 else "#### 0")], tok,
                                  max_problems=5, num_samples=3)
    assert k3["passed"] == 5


def test_generative_with_the_real_engine(tok):
    from nanochat_jax.tasks import SpellingBee

    params, cfg = tiny_model(tok.vocab_size, seed=2)
    bee = SpellingBee(64, "test", data_dir=TASKS)
    engines = chat_eval.make_engines(params, cfg, tok, jax.local_devices()[:2])
    out = chat_eval.run_generative(bee, engines, tok, max_problems=4, max_new_tokens=6, batch_problems=2)
    assert out["total"] == 4 and out["passed"] == 0  # a random model does not answer "#### n"


@pytest.mark.slow  # a subprocess end to end: ~30-50 s on a shared 2-core box
def test_chat_eval_script(tok, tmp_path):
    params, cfg = tiny_model(tok.vocab_size, seed=3)
    env = {**os.environ, "NANOCHAT_JAX_BASE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    os.environ["NANOCHAT_JAX_BASE_DIR"] = str(tmp_path)
    with Checkpointer(checkpoint_dir("sft", "d2"), async_save=False) as ck:
        ck.save(5, params=params, meta={"step": 5, "model_config": cfg.to_dict()})
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "chat_eval.py"), "-i", "sft", "-a", "ARC-Easy|GSM8K", "-x", "4",
           "--max-new-tokens=4", f"--task-data={TASKS}", f"--tokenizer-dir={tok.dir}", "--mesh=2"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads([line for line in out.stdout.splitlines() if line.startswith('{"source"')][-1])["results"]
    assert set(res) == {"ARC-Easy", "GSM8K", "ChatCORE_cat"} and 0 <= res["ARC-Easy"] <= 1
    section = json.loads((tmp_path / "report" / "chat-evaluation-sft.json").read_text())
    assert section["items"][1]["GSM8K"] == res["GSM8K"]
