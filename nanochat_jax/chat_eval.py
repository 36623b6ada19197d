"""Chat evaluations as nanochat runs them (scripts/chat_eval.py, `run_chat_eval`), and ChatCORE.

Categorical (ARC, MMLU): the answer is the argmax, over the allowed letters' token ids, of the logits after the
prompt's <|assistant_start|>, batched by core_eval.BucketRunner (one compilation per power-of-two length bucket).
Generative (GSM8K, HumanEval, SpellingBee): one Engine per local device, each in its own thread (JAX releases the
GIL while a device computes); a problem passes if any of its samples does (pass@k). Process p of P takes problems
p, p + P, ...; counts are summed over processes. ChatCORE is the mean centered accuracy, (acc - baseline) /
(1 - baseline), with baseline 0.25 for the 4-way choice tasks and 0 otherwise.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import gpt, sharding
from nanochat_jax.core_eval import BucketRunner
from nanochat_jax.engine import make_engines, map_on_engines

BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
ALL_TASKS = tuple(BASELINES)
MAX_LETTERS = 8  # letter slots per row (ARC has up to 5 choices); fixed so one compilation serves every task


def load_task(name: str, data_dir=None):
    """The evaluation split of a chat task by its report name."""
    from nanochat_jax import tasks

    makers = {"ARC-Easy": lambda: tasks.ARC("ARC-Easy", "test", data_dir=data_dir),
              "ARC-Challenge": lambda: tasks.ARC("ARC-Challenge", "test", data_dir=data_dir),
              "MMLU": lambda: tasks.MMLU("all", "test", data_dir=data_dir),
              "GSM8K": lambda: tasks.GSM8K("main", "test", data_dir=data_dir),
              "HumanEval": lambda: tasks.HumanEval(data_dir=data_dir),
              "SpellingBee": lambda: tasks.SpellingBee(256, "test", data_dir=data_dir)}
    if name not in makers:
        raise ValueError(f"unknown chat task {name!r}; choose from {'|'.join(ALL_TASKS)}")
    return makers[name]()


def chatcore(results: dict[str, float]) -> float:
    """Mean centered accuracy over the tasks in `results`."""
    return float(np.mean([(acc - BASELINES[t]) / (1 - BASELINES[t]) for t, acc in results.items()]))


class _Progress:
    """One task's run: this process's problems (`mine`), and `task: passed/done (acc) of total` on process 0,
    rewritten in place on a terminal, else printed every tenth of the problems."""

    def __init__(self, name: str, task, max_problems: int | None):
        self.name, self.t0 = name, time.perf_counter()
        self.total = len(task) if max_problems is None else min(len(task), max_problems)
        self.mine = list(range(jax.process_index(), self.total, jax.process_count()))
        self.live = jax.process_index() == 0 and sys.stdout.isatty()
        self.every = max(1, self.total // 10)

    def update(self, passed: int, done: int, final: bool = False) -> None:
        if jax.process_index() != 0 or not (self.live or final or done % self.every == 0):
            return
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        line = (f"{self.name}: {passed}/{done} ({100 * passed / max(done, 1):.2f}%) of {self.total} | "
                f"{rate:.1f} problems/s")
        print(("\r" if self.live else "") + line, end="\n" if final or not self.live else "", flush=True)

    def finish(self, passed: int, done: int) -> dict:
        """Counts summed over processes, printed, and returned with the accuracy and time."""
        passed, total = (int(v) for v in sharding.process_sum(np.array([passed, done])))
        self.update(passed, total, final=True)
        return {"accuracy": passed / max(total, 1), "passed": passed, "total": total,
                "seconds": time.perf_counter() - self.t0}


class CategoricalEvaluator(BucketRunner):
    """Letter logits of prompts, a fixed number of rows per batch (core_eval.BucketRunner: power-of-two length
    buckets, one compilation each)."""

    def __init__(self, params, model_cfg: gpt.GPTConfig, mesh, *, rows_per_batch: int = 32):
        self.rows = max(mesh.size, -(-rows_per_batch // mesh.size) * mesh.size)

        def letter_logits(params, idx_BT, last_B, letters_BL):
            logits_BTV = gpt.forward(params, idx_BT, model_cfg)
            at_last_BV = jnp.take_along_axis(logits_BTV, last_B[:, None, None], axis=1)[:, 0]
            picked_BL = jnp.take_along_axis(at_last_BV, jnp.maximum(letters_BL, 0), axis=1)
            return (jnp.where(letters_BL >= 0, picked_BL, -jnp.inf),)

        super().__init__(letter_logits, params, mesh, max_len=model_cfg.sequence_len, pad_id=0)

    def rows_per_batch(self, length: int) -> int:
        return self.rows

    def predict(self, prompts: Sequence[Sequence[int]], letter_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Index (into each prompt's letters) of the highest-logit letter, for every prompt."""
        rows = [(p, len(p) - 1, list(ls) + [-1] * (MAX_LETTERS - len(ls))) for p, ls in zip(prompts, letter_ids)]
        return self(rows)[0].argmax(-1)


def letter_token_ids(tokenizer, letters: Sequence[str]) -> list[int]:
    encoded = [tokenizer.encode(letter) for letter in letters]
    for letter, enc in zip(letters, encoded):
        if len(enc) != 1:
            raise ValueError(f"the answer letter {letter!r} is {len(enc)} tokens with this tokenizer; categorical "
                             f"evaluation needs single-token letters (train the tokenizer on more text)")
    return [enc[0] for enc in encoded]


def run_categorical(task, evaluator: CategoricalEvaluator, tokenizer, *, max_problems: int | None = None,
                    name: str = "task") -> dict:
    progress = _Progress(name, task, max_problems)
    convs = [task[i] for i in progress.mine]
    prompts = [tokenizer.render_for_completion(c) for c in convs]
    letters = [c["letters"] for c in convs]
    pred = evaluator.predict(prompts, [letter_token_ids(tokenizer, ls) for ls in letters])
    return progress.finish(sum(int(task.evaluate(c, ls[p])) for c, ls, p in zip(convs, letters, pred)), len(convs))


def run_generative(task, engines: Sequence, tokenizer, *, num_samples: int = 1, max_new_tokens: int = 512,
                   temperature: float = 0.0, top_k: int = 50, max_problems: int | None = None,
                   batch_problems: int = 8, seed: int = 0, name: str = "task") -> dict:
    """pass@num_samples over the task's problems, sampled by `engines` in parallel threads."""
    progress = _Progress(name, task, max_problems)
    mine, lock, counts = progress.mine, threading.Lock(), {"passed": 0, "done": 0}
    chunks = [mine[s:s + batch_problems] for s in range(0, len(mine), batch_problems)]

    def solve(engine, chunk):
        convs = [task[i] for i in chunk]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        seqs, _ = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, seed=seed + chunk[0])
        for j, (conv, prompt) in enumerate(zip(convs, prompts)):
            outs = [tokenizer.decode(seqs[j * num_samples + k][len(prompt):]) for k in range(num_samples)]
            ok = any(bool(task.evaluate(conv, out)) for out in outs)
            with lock:
                counts["passed"] += int(ok)
                counts["done"] += 1
                progress.update(counts["passed"], counts["done"])

    map_on_engines(engines, chunks, solve)
    return progress.finish(counts["passed"], counts["done"])


@dataclass
class ChatEvalCache:
    """What evaluate_chat_model keeps between periodic evals: tasks by name, the evaluator, the engines."""
    tasks: dict = field(default_factory=dict)
    evaluator: CategoricalEvaluator | None = None
    engines: list = field(default_factory=list)


def evaluate_chat_model(params, model_cfg: gpt.GPTConfig, tokenizer, mesh, task_names: Sequence[str], *,
                        data_dir=None, max_problems: int | None = None, num_samples: int = 1,
                        max_new_tokens: int = 512, temperature: float = 0.0, top_k: int = 50,
                        batch_size: int = 8, seed: int = 0, cache: ChatEvalCache | None = None) -> dict:
    """{task: accuracy, ..., "ChatCORE" (when every task ran), "ChatCORE_cat"} plus "details"."""
    results, details = {}, {}
    cache = ChatEvalCache() if cache is None else cache
    for runner in ([cache.evaluator] if cache.evaluator else []) + cache.engines:
        runner.set_params(params)
    for name in task_names:
        if name not in cache.tasks:
            cache.tasks[name] = load_task(name, data_dir)
        task = cache.tasks[name]
        if task.eval_type == "categorical":
            if cache.evaluator is None:
                cache.evaluator = CategoricalEvaluator(params, model_cfg, mesh, rows_per_batch=max(batch_size, 8))
            out = run_categorical(task, cache.evaluator, tokenizer, max_problems=max_problems, name=name)
        else:
            if not cache.engines:
                cache.engines = make_engines(params, model_cfg, tokenizer, sharding.local_devices(mesh=mesh))
            out = run_generative(task, cache.engines, tokenizer, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, max_problems=max_problems,
                                 batch_problems=batch_size, seed=seed, name=name)
        results[name], details[name] = out["accuracy"], out
    summary = dict(results)
    if set(ALL_TASKS) <= set(results):
        summary["ChatCORE"] = chatcore({t: results[t] for t in ALL_TASKS})
    cat = [t for t in ("ARC-Easy", "ARC-Challenge", "MMLU") if t in results]
    if cat:
        summary["ChatCORE_cat"] = chatcore({t: results[t] for t in cat})
    summary["details"] = details
    return summary
