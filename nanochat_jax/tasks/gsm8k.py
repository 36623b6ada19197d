"""GSM8K grade-school math with calculator tool use (nanochat's tasks/gsm8k.py). HF openai/gsm8k (subset
main|socratic, split train|test); locally gsm8k/<split>.jsonl (main) and gsm8k/<split>_socratic.jsonl. The answer
is the number after '#### '."""

from __future__ import annotations

import re

from nanochat_jax.tasks.common import Task, extract_hash_answer, load_hub_dataset, require_one_of

_CALC_RE = re.compile(r"(<<[^>]+>>)")


def answer_to_parts(answer: str) -> list[dict]:
    """A solution as assistant parts, split as nanochat does: each <<expr=result>> calculator step becomes a python
    part (expr, trained on) and a python_output part (result, written by the tool, not trained on)."""
    parts = []
    for piece in _CALC_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        else:
            parts.append({"type": "text", "text": piece})  # may be "" (nanochat keeps those too)
    return parts


class GSM8K(Task):
    kind = "generative"

    def __init__(self, subset: str = "main", split: str = "test", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        require_one_of("GSM8K subset", subset, ("main", "socratic"))
        require_one_of("GSM8K split", split, ("train", "test"))
        self.subset, self.split = subset, split
        local = f"gsm8k/{split}.jsonl" if subset == "main" else f"gsm8k/{split}_socratic.jsonl"
        self.ds = load_hub_dataset("openai/gsm8k", subset, split, data_dir=data_dir, local=local).shuffle(seed=42)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": answer_to_parts(row["answer"])}]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the '#### number' in the completion equals the reference's (as strings, commas removed), else 0."""
        last = conversation["messages"][-1]
        if last["role"] != "assistant" or not isinstance(last["content"], list):
            raise ValueError("the conversation's last message must be the assistant's reference solution, as a "
                             "list of parts")
        return int(extract_hash_answer(last["content"][-1]["text"]) == extract_hash_answer(completion))
