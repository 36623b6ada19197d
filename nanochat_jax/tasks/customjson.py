"""Conversations from JSONL files: CustomJSON (one file, e.g. nanochat's identity conversations) and LocalChat
(shared/data/chat: oasst1, hh-rlhf, GPTeacher), so midtraining/SFT can run offline. A line is a JSON list of
messages (nanochat's identity file) or an object with a "messages" list (shared/data/chat)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from nanochat_jax.common import get_base_dir, print0
from nanochat_jax.tasks.common import (TASK_DATA_ENV, Task, require_file, require_one_of, task_data_dir,
                                       validate_messages)

IDENTITY_CONVERSATIONS_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"


def identity_conversations_path() -> Path:  # where nanochat keeps them
    return get_base_dir() / "identity_conversations.jsonl"


def read_conversations(path: str | os.PathLike) -> list[list[dict]]:
    """Every conversation (a list of messages) in a JSONL file, validated."""
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            messages = item.get("messages") if isinstance(item, dict) else item
            validate_messages(messages, f"{path} line {lineno}")
            conversations.append(messages)
    return conversations


class _Conversations(Task):
    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": self.conversations[index]}


class CustomJSON(_Conversations):
    """All conversations of one JSONL file, in file order (no shuffle, as in nanochat)."""

    def __init__(self, filepath: str | os.PathLike, missing_ok: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filepath = Path(filepath)
        if self.filepath.is_file():
            self.conversations = read_conversations(self.filepath)
        elif missing_ok:  # nanochat's behaviour: warn and carry on with nothing
            print0(f"Warning: {self.filepath} does not exist; CustomJSON is empty")
            self.conversations = []
        else:
            raise FileNotFoundError(
                f"{self.filepath} does not exist. For the identity conversations: curl -L -o {self.filepath} "
                f"{IDENTITY_CONVERSATIONS_URL} (or pass missing_ok=True to go on without them)")


# name -> file under <task data>/chat
CHAT_SOURCES = {
    "oasst1": "oasst1_en/oasst1_en_validation_top1.jsonl",  # 188, multi-turn, human-written
    "hh_rlhf": "hh_rlhf_harmless_base/test_chosen_messages.jsonl",  # 2,312, red-teaming with harmless replies
    "gpteacher_roleplay": "gpteacher/roleplay-simple-deduped-roleplay-instruct.messages.jsonl",  # 1,923
    "gpteacher_codegen": "gpteacher/codegen-instruct.messages.jsonl",  # 4,535
}


class LocalChat(_Conversations):
    """The chat conversations of the local task-data folder, a stand-in for SmolTalk offline. The rows of
    `sources` (names from CHAT_SOURCES, or "all"), in that order, are shuffled with default_rng(seed); the first
    ceil(test_fraction * n) are split "test", the rest "train" ("all" keeps every row)."""

    def __init__(self, split: str = "train", sources: str | Sequence[str] = "all", data_dir=None,
                 test_fraction: float = 0.05, seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        names = list(CHAT_SOURCES) if sources == "all" else [sources] if isinstance(sources, str) else list(sources)
        unknown = [n for n in names if n not in CHAT_SOURCES]
        if unknown or not names:
            raise ValueError(f"unknown chat sources {unknown}; choose from {sorted(CHAT_SOURCES)} or 'all'")
        require_one_of("LocalChat split", split, ("train", "test", "all"))
        if not 0 <= test_fraction < 1:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        root = task_data_dir(data_dir)
        if root is None:
            raise FileNotFoundError(f"LocalChat needs the local task-data folder: set ${TASK_DATA_ENV} or pass "
                                    f"data_dir= (a folder with chat/{next(iter(CHAT_SOURCES.values()))} etc.)")
        conversations = []
        for name in names:
            conversations += read_conversations(require_file(root, "chat", CHAT_SOURCES[name]))
        order = np.random.default_rng(seed).permutation(len(conversations))
        n_test = math.ceil(test_fraction * len(conversations))
        order = {"train": order[n_test:], "test": order[:n_test], "all": order}[split]
        self.conversations = [conversations[i] for i in order]
        self.sources, self.split = names, split
