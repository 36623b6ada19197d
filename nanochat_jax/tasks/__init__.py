"""Chat tasks: conversations to train on and to evaluate (nanochat's tasks/). See common.py for the Task interface
and where the data comes from (a local folder via $NANOCHAT_JAX_TASK_DATA, else the HuggingFace parquet export)."""

from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.common import (TASK_DATA_ENV, DownloadError, Task, TaskMixture, TaskSequence,
                                       extract_hash_answer, load_hub_dataset, render_mc, task_data_dir)
from nanochat_jax.tasks.customjson import CHAT_SOURCES, CustomJSON, LocalChat, identity_conversations_path
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.humaneval import HumanEval
from nanochat_jax.tasks.mmlu import MMLU
from nanochat_jax.tasks.smoltalk import SmolTalk
from nanochat_jax.tasks.spellingbee import SimpleSpelling, SpellingBee

__all__ = ["ARC", "CHAT_SOURCES", "CustomJSON", "DownloadError", "GSM8K", "HumanEval", "LocalChat", "MMLU",
           "SimpleSpelling", "SmolTalk", "SpellingBee", "TASK_DATA_ENV", "Task", "TaskMixture", "TaskSequence",
           "extract_hash_answer", "identity_conversations_path", "load_hub_dataset", "render_mc", "task_data_dir"]
