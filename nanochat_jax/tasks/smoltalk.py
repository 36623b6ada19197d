"""SmolTalk: general chat conversations, HF HuggingFaceTB/smol-smoltalk (train 460K rows, test 24K).
Only from HuggingFace (or its cache): no copy is in shared/data. Offline, use LocalChat (customjson.py) instead."""

from __future__ import annotations

from nanochat_jax.tasks.common import DownloadError, Task, load_hub_dataset, require_one_of, validate_messages


class SmolTalk(Task):
    """Training conversations (no evaluate). A leading system message is kept; render_conversation merges it."""

    def __init__(self, split: str = "train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        require_one_of("SmolTalk split", split, ("train", "test"))
        self.split = split
        try:
            self.ds = load_hub_dataset("HuggingFaceTB/smol-smoltalk", "default", split, data_dir=data_dir)
        except DownloadError as e:
            raise DownloadError(f"{e}. Offline, train on LocalChat(split) (the chat/ conversations of the local "
                                f"task-data folder) instead of SmolTalk") from None
        self.ds = self.ds.shuffle(seed=42)

    def get_example(self, index: int) -> dict:
        messages = self.ds[index]["messages"]
        validate_messages(messages, f"SmolTalk {self.split} row {index}")
        return {"messages": messages}
