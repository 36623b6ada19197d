"""Task base class, mixtures, and where task data comes from (nanochat's tasks/common.py).

A Task is a list of conversations, `task[i] -> {"messages": [...], ...extra keys}`, plus how to grade a model's
answer (`eval_type`, `evaluate`); start/stop/step view a slice, as in nanochat. Data comes from a local folder in
the layout of shared/data (`data_dir=` or $NANOCHAT_JAX_TASK_DATA), else the HuggingFace parquet export, cached
under <base dir>/task_data (manifest.json written last, so a cache with one is complete). Tasks shuffle the rows
with np.random.default_rng(42).permutation, the order of HF `datasets.shuffle(seed=42)` that nanochat uses.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from nanochat_jax.common import DownloadError, atomic_write, download, get_base_dir, print0

TASK_DATA_ENV = "NANOCHAT_JAX_TASK_DATA"
HF_ENDPOINT_ENV = "HF_ENDPOINT"  # the usual HuggingFace variable, e.g. for a mirror
DOWNLOAD_ATTEMPTS = 3
RETRY = dict(attempts=DOWNLOAD_ATTEMPTS, backoff=1.5)  # 1.5 s, then 2.25 s apart: offline fails fast


class Task:
    """A dataset of conversations, optionally viewed as [start:stop:step] of the underlying examples."""

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"a task slice needs 0 <= start <= stop and step >= 1, got {start}:{stop}:{step}")
        self.start, self.stop, self.step = start, stop, step

    kind: str | None = None  # eval_type; None: a training-only task

    @property
    def eval_type(self) -> str:
        """'categorical' (score the answer letter's logits) or 'generative' (sample, then evaluate)."""
        if self.kind is None:
            raise NotImplementedError(f"{type(self).__name__} is a training-only task: it has no eval_type")
        return self.kind

    def num_examples(self) -> int:
        return len(self.ds)  # the dataset rows most tasks keep in self.ds

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str):
        raise NotImplementedError(f"{type(self).__name__} has no evaluate()")

    def reward(self, conversation: dict, completion: str) -> float:  # RL's reward: the evaluation as a float
        return float(self.evaluate(conversation, completion))

    def __len__(self) -> int:
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, -(-(stop - self.start) // self.step))  # ceil division

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"task index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        return self.get_example(self.start + int(index) * self.step)  # IndexError also ends `for x in task`


class TaskSequence(Task):
    """Tasks one after another, unshuffled (a curriculum). An item (task, n) is the task n times in a row (n epochs
    of it), as nanochat lists it n times."""

    def __init__(self, tasks: Sequence, **kwargs):
        super().__init__(**kwargs)
        self.tasks = []
        for item in tasks:
            task, repeats = item if isinstance(item, tuple) else (item, 1)
            if int(repeats) != repeats or repeats < 0:
                raise ValueError(f"repeat count must be an int >= 0, got {repeats!r}")
            self.tasks += [task] * int(repeats)
        self.offsets = np.cumsum([0] + [len(t) for t in self.tasks])

    def num_examples(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(task number, index within that task) of example `index` (before any slicing)."""
        task_idx = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return task_idx, index - int(self.offsets[task_idx])

    def get_example(self, index: int) -> dict:
        task_idx, local = self.locate(index)
        return self.tasks[task_idx][local]


class TaskMixture(TaskSequence):
    """All examples of the tasks in one deterministic shuffle (random.Random(42) over every (task, index)); a task
    passed twice is the same as (task, 2), as in nanochat."""

    def __init__(self, tasks: Sequence, seed: int = 42, **kwargs):
        super().__init__(tasks, **kwargs)
        # nanochat shuffles a list of (task_idx, local_idx) pairs; shuffle() only looks at the length, so shuffling
        # flat indices gives the same permutation in a fraction of the memory.
        order = list(range(self.num_examples()))
        random.Random(seed).shuffle(order)
        self.order = np.asarray(order, dtype=np.int64)

    def locate(self, index: int) -> tuple[int, int]:
        return super().locate(int(self.order[index]))


def require_one_of(what: str, value, options: Sequence) -> None:
    if value not in options:
        raise ValueError(f"{what} must be one of {tuple(options)}, got {value!r}")


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """nanochat's multiple-choice prompt. The letter comes after its choice and with no space before it ("=A"),
    because the answer is the bare token "A" and " A" would be a different token."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


class MultipleChoice(Task):
    """Categorical: the assistant answers with the bare letter, one of the example's `letters`."""

    kind = "categorical"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        letters = conversation["letters"]
        if completion not in letters:
            raise ValueError(f"{type(self).__name__}: the answer must be one of the letters {list(letters)}, got "
                             f"{completion!r} (categorical evaluation picks among the allowed letters' logits)")
        return completion == conversation["messages"][-1]["content"]


def validate_messages(messages, where: str) -> None:
    """Roles alternate user/assistant starting with user (after an optional system message); contents are str;
    there is at least one user and one assistant message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list, got {type(messages).__name__}")
    rest = messages[1:] if isinstance(messages[0], dict) and messages[0].get("role") == "system" else messages
    if len(rest) < 2:
        raise ValueError(f"{where}: a conversation needs at least a user and an assistant message, got {len(rest)}")
    for i, m in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != expected:
            raise ValueError(f"{where}: message {i} should have role {expected!r}, got {m!r:.100}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} content must be a str, got {type(m.get('content')).__name__}")


class Rows:
    """Dataset rows (a pyarrow Table, read lazily, or a list of dicts) seen through an optional permutation."""

    def __init__(self, data, permutation: np.ndarray | None = None):
        self.data, self.permutation = data, permutation

    def __len__(self) -> int:
        return len(self.data) if isinstance(self.data, list) else self.data.num_rows

    def shuffle(self, seed: int) -> "Rows":
        """np.random.default_rng(seed).permutation: the order HF datasets' .shuffle(seed=seed) gives."""
        return Rows(self.data, np.random.default_rng(seed).permutation(len(self)))

    def __getitem__(self, index: int) -> dict:
        i = int(index if self.permutation is None else self.permutation[index])
        if isinstance(self.data, list):
            return self.data[i]
        return {name: self.data.column(name)[i].as_py() for name in self.data.column_names}


def task_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local task-data folder: `data_dir`, else $NANOCHAT_JAX_TASK_DATA, else None (use HuggingFace)."""
    value = data_dir if data_dir else os.environ.get(TASK_DATA_ENV)
    return Path(value).expanduser() if value else None


def require_file(root: Path, *parts: str) -> Path:
    path = root.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected the shared/data layout under {root})")
    return path


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_hub_dataset(repo_id: str, subset: str = "default", split: str = "train", *, data_dir=None,
                     local: str | Callable[[Path, str, str], list] | None = None) -> Rows:
    """Rows of an HF dataset (HF schema): from the local task-data folder if it has them (`local`: the JSONL file
    there, or a reader(folder, subset, split)), else from the HF parquet export (cached in <base dir>/task_data)."""
    root = task_data_dir(data_dir)
    local_error = None
    if root is not None and local is not None:
        try:
            return Rows(local(root, subset, split) if callable(local) else read_jsonl(require_file(root, local)))
        except FileNotFoundError as e:
            local_error = e
    try:
        return Rows(_read_parquet_export(repo_id, subset, split))
    except DownloadError as e:
        where = (f"The local task-data folder {root} does not have it ({local_error}). " if local_error else
                 f"No local task-data folder has it (${TASK_DATA_ENV} is {'unset' if root is None else root}). ")
        raise DownloadError(
            f"{repo_id} ({subset}/{split}) is unavailable. {where}Downloading from HuggingFace failed: {e}. Fix: "
            f"set ${TASK_DATA_ENV} (or data_dir=) to a folder in the shared/data layout that has it, or go online "
            f"once (or set ${HF_ENDPOINT_ENV} to a mirror) to fill the cache "
            f"{_export_dir(repo_id, subset, split)}") from None


def _export_dir(repo_id: str, subset: str, split: str) -> Path:
    return get_base_dir() / "task_data" / repo_id.replace("/", "--") / subset / split


def _read_parquet_export(repo_id: str, subset: str, split: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = _export_dir(repo_id, subset, split)
    manifest = out / "manifest.json"
    if not manifest.is_file():
        endpoint = os.environ.get(HF_ENDPOINT_ENV, "https://huggingface.co").rstrip("/")
        listing = download(f"{endpoint}/api/datasets/{repo_id}/parquet/{subset}/{split}", out / "listing.json", **RETRY)
        urls = json.loads(listing.read_text())
        if not isinstance(urls, list) or not urls:
            raise DownloadError(f"the parquet listing of {repo_id} {subset}/{split} is empty or malformed: "
                                f"{urls!r:.200}")
        names = [f"{i:05d}.parquet" for i in range(len(urls))]
        for url, name in zip(urls, names):
            print0(f"Downloading {url} -> {out / name}")
            download(url, out / name, **RETRY)
        with atomic_write(manifest, "w") as f:  # last: its presence means every shard is complete
            json.dump(names, f)
    names = json.loads(manifest.read_text())
    return pa.concat_tables([pq.read_table(out / name) for name in names])


def fetch_file(url: str, filename: str) -> Path:
    """<base dir>/<filename>, downloaded from `url` the first time (nanochat's download_file_with_lock)."""
    path = get_base_dir() / filename
    if not path.is_file():
        print0(f"Downloading {url} -> {path}")
        download(url, path, **RETRY)
    return path


HASH_ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_hash_answer(completion: str) -> str | None:
    """The number after '#### ' (GSM8K's convention), commas removed as its grader does; None when absent."""
    match = HASH_ANSWER_RE.search(completion)
    return match.group(1).strip().replace(",", "") if match else None
