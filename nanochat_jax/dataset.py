"""Pretraining text shards: where they live, how to list them, how to read their documents, how to download them.

A shard is a parquet file with a string column `text`, one document per row, in row groups of 1024 docs
(nanochat's repack). Files are sorted by name; the last file is the validation split, the rest are train. Any local
folder of such files works (`--data-dir` or $NANOCHAT_JAX_DATA_DIR). Download (the validation shard always comes):

    python -m nanochat_jax.dataset -n 8                # train shards 0..7 + the val shard, 4 parallel workers
    python -m nanochat_jax.dataset -n -1 -w 8          # every train shard
    python -m nanochat_jax.dataset -n 8 --dataset fineweb-edu --data-dir /data/fwe --base-url http://mirror/fwe

A shard streams to a dot-temp file, is checked to open as parquet with a `text` column, then renamed: a file
under the final name is always complete, and a rerun skips valid files. `--base-url` (or $NANOCHAT_JAX_DATA_URL)
replaces the HuggingFace prefix: shard i is `<base-url>/shard_{i:05d}.parquet`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Iterator, Sequence

from nanochat_jax.common import (DATA_DIR_ENV, DownloadError, RetryDownload, UserError, download, get_base_dir, print0,
                                 run_main)

# name -> (HF dataset repo, last shard index = validation shard, folder under the base dir)
DATASETS = {
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6542, "base_data_climbmix"),
    "fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1822, "base_data"),
}
DEFAULT_DATASET = "climbmix"
DATA_URL_ENV = "NANOCHAT_JAX_DATA_URL"


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")


def resolve_data_dir(data_dir: str | os.PathLike | None = None, dataset: str = DEFAULT_DATASET) -> Path:
    """Explicit `data_dir` > $NANOCHAT_JAX_DATA_DIR > <base dir>/<dataset folder>."""
    if data_dir or os.environ.get(DATA_DIR_ENV):
        return Path(data_dir or os.environ[DATA_DIR_ENV]).expanduser()
    _check_dataset(dataset)
    return get_base_dir() / DATASETS[dataset][2]


def list_parquet_files(data_dir: str | os.PathLike) -> list[Path]:
    """All *.parquet files in data_dir, sorted by name (temp files from downloads are skipped)."""
    data_dir = Path(data_dir)
    exists = data_dir.is_dir()
    files = sorted(p for p in data_dir.iterdir() if p.suffix == ".parquet" and not p.name.startswith(".")
                   ) if exists else []
    if not files:
        what = f"no *.parquet files in {str(data_dir)!r}" if exists else f"data directory {data_dir} does not exist"
        raise FileNotFoundError(f"{what}. Download shards with `python -m nanochat_jax.dataset -n 8` or point "
                                f"--data-dir / ${DATA_DIR_ENV} at a folder of *.parquet files with a `text` column.")
    return files


def split_files(files: Sequence[Path], split: str) -> list[Path]:
    """train = all files but the last, val = the last one (nanochat's convention)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if len(files) < 2:
        raise ValueError(f"need at least 2 parquet files (train + the last one as validation), found {len(files)}: "
                         f"{[str(f) for f in files]}")
    return list(files[:-1]) if split == "train" else [files[-1]]


_BAD_SHARD_HINT = "re-download it (`python -m nanochat_jax.dataset`) or move it out of the data directory"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 160 else text[:157] + "..."


def open_shard(path: str | os.PathLike, column: str = "text"):
    """pyarrow ParquetFile of a shard with `column`, else a UserError naming the file and the fix (pyarrow's own
    errors name neither)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid / OSError: truncated, not parquet, unreadable
        raise UserError(f"{path}: not a readable parquet file ({_one_line(e)}); {_BAD_SHARD_HINT}") from e
    if column not in pf.schema_arrow.names:
        raise UserError(f"{path}: no {column!r} column (it has {pf.schema_arrow.names}); shards need a string "
                        f"`{column}` column, one document per row")
    return pf


def read_shard_texts(pf, path: str | os.PathLike, row_group: int, column: str = "text") -> list[str]:
    """The documents of one row group of `pf = open_shard(path)`; a corrupt row group is a UserError."""
    try:
        return pf.read_row_group(row_group, columns=[column]).column(0).to_pylist()
    except Exception as e:  # ArrowInvalid / OSError: e.g. "ZSTD decompression failed" on corrupt pages
        raise UserError(f"{path}: row group {row_group} is corrupt ({_one_line(e)}); {_BAD_SHARD_HINT}") from e


def iter_texts(files: Sequence[str | os.PathLike], column: str = "text") -> Iterator[str]:
    """Every document of `files`, in file then row-group order (one row group in memory at a time)."""
    for path in files:
        pf = open_shard(path, column)
        for rg in range(pf.num_row_groups):
            yield from read_shard_texts(pf, path, rg, column)


# ----------------------------------------------------------------------------------------------
# Download: shard i of a dataset -> <data dir>/shard_{i:05d}.parquet (common.download: a dot-temp file, retries).

def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_url(index: int, dataset: str = DEFAULT_DATASET, base_url: str | None = None) -> str:
    """HuggingFace URL of shard `index`; `base_url` (or $NANOCHAT_JAX_DATA_URL) replaces the prefix, e.g. a mirror."""
    _check_dataset(dataset)
    if int(index) != index or index < 0:
        raise ValueError(f"shard index must be an integer >= 0, got {index!r}")
    base_url = base_url or os.environ.get(DATA_URL_ENV)
    if not base_url:
        base_url = f"https://huggingface.co/datasets/{DATASETS[dataset][0]}/resolve/main"
    return f"{base_url.rstrip('/')}/{shard_name(int(index))}"


def _validate_shard(path: Path) -> None:
    """Raise unless `path` opens as parquet (intact footer) and has a `text` column. Reads only the footer."""
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as pf:
            names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for truncated or non-parquet bytes
        raise RetryDownload(f"not a readable parquet file (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if "text" not in names:
        raise DownloadError(f"parquet file has no `text` column (columns: {names}); wrong dataset or --base-url?")


def _download(index: int, out_dir: Path, dataset: str, base_url: str | None, max_attempts: int,
              backoff: float, timeout: float) -> tuple[Path, bool]:
    """(path, True) after a download, (path, False) when a valid file was already there."""
    path = Path(out_dir) / shard_name(index)
    if path.exists():
        try:
            _validate_shard(path)
            return path, False
        except (RetryDownload, DownloadError) as e:
            print0(f"{path.name}: existing file is invalid ({e}); downloading it again")
    try:
        download(shard_url(index, dataset, base_url), path, attempts=max_attempts, backoff=backoff, timeout=timeout,
                 validate=_validate_shard)
    except DownloadError as e:
        if "HTTP 404" not in str(e):
            raise
        raise DownloadError(f"{e}; shard {index} is beyond the end of {dataset!r} (shards 0..{DATASETS[dataset][1]}) "
                            f"or the base URL is wrong") from None
    return path, True


def download_shard(index: int, out_dir: str | os.PathLike, *, dataset: str = DEFAULT_DATASET,
                   base_url: str | None = None, max_attempts: int = 5, backoff: float = 2.0,
                   timeout: float = 30) -> Path:
    """Download shard `index` into out_dir unless a valid file is there. Waits backoff**attempt s between attempts;
    raises DownloadError after the last one, or at once on HTTP 404 / a parquet without `text`."""
    return _download(index, Path(out_dir), dataset, base_url, max_attempts, backoff, timeout)[0]


def download_shards(indices: Sequence[int], out_dir: str | os.PathLike | None = None, *,
                    dataset: str = DEFAULT_DATASET, num_workers: int = 4, base_url: str | None = None,
                    max_attempts: int = 5, backoff: float = 2.0, timeout: float = 30) -> list[Path]:
    """Download shards `indices` plus the validation shard (the dataset's last) with `num_workers` threads.
    Returns their paths in index order; if any failed, raises (after the rest finished) naming them."""
    _check_dataset(dataset)
    last = DATASETS[dataset][1]
    wanted = sorted({int(i) for i in indices} | {last})
    out_of_range = [i for i in wanted if not 0 <= i <= last]
    if out_of_range:
        raise ValueError(f"shard indices {out_of_range[:5]} out of range for {dataset!r}: valid are 0..{last} "
                         f"({last} is the validation shard)")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    out_dir = resolve_data_dir(out_dir, dataset)
    out_dir.mkdir(parents=True, exist_ok=True)

    paths, errors, n_new, t0 = {}, {}, 0, time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=min(num_workers, len(wanted)))
    try:
        futures = {pool.submit(_download, i, out_dir, dataset, base_url, max_attempts, backoff, timeout): i
                   for i in wanted}
        for done, fut in enumerate(as_completed(futures), start=1):
            i, prefix = futures[fut], f"[{done}/{len(wanted)}]"
            try:
                paths[i], downloaded = fut.result()
            except Exception as e:
                errors[i] = e
                print0(f"{prefix} FAILED {shard_name(i)}: {e}")
                continue
            n_new += downloaded
            if downloaded:
                print0(f"{prefix} downloaded {paths[i].name} ({paths[i].stat().st_size / 1e6:.1f} MB, "
                       f"{time.perf_counter() - t0:.1f} s elapsed)")
            else:
                print0(f"{prefix} skipped {paths[i].name} (already there)")
    except BaseException:  # e.g. Ctrl-C: drop queued shards instead of downloading them all on the way out
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()

    print0(f"Done! Downloaded {len(paths)}/{len(wanted)} shards to {out_dir} "
           f"({n_new} new, {len(paths) - n_new} already there)")
    if errors:
        listed = "; ".join(f"{shard_name(i)}: {e}" for i, e in sorted(errors.items()))
        raise DownloadError(f"{len(errors)} of {len(wanted)} shards failed (indices {sorted(errors)}): {listed}. "
                            f"Rerun the same command to retry them; finished shards are skipped.")
    return [paths[i] for i in wanted]


def train_shard_indices(num_files: int, dataset: str = DEFAULT_DATASET) -> list[int]:
    """The first `num_files` train shards (-1 = all of them; the last shard is validation, not train)."""
    _check_dataset(dataset)
    num_train = DATASETS[dataset][1]
    if num_files == -1:
        return list(range(num_train))
    if num_files < 1:
        raise ValueError(f"-n/--num-files must be -1 (all {num_train} train shards) or >= 1, got {num_files}")
    if num_files > num_train:
        raise ValueError(f"-n/--num-files {num_files} is more than the {num_train} train shards of {dataset!r}; "
                         f"use -n -1 for all of them")
    return list(range(num_files))


class _ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage dump; exit code 2 = bad usage
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = _ArgParser(prog="python -m nanochat_jax.dataset",
                        description="Download pretraining parquet shards (the validation shard is always included).")
    parser.add_argument("-n", "--num-files", type=int, default=-1,
                        help="number of train shards, starting at shard 0 (-1 = all)")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, choices=sorted(DATASETS),
                        help=f"which pretraining corpus (default: {DEFAULT_DATASET})")
    parser.add_argument("--data-dir", default=None,
                        help=f"target folder (default: ${DATA_DIR_ENV} or <base dir>/<dataset folder>)")
    parser.add_argument("--base-url", default=None,
                        help=f"URL prefix replacing HuggingFace's (default: ${DATA_URL_ENV} if set)")
    args = parser.parse_args(argv)
    try:
        indices = train_shard_indices(args.num_files, args.dataset)
    except ValueError as e:
        parser.error(str(e))
    if args.num_workers < 1:
        parser.error(f"-w/--num-workers must be >= 1, got {args.num_workers}")

    repo, last, _ = DATASETS[args.dataset]
    data_dir = resolve_data_dir(args.data_dir, args.dataset)
    print0(f"dataset:  {args.dataset} ({repo})")
    print0(f"source:   {shard_url(last, args.dataset, args.base_url).rsplit('/', 1)[0]}")
    print0(f"shards:   train 0..{indices[-1]} ({len(indices)}) + val {last}")
    print0(f"workers:  {args.num_workers}")
    print0(f"data dir: {data_dir}")
    try:
        return download_shards(indices, data_dir, dataset=args.dataset, num_workers=args.num_workers,
                               base_url=args.base_url)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run_main(main)
