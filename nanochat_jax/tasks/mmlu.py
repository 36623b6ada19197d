"""MMLU multiple choice (57 subjects). HF cais/mmlu, subset "all", splits test/validation/dev/auxiliary_train.
Locally the hendrycks CSV release: mmlu/{test,val,dev}/<subject>_<split>.csv (no header; question, A, B, C, D,
answer letter) read in subject order, which is the row order of HF's "all" config; auxiliary_train comes from
mmlu/auxiliary_train_partial/*.csv (only 11,008 of the 99,842 rows: race.csv and arc_hard.csv are missing)."""

from __future__ import annotations

import csv
from pathlib import Path

from nanochat_jax.common import print0
from nanochat_jax.tasks.common import MultipleChoice, load_hub_dataset, render_mc, require_one_of

LETTERS = ("A", "B", "C", "D")
_LOCAL_FOLDERS = {"test": "test", "validation": "val", "dev": "dev"}


def _read_csv(path: Path, subject: str) -> list[dict]:
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f)):
            if len(row) != 6 or row[5] not in LETTERS:
                raise ValueError(f"{path} row {i}: expected question, A, B, C, D, answer letter; got {row!r:.200}")
            out.append({"question": row[0], "subject": subject, "choices": row[1:5], "answer": LETTERS.index(row[5])})
    return out


def read_local(root: Path, subset: str, split: str) -> list[dict]:
    if split == "auxiliary_train":
        folder = root / "mmlu" / "auxiliary_train_partial"
        files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
        if not files:
            raise FileNotFoundError(f"no CSV files in {folder}")
        print0(f"MMLU auxiliary_train: using the partial local copy in {folder} ({len(files)} files)")
        return [row for path in files for row in _read_csv(path, "")]
    folder = root / "mmlu" / _LOCAL_FOLDERS[split]
    suffix = f"_{_LOCAL_FOLDERS[split]}.csv"
    files = {p.name[:-len(suffix)]: p for p in folder.glob(f"*{suffix}")} if folder.is_dir() else {}
    if not files:
        raise FileNotFoundError(f"no *{suffix} files in {folder}")
    return [row for subject in sorted(files) for row in _read_csv(files[subject], subject)]


class MMLU(MultipleChoice):
    """Letters A-D. subset "all" (current nanochat) with split test|validation|dev|auxiliary_train;
    the older spelling subset="auxiliary_train", split="train" means the same auxiliary_train rows."""

    letters = LETTERS

    def __init__(self, subset: str = "all", split: str = "test", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset == "auxiliary_train" and split == "train":
            subset, split = "all", "auxiliary_train"
        if subset != "all":
            raise ValueError(f"MMLU subset must be 'all' (or 'auxiliary_train' with split 'train'), got {subset!r}")
        require_one_of("MMLU split", split, ("test", "validation", "dev", "auxiliary_train"))
        self.subset, self.split = subset, split
        self.ds = load_hub_dataset("cais/mmlu", subset, split, data_dir=data_dir, local=read_local).shuffle(seed=42)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        if "train" in row and "question" not in row:  # the HF auxiliary_train config wraps each row
            row = row["train"]
        if len(row["choices"]) != 4:
            raise ValueError(f"MMLU row {index}: expected 4 choices, got {len(row['choices'])}")
        return {
            "messages": [{"role": "user", "content": render_mc(row["question"], self.letters, row["choices"])},
                         {"role": "assistant", "content": self.letters[row["answer"]]}],
            "subject": row["subject"],
            "letters": self.letters,
        }
