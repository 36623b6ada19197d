"""HumanEval: 164 Python functions to complete, graded by running their unit tests in the sandbox.
HF openai/openai_humaneval; locally humaneval/HumanEval.jsonl.gz (same rows and order)."""

from __future__ import annotations

import ast
import re

from nanochat_jax.execution import execute_code
from nanochat_jax.tasks.common import Task, load_hub_dataset

_CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The prompt's module-level import statements, so a completion that only repeats the function body still
    sees them (HumanEval prompts import e.g. `from typing import List` before the signature)."""
    # prompts end mid-function (a docstring, no body), so then parse the lines before the first def
    for source in (prompt, prompt.split("\ndef ", 1)[0]):
        try:
            body = ast.parse(source).body
        except SyntaxError:
            continue
        return "\n".join(ast.unparse(node) for node in body if isinstance(node, (ast.Import, ast.ImportFrom)))
    return ""


def extract_program(completion: str) -> str:
    """The first ``` or ```python block of a completion, else the whole completion (stripped)."""
    blocks = _CODE_BLOCK_RE.findall(completion)
    return (blocks[0] if blocks else completion).strip()


def build_program(conversation: dict, completion: str) -> str:
    """imports of the prompt + the completion's code + the tests + check(entry_point), as nanochat runs it."""
    imports = extract_imports(conversation["messages"][0]["content"])
    return (f"{imports}\n\n{extract_program(completion)}\n\n{conversation['test']}\n"
            f"check({conversation['entry_point']})")


class HumanEval(Task):
    """Generative. The user message is the prompt (signature + docstring); the reference reply is prompt +
    canonical solution. evaluate() runs the completion against the tests with execute_code."""

    kind = "generative"

    def __init__(self, data_dir=None, timeout_s: float = 5.0, memory_mb: int | None = 256, **kwargs):
        super().__init__(**kwargs)
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        # HF's parquet export names this dataset's single config "openai_humaneval"
        self.ds = load_hub_dataset("openai/openai_humaneval", "openai_humaneval", "test", data_dir=data_dir,
                                   local="humaneval/HumanEval.jsonl.gz").shuffle(seed=42)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        return {
            "messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"}],
            "entry_point": row["entry_point"],
            "test": row["test"],
            "task_id": row["task_id"],
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        program = build_program(conversation, completion)
        return execute_code(program, timeout_s=self.timeout_s, memory_mb=self.memory_mb).success
