"""ARC (AI2 Reasoning Challenge) multiple choice: ARC-Easy / ARC-Challenge, splits train/validation/test.
HF allenai/ai2_arc; locally arc/<subset>-<split>.jsonl in the same schema."""

from __future__ import annotations

from nanochat_jax.tasks.common import MultipleChoice, load_hub_dataset, render_mc, require_one_of


class ARC(MultipleChoice):
    """`letters` holds this question's labels (mostly A-D, sometimes 1-4 or 3/5 choices)."""

    def __init__(self, subset: str, split: str, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        require_one_of("ARC subset", subset, ("ARC-Easy", "ARC-Challenge"))
        require_one_of("ARC split", split, ("train", "validation", "test"))
        self.subset, self.split = subset, split
        self.ds = load_hub_dataset("allenai/ai2_arc", subset, split, data_dir=data_dir,
                                   local=f"arc/{subset}-{split}.jsonl").shuffle(seed=42)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        letters, choices, answer = row["choices"]["label"], row["choices"]["text"], row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC row {row.get('id')}: answer {answer!r} is not one of its labels {letters}")
        return {
            "messages": [{"role": "user", "content": render_mc(row["question"], letters, choices)},
                         {"role": "assistant", "content": answer}],
            "letters": letters,  # categorical eval compares only these letters' logits
        }
