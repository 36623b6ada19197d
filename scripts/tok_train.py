"""Train the BPE tokenizer on the first ~2B characters of the train shards and save it to --tokenizer-dir.

    python scripts/tok_train.py                                   # nanochat defaults: 2B chars, 32768 vocab
    python scripts/tok_train.py --vocab-size=4096 --max-chars=20_000_000 --data-dir=/path/to/parquet
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from nanochat_jax import dataset
from nanochat_jax.common import Timer, print0, run_main
from nanochat_jax.config import flag, parse_flags, print_config, require
from nanochat_jax.report import get_report
from nanochat_jax.tokenizer import (MIN_VOCAB_SIZE, SPECIAL_TOKENS, default_tokenizer_dir, iter_training_texts,
                                    token_bytes_stats, train_tokenizer)


@dataclass(frozen=True)
class TokTrainConfig:
    """Train the BPE tokenizer on the train shards."""
    max_chars: int = flag(2_000_000_000, "stop after this many training characters")
    doc_cap: int = flag(10_000, "use at most this many characters of each document")
    vocab_size: int = flag(32768, "vocab size including the 9 special tokens")
    data_dir: str | None = flag(None, "folder of parquet shards (None: $NANOCHAT_JAX_DATA_DIR or "
                                      "<base dir>/base_data_climbmix)")
    tokenizer_dir: str | None = flag(None, "output folder (None: <base dir>/tokenizer)")

    def __post_init__(self):
        require(self.max_chars > 0 and self.doc_cap > 0,
                f"--max-chars and --doc-cap must be positive, got {self.max_chars} and {self.doc_cap}")
        require(self.vocab_size >= MIN_VOCAB_SIZE,
                f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + 9 specials), got {self.vocab_size}")


def main(argv=None) -> None:
    cfg = parse_flags(TokTrainConfig, argv)
    print_config(cfg)
    data_dir = dataset.resolve_data_dir(cfg.data_dir)
    train_files = dataset.split_files(dataset.list_parquet_files(data_dir), "train")
    print0(f"training on {len(train_files)} train shard(s) in {data_dir}")

    stats: dict = {}
    texts = iter_training_texts(train_files, max_chars=cfg.max_chars, doc_cap=cfg.doc_cap, stats=stats)
    with Timer() as t:
        tokenizer = train_tokenizer(texts, cfg.vocab_size)
    print0(f"chars used: {stats['chars']:,} from {stats['docs']:,} docs")
    print0(f"training time: {t.seconds:.2f}s")
    print0(f"vocab size: {tokenizer.vocab_size:,} (bos id {tokenizer.bos_id})")
    for kind, path in tokenizer.save(cfg.tokenizer_dir or default_tokenizer_dir()).items():
        print0(f"saved {kind}: {path}")
    tb = token_bytes_stats(tokenizer.token_bytes())
    print0(f"token_bytes over {tb['count']:,} non-special tokens: mean {tb['mean']:.4f}, std {tb['std']:.4f}, "
           f"max {tb['max']}")
    get_report().log("Tokenizer training", {
        "vocab_size": tokenizer.vocab_size, "max_chars": cfg.max_chars, "chars_used": stats["chars"],
        "docs": stats["docs"], "train_time_s": t.seconds, "num_special_tokens": len(SPECIAL_TOKENS),
        "token_bytes_max": tb["max"], "token_bytes_mean": tb["mean"], "token_bytes_std": tb["std"]})


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
