"""Chat evaluations: categorical (ARC, MMLU: letter logits) and generative (GSM8K, HumanEval, SpellingBee: sample,
then grade), and ChatCORE, measured the way nanochat measures them (scripts/chat_eval.py, `run_chat_eval`).

Categorical: each prompt is `render_for_completion` (ending in <|assistant_start|>); the answer is the argmax of the
logits at that last position restricted to the allowed letters' token ids. Prompts are right-padded into
power-of-two length buckets with a fixed row count (a multiple of the mesh size), so a whole eval compiles once per
bucket; rows are sharded over the mesh and only the (rows, letters) logits come back to the host.

Generative: one Engine per local device, each in its own thread taking batches of problems (JAX releases the GIL
while a device computes, so N devices sample N batches at once). A problem passes if any of its `num_samples`
completions passes (pass@k). With several processes, process p takes problems p, p + P, ... and the counts are
summed over processes.

ChatCORE = mean over tasks of (acc − baseline) / (1 − baseline): baseline 0.25 for the 4-way multiple choice tasks
(ARC-Easy, ARC-Challenge, MMLU), 0 for the generative ones.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import gpt, sharding
from nanochat_jax.common import pow2_bucket
from nanochat_jax.engine import make_engines, map_on_engines

ALL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}
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
    """A live `task: passed/done (acc) of total` line on process 0: rewritten in place on a terminal, and one line
    per tenth of the problems when stdout is a log file."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.t0 = name, total, time.perf_counter()
        self.live = jax.process_index() == 0 and sys.stdout.isatty()
        self.every = max(1, total // 10)

    def update(self, passed: int, done: int, final: bool = False) -> None:
        if jax.process_index() != 0 or not (self.live or final or done % self.every == 0):
            return
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        line = (f"{self.name}: {passed}/{done} ({100 * passed / max(done, 1):.2f}%) of {self.total} | "
                f"{rate:.1f} problems/s")
        print(("\r" if self.live else "") + line, end="\n" if final or not self.live else "", flush=True)


class CategoricalEvaluator:
    """Letter-logit scoring of prompts on a mesh; one jitted function, compiled once per length bucket."""

    def __init__(self, params, model_cfg: gpt.GPTConfig, mesh, *, rows_per_batch: int = 32):
        self.cfg, self.mesh = model_cfg, mesh
        self.rows = max(mesh.size, -(-rows_per_batch // mesh.size) * mesh.size)
        rep, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        rows1 = sharding.batch_sharding(mesh, ndim=1)
        self.set_params(params)

        def letter_logits(params, idx_BT, last_B, letters_BL):
            logits_BTV = gpt.forward(params, idx_BT, model_cfg)
            at_last_BV = jnp.take_along_axis(logits_BTV, last_B[:, None, None], axis=1)[:, 0]
            picked_BL = jnp.take_along_axis(at_last_BV, jnp.maximum(letters_BL, 0), axis=1)
            return jnp.where(letters_BL >= 0, picked_BL, -jnp.inf)

        self.fn = jax.jit(letter_logits, in_shardings=(rep, rows, rows1, rows), out_shardings=rep)
        self.shapes_seen: set[int] = set()

    def set_params(self, params) -> None:
        self.params = jax.device_put(params, sharding.replicated(self.mesh))

    def predict(self, prompts: Sequence[Sequence[int]], letter_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Index (into each prompt's letters) of the highest-logit letter, for every prompt."""
        order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths share a bucket
        out = np.zeros(len(prompts), np.int64)
        for s in range(0, len(order), self.rows):
            chunk = order[s:s + self.rows]
            T = pow2_bucket(max(len(prompts[i]) for i in chunk), 64)
            self.shapes_seen.add(T)
            idx = np.zeros((self.rows, T), np.int32)
            last = np.zeros(self.rows, np.int32)
            letters = np.full((self.rows, MAX_LETTERS), -1, np.int32)
            for r, i in enumerate(chunk):
                idx[r, :len(prompts[i])] = prompts[i]
                last[r] = len(prompts[i]) - 1
                letters[r, :len(letter_ids[i])] = letter_ids[i]
            scores = np.asarray(self.fn(self.params, idx, last, letters))
            out[chunk] = scores[:len(chunk)].argmax(-1)
        return out


def letter_token_ids(tokenizer, letters: Sequence[str]) -> list[int]:
    ids = []
    for letter in letters:
        enc = tokenizer.encode(letter)
        if len(enc) != 1:
            raise ValueError(f"the answer letter {letter!r} is {len(enc)} tokens with this tokenizer; categorical "
                             f"evaluation needs single-token letters (train the tokenizer on more text)")
        ids.append(enc[0])
    return ids


def run_categorical(task, evaluator: CategoricalEvaluator, tokenizer, *, max_problems: int | None = None,
                    name: str = "task") -> dict:
    n = len(task) if max_problems is None else min(len(task), max_problems)
    mine = list(range(jax.process_index(), n, jax.process_count()))
    convs = [task[i] for i in mine]
    prompts = [tokenizer.render_for_completion(c) for c in convs]
    letters = [c["letters"] for c in convs]
    t0 = time.perf_counter()
    pred = evaluator.predict(prompts, [letter_token_ids(tokenizer, ls) for ls in letters])
    passed = sum(int(task.evaluate(c, ls[p])) for c, ls, p in zip(convs, letters, pred))
    passed, total = (int(v) for v in sharding.process_sum(np.array([passed, len(mine)])))
    _Progress(name, n).update(passed, total, final=True)
    return {"accuracy": passed / max(total, 1), "passed": passed, "total": total, "seconds": time.perf_counter() - t0}


def run_generative(task, engines: Sequence, tokenizer, *, num_samples: int = 1, max_new_tokens: int = 512,
                   temperature: float = 0.0, top_k: int = 50, max_problems: int | None = None,
                   batch_problems: int = 8, seed: int = 0, name: str = "task",
                   on_progress: Callable[[int, int], None] | None = None) -> dict:
    """pass@num_samples over the task's problems, sampled by `engines` in parallel threads."""
    n = len(task) if max_problems is None else min(len(task), max_problems)
    mine = list(range(jax.process_index(), n, jax.process_count()))
    chunks = [mine[s:s + batch_problems] for s in range(0, len(mine), batch_problems)]
    lock = threading.Lock()
    counts = {"passed": 0, "done": 0}
    progress = _Progress(name, n)
    t0 = time.perf_counter()

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
                if on_progress:
                    on_progress(counts["passed"], counts["done"])

    map_on_engines(engines, chunks, solve)
    passed, total = (int(v) for v in sharding.process_sum(np.array([counts["passed"], counts["done"]])))
    progress.update(passed, total, final=True)
    return {"accuracy": passed / max(total, 1), "passed": passed, "total": total, "seconds": time.perf_counter() - t0}


@dataclass
class ChatEvalCache:
    """What evaluate_chat_model keeps between calls (periodic evals during training): the loaded tasks by name,
    the categorical evaluator and the engines (with their compilations)."""
    tasks: dict = field(default_factory=dict)
    evaluator: CategoricalEvaluator | None = None
    engines: list = field(default_factory=list)


def evaluate_chat_model(params, model_cfg: gpt.GPTConfig, tokenizer, mesh, task_names: Sequence[str], *,
                        data_dir=None, max_problems: int | None = None, num_samples: int = 1,
                        max_new_tokens: int = 512, temperature: float = 0.0, top_k: int = 50,
                        batch_size: int = 8, seed: int = 0, tasks: dict | None = None,
                        cache: ChatEvalCache | None = None) -> dict:
    """{task: accuracy, ..., "ChatCORE": ... (when every task ran)} plus "details". tasks: already-loaded tasks by
    name (else loaded here)."""
    results, details = {}, {}
    cache = ChatEvalCache() if cache is None else cache
    cache.tasks.update({k: v for k, v in (tasks or {}).items() if k not in cache.tasks})
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
                mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
                cache.engines = make_engines(params, model_cfg, tokenizer, mine)
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
