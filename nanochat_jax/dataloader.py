"""Pretraining batches: parquet row groups → tokens → BOS-aligned best-fit packing → (B, T) inputs/targets.

    RowGroupTokenizer  this process's row groups (strided over processes), tokenized with BOS prepended
    BestFitPacker      rows of T+1 tokens, each starting with BOS: repeatedly take the largest whole doc that fits;
                       when none fits, crop the shortest to fill the row (current nanochat's packing: no padding,
                       ~35% of tokens cropped at T=2048). grain's packers pad or split instead, so this one is ours;
                       grain's ThreadPrefetchDatasetIterator runs each stage ahead in a background thread.

Resume is exact: the state (JSON) holds the upstream position and the (file, row group, row) of each doc still in
the packer's buffer, re-read and re-tokenized on restore, so a loader restored from the state taken after k
batches yields batch k+1 bit for bit. No JAX here (numpy, pyarrow, grain): the caller puts batches on devices.
A tokenizer is anything with `bos_id` and `encode` (conversations: `render_conversation`), e.g. tokenizer.Tokenizer.
"""

from __future__ import annotations

import bisect
import gc
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from nanochat_jax.dataset import list_parquet_files, open_shard, read_shard_texts, resolve_data_dir, split_files


def row_group_plan(files: Sequence[Path], process_index: int = 0, process_count: int = 1) -> list[tuple[int, int]]:
    """(file index, row group) pairs reader p of W reads, in order: in each file, row groups p, p+W, p+2W, ...
    With fewer row groups than readers, reader p gets row group p mod (total): data repeats rather than run dry."""
    if not files:
        raise ValueError("no parquet files to read")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    plan = []
    for fi, path in enumerate(files):
        n_rg = open_shard(path).metadata.num_row_groups  # also checks every file opens and has `text`
        plan.extend((fi, rg) for rg in range(process_index, n_rg, process_count))
    if not plan:  # fewer row groups than readers (tiny data, e.g. a one-row-group val file): share one
        everything = row_group_plan(files, 0, 1)
        plan = [everything[process_index % len(everything)]]
    return plan


class RowGroupTokenizer:
    """Yields (file index, row group, [BOS + tokens of each doc]) over the plan, forever (epochs)."""

    def __init__(self, files: Sequence[Path], plan: list[tuple[int, int]], tokenizer, num_threads: int = 4):
        self.files, self.plan, self.tokenizer, self.num_threads = list(files), plan, tokenizer, num_threads
        self.epoch, self.index = 0, 0
        self._open: dict[int, object] = {}

    def read_texts(self, fi: int, rg: int) -> list[str]:
        if fi not in self._open:
            self._open = {fi: open_shard(self.files[fi])}  # keep one file open at a time
        return read_shard_texts(self._open[fi], self.files[fi], rg)

    def tokenize(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.tokenizer.encode(texts, prepend=self.tokenizer.bos_id, num_threads=self.num_threads)
        return [np.asarray(doc, dtype=np.int32) for doc in ids]

    def __iter__(self):
        return self

    def __next__(self):
        if self.index >= len(self.plan):
            self.epoch, self.index = self.epoch + 1, 0
        fi, rg = self.plan[self.index]
        self.index += 1
        return fi, rg, self.tokenize(self.read_texts(fi, rg))

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class BestFitPacker:
    """Packs docs from `source` into (B, T+1) rows; see the module docstring for the rule."""

    def __init__(self, source, reader: RowGroupTokenizer, batch_size: int, seq_len: int, buffer_docs: int = 1000):
        self.source, self.reader = source, reader
        self.B, self.T, self.buffer_docs = batch_size, seq_len, buffer_docs
        # The buffer: docs keyed by arrival number; `keys` holds (length, arrival) sorted for best-fit lookups.
        self.docs: dict[int, tuple[np.ndarray, tuple[int, int, int]]] = {}
        self.keys: list[tuple[int, int]] = []
        self.arrivals = 0
        self.tokens_packed = self.tokens_cropped = 0  # statistics for logs and benchmarks (not part of the state)

    def _add(self, doc: np.ndarray, doc_id: tuple[int, int, int]) -> None:
        self.docs[self.arrivals] = (doc, doc_id)
        bisect.insort(self.keys, (len(doc), self.arrivals))
        self.arrivals += 1

    def _pop(self, pos: int) -> np.ndarray:
        _, arrival = self.keys.pop(pos)
        return self.docs.pop(arrival)[0]

    def _fill_row(self, row: np.ndarray) -> None:
        filled, cap = 0, len(row)
        while filled < cap:
            while len(self.keys) < self.buffer_docs:
                fi, rg, docs = next(self.source)
                for r, doc in enumerate(docs):
                    self._add(doc, (fi, rg, r))
            remaining = cap - filled
            # largest doc with length <= remaining (ties: the newest arrival)
            pos = bisect.bisect_right(self.keys, (remaining, float("inf"))) - 1
            if pos >= 0:
                doc = self._pop(pos)
            else:  # nothing fits whole: crop the shortest doc to the space left
                doc = self._pop(0)
                self.tokens_cropped += len(doc) - remaining
                doc = doc[:remaining]
            row[filled:filled + len(doc)] = doc
            filled += len(doc)
        self.tokens_packed += cap

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = np.empty((self.B, self.T + 1), dtype=np.int32)
        for b in range(self.B):
            self._fill_row(rows[b])
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}

    def get_state(self) -> dict:
        return {"source": self.source.get_state(), "buffer": [list(self.docs[a][1]) for a in sorted(self.docs)]}

    def set_state(self, state: dict) -> None:
        self.source.set_state(state["source"])
        self.docs, self.keys, self.arrivals = {}, [], 0
        # Re-read and re-tokenize the buffered docs, one row group at a time, then add them in arrival order.
        ids = [tuple(x) for x in state["buffer"]]
        by_rg: dict[tuple[int, int], list[int]] = {}
        for fi, rg, row in ids:
            by_rg.setdefault((fi, rg), []).append(row)
        tokens = {}
        for (fi, rg), rows in by_rg.items():
            texts = self.reader.read_texts(fi, rg)
            tokens.update(zip([(fi, rg, r) for r in rows], self.reader.tokenize([texts[r] for r in rows])))
        for doc_id in ids:
            self._add(tokens[doc_id], doc_id)


class _Closing:
    """An iterator that is also a context manager: leaving the `with` block calls close()."""

    def __iter__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class DataLoader(_Closing):
    """Iterator of {"inputs", "targets"} int32 (B, T) numpy batches with exact, JSON-able state.

    B is this process's batch (the global batch is B × process_count). Use `get_state()` after consuming a batch
    and `DataLoader(..., state=s)` (or `set_state(s)`) to continue from exactly there.
    """

    def __init__(self, tokenizer, batch_size: int, seq_len: int, split: str = "train", *,
                 data_dir: str | os.PathLike | None = None, files: Sequence[str | os.PathLike] | None = None,
                 process_index: int = 0, process_count: int = 1, buffer_docs: int = 1000,
                 tokenizer_threads: int = 4, prefetch: int = 2, state: dict | None = None):
        import grain.experimental as gexp

        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if files is None:
            files = split_files(list_parquet_files(resolve_data_dir(data_dir)), split)
        self.files = [Path(f) for f in files]
        self.split = split
        plan = row_group_plan(self.files, process_index, process_count)
        self.reader = RowGroupTokenizer(self.files, plan, tokenizer, num_threads=tokenizer_threads)
        source = gexp.ThreadPrefetchDatasetIterator(self.reader, max(prefetch, 1))
        self.packer = BestFitPacker(source, self.reader, batch_size, seq_len, buffer_docs)
        self._it = gexp.ThreadPrefetchDatasetIterator(self.packer, prefetch) if prefetch > 0 else self.packer
        # closed in this order: outer first, so its producer is never left waiting on a stopped inner queue
        self._threads = ([self._it] if prefetch > 0 else []) + [source]
        if state is not None:
            self.set_state(state)

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        return {"files": [f.name for f in self.files], "split": self.split, "packer": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        names = [f.name for f in self.files]
        if state.get("files") != names:
            raise ValueError(f"loader state was saved over files {state.get('files')} but this loader reads {names}: "
                             f"resume with the same --data-dir (and shard set) as the original run")
        self._it.set_state(state["packer"])

    @property
    def epoch(self) -> int:
        return int(self.get_state()["packer"]["source"]["epoch"])

    def close(self) -> None:
        """Stop the prefetch threads. Also frees them now: grain iterators left for interpreter shutdown print noise."""
        for it in self._threads:
            it.close()
        self._threads, self._it, self.packer = [], None, None
        gc.collect()


class ShardedLoader(_Closing):
    """One DataLoader per local device, each reading row groups strided by its global device index (like nanochat's
    one-process-per-GPU ranks), concatenated along the batch axis in device order. The global batch therefore
    depends only on the mesh size, not on how devices are split over processes."""

    def __init__(self, tokenizer, rows_per_shard: int, seq_len: int, split: str, *, files,
                 shard_indices: Sequence[int], num_shards: int, state: dict | None = None, **kwargs):
        self.loaders = [DataLoader(tokenizer, rows_per_shard, seq_len, split, files=files, process_index=i,
                                   process_count=num_shards, **kwargs) for i in shard_indices]
        self.shard_indices = list(shard_indices)
        if state is not None:
            self.set_state(state)

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(loader) for loader in self.loaders]
        return {k: np.concatenate([b[k] for b in batches]) for k in ("inputs", "targets")}

    def get_state(self) -> dict:
        return {"shards": {str(i): loader.get_state() for i, loader in zip(self.shard_indices, self.loaders)}}

    def set_state(self, state: dict) -> None:
        missing = [i for i in self.shard_indices if str(i) not in state["shards"]]
        if missing:
            raise ValueError(f"loader state has shards {sorted(state['shards'])} but this run reads shards "
                             f"{self.shard_indices}: resume on a mesh of the same size")
        for i, loader in zip(self.shard_indices, self.loaders):
            loader.set_state(state["shards"][str(i)])

    @property
    def epoch(self) -> int:
        return max(loader.epoch for loader in self.loaders)

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()


# ----------------------------------------------------------------------------------------------
# Conversations (midtraining and SFT)

class ConversationPacker:
    """Packs rendered conversations from an indexable dataset (a task mixture) into (B, T) rows, best fit.

    mode "sft": whole conversations only; when none in the buffer fits, the rest of the row is BOS padding (current
        nanochat's `sft_data_generator_bos_bestfit`: never crop). mode "mid": the shortest is cropped to fill the row.
    Targets are the next tokens; −1 on padding, and (`mask_targets`, SFT's default) where the predicted token's
    render mask is 0 (user turns, tool output, BOS). Midtraining in the reference trains on all tokens.
    This process reads indices shard, shard + num_shards, ... of `dataset`, epoch after epoch, in the dataset's
    order (TaskMixture already shuffles). The state holds the cursor and the buffered indices (re-rendered on
    restore). `progress` (conversations emitted / shard size, capped at 1) drives the schedules; `epochs_done`
    counts complete passes (`epoch` is the read cursor's, which runs ahead by up to a buffer).
    """

    def __init__(self, dataset, tokenizer, batch_size: int, seq_len: int, *, mode: str = "sft",
                 mask_targets: bool | None = None, shard: int = 0, num_shards: int = 1, buffer_size: int = 100,
                 state: dict | None = None):
        if mode not in ("sft", "mid"):
            raise ValueError(f"mode must be 'sft' or 'mid', got {mode!r}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} out of range for num_shards {num_shards}")
        if len(dataset) < num_shards:
            raise ValueError(f"the dataset has {len(dataset)} conversations, fewer than the {num_shards} shards "
                             f"reading it: use a bigger dataset or fewer processes")
        self.dataset, self.tokenizer = dataset, tokenizer
        self.B, self.T, self.mode = batch_size, seq_len, mode
        self.mask_targets = (mode == "sft") if mask_targets is None else mask_targets
        self.shard, self.num_shards, self.buffer_size = shard, num_shards, buffer_size
        self.shard_len = len(range(shard, len(dataset), num_shards))
        self.epoch, self.cursor = 0, 0      # read position in this shard's index sequence
        self.emitted = 0                    # conversations placed into rows so far (all epochs)
        self.buffer: list[tuple[int, list[int], list[int]]] = []  # (dataset index, ids, mask) in arrival order
        self.tokens_padded = self.tokens_cropped = self.tokens_packed = 0
        if state is not None:
            self.set_state(state)

    @property
    def progress(self) -> float:
        """Fraction of the first epoch emitted by this shard (1.0 from then on)."""
        return min(1.0, self.emitted / self.shard_len)

    @property
    def epochs_done(self) -> int:
        return self.emitted // self.shard_len

    def _render(self, index: int) -> tuple[list[int], list[int]]:
        return self.tokenizer.render_conversation(self.dataset[index], max_tokens=self.T + 1)

    def _fill_row(self, ids_row: np.ndarray, mask_row: np.ndarray) -> None:
        filled, cap = 0, len(ids_row)
        while filled < cap:
            while len(self.buffer) < self.buffer_size:
                index = self.shard + self.cursor * self.num_shards
                self.buffer.append((index, *self._render(index)))
                self.cursor += 1
                if self.cursor == self.shard_len:
                    self.epoch, self.cursor = self.epoch + 1, 0
            remaining = cap - filled
            sizes = [len(ids) for _, ids, _ in self.buffer]
            fits = [i for i, n in enumerate(sizes) if n <= remaining]
            if not fits and self.mode == "sft":  # pad the rest with BOS, masked out
                ids_row[filled:] = self.tokenizer.bos_id
                mask_row[filled:] = -1
                self.tokens_padded += remaining
                break
            # the largest that fits (first on ties), else (mid) the shortest, cropped
            _, ids, mask = self.buffer.pop(max(fits, key=sizes.__getitem__) if fits else sizes.index(min(sizes)))
            self.emitted += 1
            if len(ids) > remaining:
                self.tokens_cropped += len(ids) - remaining
                ids, mask = ids[:remaining], mask[:remaining]
            ids_row[filled:filled + len(ids)] = ids
            mask_row[filled:filled + len(ids)] = mask
            filled += len(ids)
        self.tokens_packed += cap

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        ids = np.empty((self.B, self.T + 1), np.int32)
        mask = np.empty((self.B, self.T + 1), np.int32)  # 1 train, 0 render-masked, -1 padding
        for b in range(self.B):
            self._fill_row(ids[b], mask[b])
        targets = ids[:, 1:].copy()
        drop = (mask[:, 1:] < 0) | ((mask[:, 1:] == 0) if self.mask_targets else False)
        targets[drop] = -1
        return {"inputs": ids[:, :-1], "targets": targets}

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "emitted": self.emitted,
                "buffer": [i for i, _, _ in self.buffer]}

    def set_state(self, state: dict) -> None:
        self.epoch, self.cursor, self.emitted = int(state["epoch"]), int(state["cursor"]), int(state["emitted"])
        self.buffer = [(i, *self._render(i)) for i in state["buffer"]]
