"""Pretraining loader throughput: read parquet → tokenize → best-fit pack, in tokens/s on this machine's CPUs.

    python scripts/bench_loader.py --data-dir=../shared/data/gutenberg --device-batch-size=32 --max-seq-len=2048

An 8×H100 node trains a d24 at about 1.1M tokens/s, so a loader that delivers more than that per host keeps up.
The last line is a JSON summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from nanochat_jax.common import run_main
from nanochat_jax.config import flag, parse_flags, print_config, require
from nanochat_jax.dataloader import DataLoader
from nanochat_jax.dataset import list_parquet_files, resolve_data_dir, split_files
from nanochat_jax.tokenizer import get_tokenizer

NODE_TOKENS_PER_S = 1.1e6  # 8×H100 d24 training throughput the loader must sustain


@dataclass(frozen=True)
class BenchLoaderConfig:
    data_dir: str | None = flag(None, "folder of *.parquet shards (default: base dir)")
    tokenizer_dir: str | None = flag(None, "trained tokenizer (default: base dir)")
    split: str = flag("train", "train | val")
    device_batch_size: int = flag(32, "rows per batch")
    max_seq_len: int = flag(2048, "tokens per row")
    num_batches: int = flag(60, "batches timed")
    warmup_batches: int = flag(5, "batches read before timing")
    tokenizer_threads: int = flag(4, "threads encoding documents")
    prefetch: int = flag(2, "batches prepared ahead")
    buffer_docs: int = flag(1000, "documents buffered for best-fit packing")

    def __post_init__(self):
        require(self.num_batches >= 1 and self.warmup_batches >= 0, "--num-batches must be >= 1, --warmup-batches >= 0")
        require(self.split in ("train", "val"), f"--split must be train or val, got {self.split!r}")


def main(argv=None) -> dict:
    cfg = parse_flags(BenchLoaderConfig, argv)
    print_config(cfg)
    tokenizer = get_tokenizer(cfg.tokenizer_dir)
    files = split_files(list_parquet_files(resolve_data_dir(cfg.data_dir)), cfg.split)
    with DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, cfg.split, files=files, prefetch=cfg.prefetch,
                    tokenizer_threads=cfg.tokenizer_threads, buffer_docs=cfg.buffer_docs) as loader:
        for _ in range(cfg.warmup_batches):
            next(loader)
        packer = loader.packer
        packed0, cropped0 = packer.tokens_packed, packer.tokens_cropped
        t0 = time.perf_counter()
        for _ in range(cfg.num_batches):
            batch = next(loader)
        dt = time.perf_counter() - t0
        # packer counters run ahead by the prefetched batches; the ratio is what matters
        cropped, packed = packer.tokens_cropped - cropped0, packer.tokens_packed - packed0
        epoch = loader.epoch
    tokens, crop = cfg.num_batches * batch["inputs"].size, cropped / max(1, packed + cropped)
    result = {"tokens_per_s": tokens / dt, "batches": cfg.num_batches, "batch_shape": list(batch["inputs"].shape),
              "seconds": dt, "cropped_fraction": crop, "epoch": epoch,
              "keeps_up_with_8xH100": tokens / dt >= NODE_TOKENS_PER_S, "config": asdict(cfg)}
    print(f"{tokens / dt:,.0f} tokens/s ({dt / cfg.num_batches * 1e3:.1f} ms per "
          f"{cfg.device_batch_size}x{cfg.max_seq_len} batch), {100 * crop:.1f}% of document tokens cropped; "
          f"an 8xH100 node needs ~{NODE_TOKENS_PER_S:,.0f}: "
          f"{'keeps up' if result['keeps_up_with_8xH100'] else 'TOO SLOW'}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_main(main)
