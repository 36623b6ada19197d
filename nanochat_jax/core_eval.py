"""CORE: the DCLM in-context-learning benchmark that scores base models (nanochat/core_eval.py, `evaluate_task`).

The bundle's 22 tasks are multiple_choice (lowest mean loss over the choice's tokens wins), schema (lowest mean loss
over the continuation shared by the context options) or language_modeling (right iff greedy argmax reproduces the
continuation); CORE is the mean accuracy centered against each task's random baseline. Prompts, shuffles, shots and
scored spans match nanochat exactly; unlike its one forward per example, each sequence here is a row (tokens,
start, end) that BucketRunner right-pads (harmless for a causal model) into batches of power-of-two length buckets.
Rows past max_len get larger buckets and are scored whole, as nanochat does for its GPT (crop=True crops them); at
sequence_len 2048 that is ~9 in 10 10-shot squad prompts.
"""

from __future__ import annotations

import collections
import csv
import fcntl
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml  # PyYAML, installed with flax/orbax

from nanochat_jax import gpt, sharding
from nanochat_jax.common import DownloadError, atomic_write, download, get_base_dir, pow2_bucket, print0

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337   # random.Random(SHUFFLE_SEED).shuffle(data) before truncating to max_per_task
FEWSHOT_SEED = 1234   # example idx draws its shots with random.Random(FEWSHOT_SEED + idx)

Row = tuple[Sequence[int], int, int]  # (tokens, start, end): score the targets tokens[start:end]
# rows -> per row, the mean cross-entropy (nats) of tokens[start:end] given the tokens before them, and whether the
# argmax reproduces every one of them (an empty span: inf and False). A Scorer is one; tests plug in their own.
ScoreFn = Callable[[Sequence[Row]], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class CoreTask:
    label: str
    dataset_uri: str                   # path under eval_data/
    task_type: str                     # one of TASK_TYPES
    num_fewshot: int = 0
    continuation_delimiter: str = " "
    random_baseline: float = 0.0       # percent (eval_meta_data.csv "Random baseline")


def load_core_tasks(bundle_dir: str | os.PathLike) -> list[CoreTask]:
    """The tasks of core.yaml, in order, each with its random baseline from eval_meta_data.csv."""
    bundle_dir = Path(bundle_dir)
    with open(bundle_dir / "core.yaml", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    with open(bundle_dir / "eval_meta_data.csv", encoding="utf-8", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for t in config["icl_tasks"]:
        label, shots = t["label"], t["num_fewshot"]
        if t["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"{bundle_dir / 'core.yaml'}: task {label!r} has type {t['icl_task_type']!r}; "
                             f"supported types are {TASK_TYPES}")
        if label not in baselines:
            raise ValueError(f"{bundle_dir / 'eval_meta_data.csv'} has no 'Random baseline' for task {label!r}, so "
                             f"its accuracy cannot be centered; is the bundle complete?")
        tasks.append(CoreTask(label=label, dataset_uri=t["dataset_uri"], task_type=t["icl_task_type"],
                              num_fewshot=int(shots[0] if isinstance(shots, list) else shots),
                              continuation_delimiter=t.get("continuation_delimiter", " "),
                              random_baseline=baselines[label]))
    return tasks


def task_data_path(bundle_dir: str | os.PathLike, task: CoreTask) -> Path:
    return Path(bundle_dir) / "eval_data" / task.dataset_uri


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_task_data(bundle_dir: str | os.PathLike, task: CoreTask, max_per_task: int = -1) -> list[dict]:
    return shuffle_and_truncate(_read_jsonl(task_data_path(bundle_dir, task)), max_per_task)


def shuffle_and_truncate(data: list[dict], max_per_task: int = -1) -> list[dict]:
    """Shuffled with random.Random(1337), then the first max_per_task (all if <= 0)."""
    data = list(data)
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def fewshot_indices(n: int, idx: int, k: int) -> list[int]:
    """Indices of example idx's k shots: random.Random(1234 + idx).sample(all indices but idx, k). nanochat fails
    when fewer than k others exist (tiny --max-per-task); we take them all instead."""
    if k <= 0 or n <= 1:
        return []
    # sample() draws positions, so sampling range(n - 1) and skipping idx afterwards picks the same shots as
    # sampling the list of the other indices, without building that list (O(n) per example, O(n²) per task)
    return [i + (i >= idx) for i in random.Random(FEWSHOT_SEED + idx).sample(range(n - 1), min(k, n - 1))]


# Prompts: nanochat's Jinja templates written out (shots end with "\n\n", then the example itself)
def render_prompts_mc(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One prompt per choice: shots "query<delim>gold choice", then "query<delim>choice"."""
    shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One prompt per context option: shots "gold context<delim>continuation", then "option<delim>continuation"."""
    shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{shots}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """[prompt without the continuation (whitespace-stripped), prompt with it]. Contexts are stripped (some carry
    trailing spaces); stripping the first prompt keeps it a clean token prefix of the second."""
    shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{shots}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


RENDERERS: dict[str, Callable[..., list[str]]] = {
    "multiple_choice": render_prompts_mc, "schema": render_prompts_schema, "language_modeling": render_prompts_lm}


def render_prompts(task_type: str, item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    if task_type not in RENDERERS:
        raise ValueError(f"unknown CORE task type {task_type!r}; expected one of {TASK_TYPES}")
    return RENDERERS[task_type](item, delimiter, fewshot)


def find_common_length(seqs: Sequence[Sequence[int]], direction: str = "left") -> int:
    """Length of the common prefix ('left') or suffix ('right') of all sequences."""
    shortest = min(len(s) for s in seqs)
    for i in range(shortest):
        pos = i if direction == "left" else -1 - i
        if any(s[pos] != seqs[0][pos] for s in seqs):
            return i
    return shortest


def example_rows(task_type: str, token_lists: Sequence[Sequence[int]]) -> list[Row]:
    """Rows of one example from its BOS-prepended prompt tokens (in render order). The span: MC, all after the
    choices' common prefix; schema, the options' common suffix; LM, the tokens the continuation adds."""
    if task_type == "multiple_choice":
        start = find_common_length(token_lists, "left")
        return [(t, start, len(t)) for t in token_lists]
    if task_type == "schema":
        suffix = find_common_length(token_lists, "right")
        return [(t, len(t) - suffix, len(t)) for t in token_lists]
    if task_type == "language_modeling":
        without, with_ = token_lists
        start = len(without)
        if list(with_[:start]) != list(without):
            # nanochat asserts here; a tokenizer that merges across the boundary would end the whole eval, so score
            # from where the two diverge instead
            start = find_common_length([without, with_], "left")
        return [(with_, start, len(with_))]
    raise ValueError(f"unknown CORE task type {task_type!r}; expected one of {TASK_TYPES}")


def crop_row(row: Row, max_len: int) -> Row:
    """Keep the last max_len tokens, shifting the span (nanochat's crop for models with a max length). The span
    keeps at least one token of context: its first target needs a prediction from the position before it."""
    tokens, start, end = row
    cut = len(tokens) - max_len
    if cut <= 0:
        return row
    start = max(start - cut, 1)
    return tokens[cut:], start, max(end - cut, start)


def bucket_lengths(max_len: int, min_bucket: int = 64) -> tuple[int, ...]:
    """Powers of two from min_bucket (a power of two) up to max_len, and max_len itself."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if min_bucket < 1 or pow2_bucket(min_bucket) != min_bucket:
        raise ValueError(f"min_bucket must be a power of two, got {min_bucket}")
    out, b = [], min_bucket
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


class BucketRunner:
    """A jitted `fn(params, tokens_BT, *fields_B) -> tuple of per-row outputs` over rows (tokens, *fields), each in the
    smallest bucket that holds it (powers of two from min_bucket, and max_len; longer rows get a new power-of-two
    bucket), right-padded with pad_id, in batches of rows_per_batch(length) sharded over the mesh (padding rows: zero
    fields): one compilation per bucket. Rows stream in with add(); finish() returns every output in row order.
    `traces` counts compilations, `stats` rows, batches and tokens. Every process of a multi-process run must pass
    the same rows (each builds the full global batch)."""

    def __init__(self, fn: Callable, params: Any, mesh=None, *, max_len: int, pad_id: int, min_bucket: int = 64,
                 batch_tokens: int = 16384, place_params: bool = True):
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        self.mesh = mesh if mesh is not None else sharding.make_mesh(1)
        self.max_len, self.pad_id, self.min_bucket = int(max_len), int(pad_id), min_bucket
        self.batch_tokens = int(batch_tokens)
        self.buckets = bucket_lengths(self.max_len, min_bucket)
        self._replicated = sharding.replicated(self.mesh)
        self.traces = 0
        self.stats = {"rows": 0, "batches": 0, "tokens": 0, "padded_tokens": 0}
        self.waiting: dict[int, list[tuple[int, tuple]]] = {}  # rows added, by bucket, not yet dispatched
        self.pending: list = []  # dispatched batches: (row ids, outputs still on device)
        self.n = self.seen = 0  # rows added; leading batches of `pending` already reported by finished_rows()

        def traced(*args):
            self.traces += 1  # Python side effect: runs once per trace, i.e. per compiled shape
            return fn(*args)

        self._fn = jax.jit(traced, out_shardings=self._replicated)
        self.set_params(params, place_params)

    def set_params(self, params, place: bool = True) -> None:
        """New weights, same compiled functions (evals every N training steps)."""
        self.params = jax.device_put(params, self._replicated) if place else params

    def rows_per_batch(self, length: int) -> int:
        """batch_tokens per device in whole rows (at least one), times the device count."""
        return self.mesh.size * max(1, self.batch_tokens // length)

    def prepare(self, row, i: int):
        return row  # row i as it is batched: Scorer crops it and checks its span

    def bucket_for(self, n_tokens: int) -> int:
        length = pow2_bucket(n_tokens, self.min_bucket)
        if n_tokens <= self.max_len < length:
            return self.max_len
        self.buckets = tuple(sorted(set(self.buckets) | {length}))  # past max_len: one more bucket
        return length

    def _put(self, x: np.ndarray):
        return jax.make_array_from_callback(x.shape, sharding.batch_sharding(self.mesh, 0, x.ndim), lambda i: x[i])

    def _dispatch(self, length: int, members: list[tuple[int, tuple]]):
        """One padded batch of this bucket -> (row ids, outputs still on device)."""
        rows_b = self.rows_per_batch(length)
        tokens_BT = np.full((rows_b, length), self.pad_id, np.int32)
        fields = [np.zeros((rows_b, *np.shape(f)), np.int32) for f in members[0][1][1:]]
        for j, (_, (tokens, *row_fields)) in enumerate(members):
            tokens_BT[j, :len(tokens)] = tokens
            for field, value in zip(fields, row_fields):
                field[j] = value
            self.stats["tokens"] += len(tokens)
        self.stats["padded_tokens"] += tokens_BT.size
        self.stats["batches"] += 1
        out = self._fn(self.params, *(self._put(x) for x in (tokens_BT, *fields)))
        return [i for i, _ in members], out

    def add(self, rows: Sequence[tuple]) -> None:
        """Rows wait in their bucket until it holds a full batch, which is dispatched asynchronously."""
        for row in rows:
            row = self.prepare(row, self.n)
            length = self.bucket_for(len(row[0]))
            bucket = self.waiting.setdefault(length, [])
            bucket.append((self.n, row))
            self.n += 1
            if len(bucket) == self.rows_per_batch(length):
                self.pending.append(self._dispatch(length, bucket))
                self.waiting[length] = []

    def finished_rows(self) -> list[int]:
        """Ids of the rows the device has scored since the last call, without waiting (for progress reports)."""
        ids = []
        while self.seen < len(self.pending) and self.pending[self.seen][1][0].is_ready():
            ids += self.pending[self.seen][0]
            self.seen += 1
        return ids

    def finish(self, on_scored: Callable[[list[int]], None] | None = None) -> tuple[np.ndarray, ...] | None:
        """Sends the partial batches; fn's outputs for the rows added since the last finish, in order (None if
        none), and `on_scored(row ids)` for each batch finished_rows() has not reported."""
        for length, bucket in sorted(self.waiting.items()):
            if bucket:
                self.pending.append(self._dispatch(length, bucket))
        results = None
        for k, (ids, out) in enumerate(self.pending):
            results = results or tuple(np.zeros((self.n, *x.shape[1:]), x.dtype) for x in out)
            for result, x in zip(results, out):
                result[ids] = np.asarray(x)[:len(ids)]
            if on_scored is not None and k >= self.seen:
                on_scored(ids)
        self.stats["rows"] += self.n
        self.waiting, self.pending, self.n, self.seen = {}, [], 0, 0
        return results

    def __call__(self, rows: Sequence[tuple]):
        self.add(rows)
        return self.finish()


class Scorer(BucketRunner):
    """A ScoreFn over `logits_fn(params, tokens_BT) -> logits_BTV`: rows past max_len are cropped if crop, else
    scored whole in a larger bucket; padding rows have an empty span."""

    def __init__(self, logits_fn: Callable, params: Any, *, max_len: int, pad_id: int, mesh=None, crop: bool = False,
                 min_bucket: int = 64, batch_tokens: int = 16384, place_params: bool = True):
        self.crop, self._logits_fn = crop, logits_fn
        super().__init__(self._score_batch, params, mesh, max_len=max_len, pad_id=pad_id, min_bucket=min_bucket,
                         batch_tokens=batch_tokens, place_params=place_params)
        self.stats.update(cropped=0, long=0)

    def prepare(self, row: Row, i: int) -> Row:
        tokens, start, end = cropped = crop_row(row, self.max_len) if self.crop else row
        if not 0 <= start <= end <= len(tokens):
            raise ValueError(f"row {i}: span [{start}, {end}) does not fit its {len(tokens)} tokens")
        self.stats["cropped"] += len(tokens) < len(row[0])
        self.stats["long"] += len(row[0]) > self.max_len
        return cropped

    def _score_batch(self, params, tokens_BT, start_B, end_B):
        logits_BTV = self._logits_fn(params, tokens_BT).astype(jnp.float32)
        targets_BT = jnp.roll(tokens_BT, -1, axis=1)  # position t predicts token t+1 (the last column is unused)
        nll_BT = gpt.cross_entropy(logits_BTV, targets_BT, reduction="none")
        hit_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
        pos_T = jnp.arange(tokens_BT.shape[1])
        # targets tokens[start:end] are predicted at positions start-1 .. end-2
        span_BT = (pos_T[None] >= start_B[:, None] - 1) & (pos_T[None] < end_B[:, None] - 1)
        count_B = span_BT.sum(axis=1)
        total_B = jnp.where(span_BT, nll_BT, 0.0).sum(axis=1)
        mean_B = jnp.where(count_B > 0, total_B / jnp.maximum(count_B, 1), jnp.inf)
        correct_B = jnp.all(hit_BT | ~span_BT, axis=1) & (count_B > 0)  # nothing to predict is not a success
        return mean_B, correct_B

    def finish(self, on_scored: Callable[[list[int]], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        return super().finish(on_scored) or (np.zeros(0), np.zeros(0, bool))


def make_model_scorer(params, model_cfg, mesh=None, *, pad_id: int, max_len: int | None = None, crop: bool = False,
                      min_bucket: int = 64, batch_tokens: int = 16384, place_params: bool = True) -> Scorer:
    """A Scorer for gpt.forward; max_len defaults to the model's sequence_len. place_params=False keeps params as
    given (e.g. FSDP-sharded training state) instead of replicating them over the mesh."""
    return Scorer(lambda p, x: gpt.forward(p, x, model_cfg), params, mesh=mesh, pad_id=pad_id,
                  max_len=max_len or model_cfg.sequence_len, crop=crop, min_bucket=min_bucket,
                  batch_tokens=batch_tokens, place_params=place_params)


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """(acc - rb) / (1 - rb) with the baseline rb given in percent."""
    rb = 0.01 * random_baseline
    return (accuracy - rb) / (1.0 - rb)


def prepare_task(tokenizer, data: Sequence[dict], task: CoreTask,
                 indices: Sequence[int] | None = None) -> tuple[list[Row], list[tuple[int, int]]]:
    """Rows of the examples `indices` (default all; shots are drawn from all of `data`) and, per example, its
    (first row, number of rows)."""
    prompts, counts = [], []
    for idx in range(len(data)) if indices is None else indices:
        shots = [data[i] for i in fewshot_indices(len(data), idx, task.num_fewshot)]
        ps = render_prompts(task.task_type, data[idx], task.continuation_delimiter, shots)
        prompts.extend(ps)
        counts.append(len(ps))
    token_lists = tokenizer.encode(prompts, prepend=tokenizer.bos_id) if prompts else []
    rows, spans, offset = [], [], 0
    for count in counts:
        ex_rows = example_rows(task.task_type, token_lists[offset:offset + count])
        spans.append((len(rows), len(ex_rows)))
        rows.extend(ex_rows)
        offset += count
    return rows, spans


class TaskProgress:
    """Examples of one task whose rows have all been scored, logged at most every `every` seconds (10-shot
    HellaSwag would otherwise print nothing for a minute)."""

    def __init__(self, label: str, total: int, log, every: float = 10.0):
        self.label, self.total, self.log, self.every = label, total, log, every
        self.t0 = self.last = time.perf_counter()
        self.owner: list[int] = []  # the example of each row, in row order
        self.left: list[int] = []   # per example: rows not scored yet
        self.done = 0

    def add(self, spans: Sequence[tuple[int, int]]) -> None:
        """The (first row, number of rows) of the next examples, as prepare_task gives them."""
        for _, count in spans:
            self.owner += [len(self.left)] * count
            self.left.append(count)
            self.done += count == 0

    def scored(self, row_ids: Sequence[int]) -> None:
        for i in row_ids:
            e = self.owner[i]
            self.left[e] -= 1
            self.done += self.left[e] == 0
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:  # the task's own line reports the end
            self.last = now
            self.log(f"  {self.label}: {self.done:,}/{self.total:,} examples scored "
                     f"({100 * self.done / max(self.total, 1):.0f}%), {now - self.t0:.0f}s")


def evaluate_task(score_fn: ScoreFn, tokenizer, data: Sequence[dict], task: CoreTask, *,
                  chunk_examples: int = 2048, log=None, progress_every: float = 10.0) -> dict:
    """{"accuracy", "correct" (per example), "examples", "rows", "seconds"} of one task over `data` (shuffled and
    truncated). A Scorer gets the examples chunk by chunk (the device scores one while the host tokenizes the
    next) and progress goes to `log`; any other ScoreFn gets all rows in one call."""
    t0 = time.perf_counter()
    runner = score_fn if isinstance(score_fn, BucketRunner) else None
    progress = TaskProgress(task.label, len(data), log, progress_every) if log and runner is not None else None
    all_rows, spans, n_rows = [], [], 0
    for lo in range(0, len(data), chunk_examples):
        rows, chunk_spans = prepare_task(tokenizer, data, task, range(lo, min(lo + chunk_examples, len(data))))
        spans += [(n_rows + first, count) for first, count in chunk_spans]
        n_rows += len(rows)
        if runner is None:
            all_rows += rows
            continue
        runner.add(rows)
        if progress is not None:
            progress.add(chunk_spans)
            progress.scored(runner.finished_rows())
    if runner is not None:
        mean_loss, all_correct = runner.finish(on_scored=progress.scored if progress is not None else None)
    else:
        mean_loss, all_correct = score_fn(all_rows) if all_rows else (np.zeros(0), np.zeros(0, bool))
    # LM: every token right; else the lowest mean loss wins, ties going to the first option like list.index(min(...))
    lm = task.task_type == "language_modeling"
    correct = [bool(all_correct[first]) if lm else int(np.argmin(mean_loss[first:first + count])) == int(item["gold"])
               for (first, count), item in zip(spans, data)]
    return {"accuracy": float(np.mean(correct)) if correct else 0.0, "correct": correct, "examples": len(correct),
            "rows": n_rows, "seconds": time.perf_counter() - t0}


def evaluate_core(score_fn: ScoreFn, tokenizer, bundle_dir: str | os.PathLike, *, max_per_task: int = -1,
                  tasks: Sequence[str] | None = None, require_all: bool = False, log=print0,
                  progress_every: float = 10.0) -> dict:
    """Every task of the bundle (or the labels in `tasks`), a line per task through `log`. A task whose data file
    is missing is skipped with a warning and CORE is the mean over the tasks present ("missing" lists the others);
    require_all=True makes it an error. Returns {"results", "centered_results" (by label), "core_metric",
    "missing", "num_tasks", "details", "examples", "seconds", "examples_per_second", "compilations"}."""
    bundle_dir = Path(bundle_dir)
    all_tasks = load_core_tasks(bundle_dir)
    if tasks:
        unknown = [t for t in tasks if t not in {task.label for task in all_tasks}]
        if unknown:
            raise ValueError(f"unknown CORE task(s) {unknown}; the bundle has {[t.label for t in all_tasks]}")
        all_tasks = [t for t in all_tasks if t.label in set(tasks)]
    absent = [t for t in all_tasks if not task_data_path(bundle_dir, t).is_file()]
    if absent and require_all:
        raise FileNotFoundError(f"CORE task data missing: {[str(task_data_path(bundle_dir, t)) for t in absent]}. "
                                f"Use a complete eval bundle, or allow a partial CORE over the tasks present "
                                f"(require_all=False / --require-all=0)")
    for task in absent:
        log(f"WARNING: CORE task {task.label!r}: no data file {task_data_path(bundle_dir, task)}; skipping it, so "
            f"CORE is the mean over the {len(all_tasks) - len(absent)} tasks present")
    present, missing = [t for t in all_tasks if t not in absent], [t.label for t in absent]
    if not present:
        raise FileNotFoundError(f"none of the CORE task files exist under {bundle_dir / 'eval_data'}")

    results, centered, details = {}, {}, {}
    cache: dict[str, list[dict]] = {}  # hellaswag is used twice (0- and 10-shot); dropped after its last use
    uses = collections.Counter(t.dataset_uri for t in present)
    traces0 = getattr(score_fn, "traces", None)
    stats0 = dict(getattr(score_fn, "stats", None) or {})
    t_all = time.perf_counter()
    for task in present:
        if task.dataset_uri not in cache:
            cache[task.dataset_uri] = _read_jsonl(task_data_path(bundle_dir, task))
        data = shuffle_and_truncate(cache[task.dataset_uri], max_per_task)
        uses[task.dataset_uri] -= 1
        if not uses[task.dataset_uri]:
            del cache[task.dataset_uri]
        out = evaluate_task(score_fn, tokenizer, data, task, log=log, progress_every=progress_every)
        results[task.label] = out["accuracy"]
        centered[task.label] = centered_accuracy(out["accuracy"], task.random_baseline)
        details[task.label] = {k: out[k] for k in ("examples", "rows", "seconds")}
        log(f"{task.label:<33} {task.num_fewshot:>2}-shot {task.task_type:<17} | n {out['examples']:>6} | "
            f"accuracy {out['accuracy']:.4f} | centered {centered[task.label]:+.4f} | {out['seconds']:6.1f}s | "
            f"{out['examples'] / max(out['seconds'], 1e-9):8.1f} ex/s")
    seconds = time.perf_counter() - t_all
    n_examples = sum(d["examples"] for d in details.values())
    rate = n_examples / max(seconds, 1e-9)
    core = sum(centered.values()) / len(centered)
    compilations = None if traces0 is None else score_fn.traces - traces0
    line = f"CORE {core:.4f} over {len(present)}/{len(all_tasks)} tasks"
    if missing:
        line += f" (missing: {', '.join(missing)}; not comparable to a full CORE)"
    line += f" | {n_examples} examples in {seconds:.1f}s ({rate:.1f} ex/s)"
    if compilations is not None:
        line += f" | {compilations} compilation(s)"
    stats = {k: v - stats0.get(k, 0) for k, v in (getattr(score_fn, "stats", None) or {}).items()}
    if stats.get("padded_tokens"):
        line += (f"; {stats['batches']} batches, {100 * stats['tokens'] / stats['padded_tokens']:.0f}% of padded "
                 f"tokens real, {stats['long']} rows longer than {getattr(score_fn, 'max_len', '?')} tokens "
                 + ("(cropped)" if getattr(score_fn, "crop", False) else "(scored whole)"))
    log(line)
    return {"results": results, "centered_results": centered, "core_metric": core, "missing": missing,
            "num_tasks": len(all_tasks), "details": details, "examples": n_examples, "seconds": seconds,
            "examples_per_second": rate, "compilations": compilations}


def format_core_table(out: dict) -> str:
    lines = [f"{'Task':<35} {'Accuracy':>10} {'Centered':>10}"]
    for label, acc in out["results"].items():
        lines.append(f"{label:<35} {acc:>10.4f} {out['centered_results'][label]:>10.4f}")
    for label in out.get("missing", []):
        lines.append(f"{label:<35} {'missing':>10} {'missing':>10}")
    name = "CORE"
    if out.get("missing"):
        name += f" ({len(out['results'])}/{out.get('num_tasks', '?')} tasks)"
    lines.append(f"{name:<35} {'':>10} {out['core_metric']:>10.4f}")
    return "\n".join(lines)


def write_core_csv(path: str | os.PathLike, out: dict) -> Path:
    """nanochat's base_eval CSV (Task, Accuracy, Centered; last row CORE), written atomically. A missing task gets
    a row with empty values, so a partial CORE is visible in the file."""
    path = Path(path)
    with atomic_write(path, "w") as f:
        f.write(f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n")
        for label, acc in out["results"].items():
            f.write(f"{label:<35}, {acc:<10.6f}, {out['centered_results'][label]:<10.6f}\n")
        for label in out.get("missing", []):
            f.write(f"{label:<35}, {'':<10}, {'':<10}\n")
        f.write(f"{'CORE':<35}, {'':<10}, {out['core_metric']:<10.6f}\n")
    return path


def read_core_csv(path: str | os.PathLike) -> dict[str, tuple[float | None, float | None]]:
    """{task: (accuracy, centered)} from a CORE CSV (ours or nanochat's reference results); empty cells are None."""
    out = {}
    with open(path, encoding="utf-8") as f:
        next(f)
        for line in f:
            if line.strip():
                label, acc, cen = (c.strip() for c in line.split(","))
                out[label] = (float(acc) if acc else None, float(cen) if cen else None)
    return out


def ensure_eval_bundle(eval_bundle: str | os.PathLike | None = None, *, url: str = EVAL_BUNDLE_URL,
                       backoff: float = 2.0) -> Path:
    """`eval_bundle` if given (it must hold core.yaml), else <base dir>/eval_bundle, downloaded and extracted on
    first use under a file lock and moved into place by one rename, so no process sees a half-extracted bundle."""
    if eval_bundle is not None:
        path = Path(eval_bundle).expanduser()
        if not (path / "core.yaml").is_file():
            raise FileNotFoundError(f"--eval-bundle={path}: no core.yaml there; point it at a directory holding "
                                    f"core.yaml, eval_meta_data.csv and eval_data/ (an unzipped eval_bundle.zip)")
        return path
    base = get_base_dir()
    target = base / "eval_bundle"
    if (target / "core.yaml").is_file():
        return target
    with open(base / "eval_bundle.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (target / "core.yaml").is_file():  # another process finished it while we waited
            return target
        with tempfile.TemporaryDirectory(prefix=".eval_bundle.", dir=base) as tmp:
            zip_path = Path(tmp) / "eval_bundle.zip"
            try:
                download(url, zip_path, backoff=backoff)
            except DownloadError as e:
                raise DownloadError(f"{e}; without internet, pass --eval-bundle=<a local eval_bundle dir>") from None
            extracted = Path(tmp) / "x"
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(extracted)
            found = sorted(extracted.rglob("core.yaml"), key=lambda p: len(p.parts))
            if not found:
                raise RuntimeError(f"{url}: the zip has no core.yaml; is it an eval bundle?")
            if target.exists():  # a directory without core.yaml: an earlier, broken attempt
                shutil.rmtree(target)
            os.replace(found[0].parent, target)
    print0(f"placed the eval bundle at {target}")
    return target
