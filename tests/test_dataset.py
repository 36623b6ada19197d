"""Shard listing/reading helpers and the shard downloader, against a local HTTP server that misbehaves on purpose.

The server (127.0.0.1, OS-picked port) serves small parquet shards written here with pyarrow. Per-shard modes
simulate HTTP 500s, truncated bodies (a short but self-consistent Content-Length, i.e. a corrupt parquet),
missing shards (404) and a wrong schema; a per-name request counter checks how many attempts were made.
"""

from __future__ import annotations

import collections
import http.server
import io
import socket
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_jax.common import DownloadError, UserError
from nanochat_jax import dataset as ds
from nanochat_jax.dataset import (DATASETS, download_shard, download_shards, iter_texts,
                                  list_parquet_files, main, shard_url, split_files, train_shard_indices)

VAL = DATASETS["climbmix"][1]  # download_shards always adds the validation shard
FAST = dict(backoff=0.01, timeout=5)


def random_docs(rng, n):
    words = ["alpha", "beta", "gamma", "delta", "ünïcode", "日本語", "x" * 50, "\n", "emoji 🙂"]
    return [" ".join(rng.choice(words, size=rng.integers(1, 20))) + f" #{rng.integers(1 << 30)}" for _ in range(n)]


def parquet_bytes(docs, column="text", row_group_size=4):
    buf = io.BytesIO()
    pq.write_table(pa.table({column: docs}), buf, row_group_size=row_group_size)
    return buf.getvalue()


class ShardServer:
    """Threaded HTTP server; `modes[name]` picks the behaviour, `requests[name]` counts GETs."""

    def __init__(self, shards, modes):
        self.shards, self.modes = shards, modes
        self.requests = collections.Counter()
        self.lock = threading.Lock()
        state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with state.lock:
                    state.requests[name] += 1
                    count = state.requests[name]
                mode = state.modes.get(name, "ok")
                if name not in state.shards:
                    return self.send_error(404)
                body = state.shards[name]
                if mode == "fail500x2" and count <= 2:
                    return self.send_error(500)
                if mode == "truncated" or (mode == "truncated_once" and count == 1):
                    body = body[: len(body) // 2]  # Content-Length matches: only parquet validation can tell
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def total(self):
        return sum(self.requests.values())

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    # requests honours *_PROXY variables; the test server must be reached directly
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv(ds.DATA_URL_ENV, raising=False)
    monkeypatch.delenv(ds.DATA_DIR_ENV, raising=False)


@pytest.fixture
def server():
    rng = np.random.default_rng()
    docs = {i: random_docs(rng, 11) for i in [0, 1, 2, 3, 4, 5, VAL]}
    shards = {ds.shard_name(i): parquet_bytes(d) for i, d in docs.items()}
    shards[ds.shard_name(6)] = parquet_bytes(random_docs(rng, 5), column="content")  # wrong schema
    modes = {ds.shard_name(2): "fail500x2", ds.shard_name(3): "truncated", ds.shard_name(4): "truncated_once"}
    srv = ShardServer(shards, modes)
    srv.docs = docs
    yield srv
    srv.close()


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------
# URLs and CLI index resolution


def test_shard_url_default_and_overrides(monkeypatch):
    assert shard_url(3) == ("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/"
                            "shard_00003.parquet")
    assert shard_url(1822, "fineweb-edu") == ("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/"
                                              "resolve/main/shard_01822.parquet")
    assert shard_url(12345, base_url="http://m/x/") == "http://m/x/shard_12345.parquet"
    monkeypatch.setenv(ds.DATA_URL_ENV, "http://env-mirror")
    assert shard_url(7) == "http://env-mirror/shard_00007.parquet"
    assert shard_url(7, base_url="http://arg") == "http://arg/shard_00007.parquet"  # argument beats env
    with pytest.raises(ValueError, match="unknown dataset"):
        shard_url(0, "nope")
    with pytest.raises(ValueError, match=">= 0"):
        shard_url(-1)


def test_train_shard_indices():
    assert train_shard_indices(3) == [0, 1, 2]
    all_train = train_shard_indices(-1, "fineweb-edu")
    assert all_train == list(range(1822)) and 1822 not in all_train  # val shard is not a train shard
    assert train_shard_indices(VAL) == list(range(VAL))
    for bad in (0, -2, VAL + 1):
        with pytest.raises(ValueError, match="num-files"):
            train_shard_indices(bad)


# ----------------------------------------------------------------------------------------------
# download_shard


def test_download_roundtrip(server, tmp_path):
    path = download_shard(0, tmp_path / "new" / "dir", base_url=server.url, **FAST)
    assert path == tmp_path / "new" / "dir" / "shard_00000.parquet"
    assert path.read_bytes() == server.shards["shard_00000.parquet"]
    assert list(iter_texts([path])) == server.docs[0]
    assert server.requests["shard_00000.parquet"] == 1
    assert leftovers(path.parent) == ["shard_00000.parquet"]  # no temp file left behind


def test_retries_http_500_then_succeeds(server, tmp_path, capsys):
    path = download_shard(2, tmp_path, base_url=server.url, max_attempts=5, **FAST)
    assert server.requests["shard_00002.parquet"] == 3  # two 500s, then the good one
    assert list(iter_texts([path])) == server.docs[2]
    assert "attempt 2/5 failed (HTTP 500" in capsys.readouterr().out
    assert leftovers(tmp_path) == ["shard_00002.parquet"]


def test_truncated_once_then_succeeds(server, tmp_path):
    path = download_shard(4, tmp_path, base_url=server.url, **FAST)
    assert server.requests["shard_00004.parquet"] == 2
    assert path.read_bytes() == server.shards["shard_00004.parquet"]
    assert leftovers(tmp_path) == ["shard_00004.parquet"]


def test_always_truncated_fails_cleanly(server, tmp_path):
    with pytest.raises(DownloadError, match=r"shard_00003\.parquet: failed after 3 attempts.*parquet"):
        download_shard(3, tmp_path, base_url=server.url, max_attempts=3, **FAST)
    assert server.requests["shard_00003.parquet"] == 3
    assert leftovers(tmp_path) == []  # no partial file under the final name, no temp files


def test_backoff_grows_exponentially(server, tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr(ds.time, "sleep", sleeps.append)
    with pytest.raises(DownloadError):
        download_shard(3, tmp_path, base_url=server.url, max_attempts=4, backoff=3.0, timeout=5)
    assert sleeps == [3.0, 9.0, 27.0]  # backoff ** attempt between attempts, none after the last


def test_404_fails_fast(server, tmp_path):
    with pytest.raises(DownloadError, match=r"HTTP 404.*beyond the end"):
        download_shard(9, tmp_path, base_url=server.url, **FAST)
    assert server.requests["shard_00009.parquet"] == 1
    assert leftovers(tmp_path) == []


def test_missing_text_column_fails_fast(server, tmp_path):
    with pytest.raises(DownloadError, match="no `text` column"):
        download_shard(6, tmp_path, base_url=server.url, **FAST)
    assert server.requests["shard_00006.parquet"] == 1
    assert leftovers(tmp_path) == []


def test_connection_refused_retries_then_fails(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(DownloadError, match="failed after 2 attempts.*ConnectionError"):
        download_shard(0, tmp_path, base_url=f"http://127.0.0.1:{port}", max_attempts=2, **FAST)
    assert time.perf_counter() - t0 < 10
    assert leftovers(tmp_path) == []


def test_skip_existing_and_replace_corrupt(server, tmp_path, capsys):
    paths = download_shards([0, 1], tmp_path, num_workers=2, base_url=server.url, **FAST)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", f"shard_{VAL:05d}.parquet"]
    n = server.total()
    assert n == 3
    capsys.readouterr()
    assert download_shards([0, 1], tmp_path, base_url=server.url, **FAST) == paths
    assert server.total() == n  # nothing fetched again
    out = capsys.readouterr().out
    assert out.count("skipped") == 3 and "Done! Downloaded 3/3 shards" in out
    # a corrupt file under the final name (e.g. copied by hand) is not trusted: it is fetched again
    paths[1].write_bytes(b"PAR1 not really")
    assert download_shard(1, tmp_path, base_url=server.url, **FAST) == paths[1]
    assert server.total() == n + 1
    assert paths[1].read_bytes() == server.shards["shard_00001.parquet"]


# ----------------------------------------------------------------------------------------------
# download_shards


def test_download_shards_parallel_in_index_order(server, tmp_path, capsys):
    paths = download_shards([5, 2, 0, 4, 5], tmp_path, num_workers=3, base_url=server.url, **FAST)
    want = [0, 2, 4, 5, VAL]
    assert paths == [tmp_path / ds.shard_name(i) for i in want]
    for i, p in zip(want, paths):
        assert list(iter_texts([p])) == server.docs[i]
    out = capsys.readouterr().out
    assert out.count("downloaded shard_") == 5
    assert f"Done! Downloaded 5/5 shards to {tmp_path}" in out
    assert leftovers(tmp_path) == [ds.shard_name(i) for i in want]
    # the downloaded folder is directly usable by the readers
    assert split_files(list_parquet_files(tmp_path), "val") == [tmp_path / ds.shard_name(VAL)]


def test_download_shards_reports_failures_after_finishing_others(server, tmp_path, capsys):
    with pytest.raises(DownloadError, match=r"2 of 4 shards failed \(indices \[3, 9\]\)") as info:
        download_shards([9, 3, 1], tmp_path, num_workers=2, base_url=server.url, max_attempts=2, **FAST)
    assert "shard_00003.parquet" in str(info.value) and "HTTP 404" in str(info.value)
    assert leftovers(tmp_path) == ["shard_00001.parquet", f"shard_{VAL:05d}.parquet"]
    assert "Done! Downloaded 2/4 shards" in capsys.readouterr().out


def test_download_shards_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        download_shards([VAL + 1], tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        download_shards([0], tmp_path, dataset="nope")
    with pytest.raises(ValueError, match="num_workers"):
        download_shards([0], tmp_path, num_workers=0)


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_downloads_into_data_dir(server, tmp_path, capsys):
    out_dir = tmp_path / "shards"
    paths = main(["-n", "2", "-w", "2", "--data-dir", str(out_dir), "--base-url", server.url])
    assert paths == [out_dir / ds.shard_name(i) for i in (0, 1, VAL)]
    assert all(p.read_bytes() == server.shards[p.name] for p in paths)
    out = capsys.readouterr().out
    assert "climbmix (karpathy/climbmix-400b-shuffle)" in out
    assert f"source:   {server.url}" in out and f"data dir: {out_dir}" in out
    assert f"train 0..1 (2) + val {VAL}" in out
    assert f"Done! Downloaded 3/3 shards to {out_dir}" in out


def test_cli_download_failure_exits_1(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ds, "download_shards", lambda *a, **k: (_ for _ in ()).throw(DownloadError("boom")))
    with pytest.raises(SystemExit) as info:
        main(["-n", "1", "--data-dir", str(tmp_path), "--base-url", server.url])
    assert info.value.code == 1 and "error: boom" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "nope"], "invalid choice: 'nope'"),
    (["-n", "0"], "got 0"),
    (["-n", "-2"], "got -2"),
    (["-n", str(VAL + 1)], f"more than the {VAL} train shards"),
    (["--dataset", "fineweb-edu", "-n", "1823"], "more than the 1822 train shards of 'fineweb-edu'"),
    (["-w", "0"], "num-workers must be >= 1"),
    (["-n", "two"], "invalid int value"),
])
def test_cli_bad_args_exit_2(server, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv + ["--data-dir", str(tmp_path / "d"), "--base-url", server.url])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one clear line
    assert server.total() == 0 and not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------------------------
# Existing helpers: list_parquet_files, split_files, iter_texts


def test_list_parquet_files_sorted_and_ignores_temp_files(tmp_path):
    for name in ["shard_00002.parquet", "shard_00000.parquet", "shard_00010.parquet", "notes.txt",
                 ".shard_00003.parquet.ab12cd34.tmp", ".hidden.parquet"]:
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_parquet_files(tmp_path)] == [
        "shard_00000.parquet", "shard_00002.parquet", "shard_00010.parquet"]


def test_list_parquet_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*-n 8"):
        list_parquet_files(tmp_path / "missing")
    (tmp_path / ".shard_00000.parquet.x.tmp").write_bytes(b"x")  # only a temp file: still empty
    with pytest.raises(FileNotFoundError, match="no \\*.parquet files"):
        list_parquet_files(tmp_path)


def test_split_files(tmp_path):
    files = [tmp_path / f"shard_{i:05d}.parquet" for i in range(4)]
    assert split_files(files, "train") == files[:3]
    assert split_files(files, "val") == [files[3]]
    with pytest.raises(ValueError, match="at least 2"):
        split_files(files[:1], "train")
    with pytest.raises(ValueError, match="'train' or 'val'"):
        split_files(files, "test")


def test_iter_texts_order_and_missing_column(tmp_path):
    rng = np.random.default_rng()
    docs_a, docs_b = random_docs(rng, 9), random_docs(rng, 3)
    (a := tmp_path / "a.parquet").write_bytes(parquet_bytes(docs_a, row_group_size=4))  # 3 row groups
    (b := tmp_path / "b.parquet").write_bytes(parquet_bytes(docs_b, row_group_size=2))
    assert pq.ParquetFile(a).num_row_groups == 3
    assert list(iter_texts([b, a])) == docs_b + docs_a
    (c := tmp_path / "c.parquet").write_bytes(parquet_bytes(docs_b, column="content"))
    with pytest.raises(UserError, match=r"c.parquet: no 'text' column"):
        list(iter_texts([c]))
    assert list(iter_texts([c], column="content")) == docs_b
