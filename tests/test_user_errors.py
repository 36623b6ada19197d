"""A user's mistake ends a script with one line on stderr that names the file and the fix (no traceback), a
non-zero exit status, and the traceback behind NANOCHAT_JAX_DEBUG=1; bad data met mid-run keeps the last checkpoint."""

import logging
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT
from nanochat_jax.tokenizer import train_tokenizer
from test_dataloader import _write_shards

TINY = ["--depth=2", "--aspect-ratio=64", "--head-dim=32", "--max-seq-len=64", "--device-batch-size=2",
        f"--total-batch-size={2 * 64 * 2}", "--mesh=2", "--eval-every=-1", f"--eval-tokens={2 * 64 * 2}",
        "--sample-every=-1", "--warmup-steps=0"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    docs = _write_shards(root / "corpus", n_files=1, docs_per_file=200)
    tok = train_tokenizer((d for fd in docs for d in fd), vocab_size=400)
    tok.save(root / "tok")
    return root / "tok"


def run(script, *args, base_dir, debug=False):
    env = {**os.environ, "NANOCHAT_JAX_BASE_DIR": str(base_dir), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env.pop("NANOCHAT_JAX_DEBUG", None)
    if debug:
        env["NANOCHAT_JAX_DEBUG"] = "1"
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / script), *args], env=env, text=True,
                          capture_output=True, timeout=300)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 3 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_missing_tokenizer(tmp_path):
    proc = run("pretrain.py", *TINY, "--num-iterations=2", f"--data-dir={tmp_path}", base_dir=tmp_path)
    assert_one_line_error(proc, f"no tokenizer at '{tmp_path / 'tokenizer'}'", "scripts/tok_train.py")
    debug = run("pretrain.py", *TINY, "--num-iterations=2", f"--data-dir={tmp_path}", base_dir=tmp_path, debug=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_missing_data_dir(tmp_path, tok_dir):
    proc = run("pretrain.py", *TINY, "--num-iterations=2", f"--tokenizer-dir={tok_dir}", base_dir=tmp_path)
    assert_one_line_error(proc, str(tmp_path / "base_data_climbmix"), "nanochat_jax.dataset")


@pytest.mark.parametrize("damage", ["truncated", "no_text_column"])
def test_bad_shard_is_named_before_compiling(tmp_path, tok_dir, damage):
    data = tmp_path / "data"
    _write_shards(data, n_files=3, docs_per_file=40)
    bad = data / "shard_00001.parquet"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        pq.write_table(pa.table({"body": ["a", "b"]}), bad)
    proc = run("pretrain.py", *TINY, "--num-iterations=2", f"--data-dir={data}", f"--tokenizer-dir={tok_dir}",
               base_dir=tmp_path)
    expected = "not a readable parquet file" if damage == "truncated" else "no 'text' column"
    assert_one_line_error(proc, str(bad), expected)
    assert "compiled the train step" not in proc.stdout  # found before any compilation


def _corrupt_row_group(path, row_group):
    """Overwrite the page header of one row group: the footer still opens, reading that row group fails."""
    start = pq.ParquetFile(path).metadata.row_group(row_group).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 10:start + 18] = bytes(b ^ 0xFF for b in data[start + 10:start + 18])
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_bad_row_group_mid_run_keeps_the_last_checkpoint_and_corrupt_checkpoint_is_named(tmp_path, tok_dir):
    data = tmp_path / "data"
    # Each of the 2 readers keeps 1,000 docs buffered ahead of packing: 2,400 docs per file put the second train
    # file's first row group dozens of steps into the run.
    _write_shards(data, n_files=3, docs_per_file=2400, rows_per_group=64)
    bad = data / "shard_00001.parquet"
    _corrupt_row_group(bad, 0)
    proc = run("pretrain.py", *TINY, "--num-iterations=100000", "--save-every=5", f"--data-dir={data}",
               f"--tokenizer-dir={tok_dir}", base_dir=tmp_path)
    assert_one_line_error(proc, str(bad), "row group 0")
    saved = sorted(int(p.name) for p in (tmp_path / "base_checkpoints" / "d2").iterdir() if p.name.isdigit())
    assert saved and "saved checkpoint d2 step" in proc.stdout
    # The last checkpoint is whole: the loss script reads it. Then damage it: one line naming the step directory.
    ok = run("base_loss.py", "--model-tag=d2", "--device-batch-size=2", f"--split-tokens={2 * 64 * 2}",
             "--eval=bpb", f"--data-dir={data}", f"--tokenizer-dir={tok_dir}", "--mesh=2", base_dir=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    step_dir = tmp_path / "base_checkpoints" / "d2" / str(saved[-1])
    biggest = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    proc = run("base_loss.py", "--model-tag=d2", "--device-batch-size=2", f"--split-tokens={2 * 64 * 2}",
               "--eval=bpb", f"--data-dir={data}", f"--tokenizer-dir={tok_dir}", "--mesh=2", base_dir=tmp_path)
    assert_one_line_error(proc, f"checkpoint {step_dir} cannot be read", "damaged")


def _raise_in_thread(message):
    import threading

    def boom():
        raise RuntimeError(message)

    t = threading.Thread(target=boom)
    t.start()
    t.join()


def _log_asyncio(message):
    logging.getLogger("asyncio").error(message)


def test_background_errors_are_replayed_after_success_and_held_after_a_failure(monkeypatch, caplog):
    import threading

    from nanochat_jax.common import held_background_errors
    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda a: seen.append(str(a.exc_value)))
    mine = threading.excepthook
    # The failure case below leaves its holds installed (as a script would, on its way out): undo them afterwards.
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(logging.getLogger("asyncio"), "filters", list(logging.getLogger("asyncio").filters))
    monkeypatch.delenv("NANOCHAT_JAX_DEBUG", raising=False)
    # Success: what background work reported comes out afterwards, in order, through the original hooks.
    with held_background_errors():
        _raise_in_thread("first")
        _log_asyncio("task one")
        assert seen == [] and "task one" not in caplog.text
    assert seen == ["first"] and "task one" in caplog.text
    assert threading.excepthook is mine
    # Failure: the block's own exception is the report; background noise during and after it stays held.
    caplog.clear()
    with pytest.raises(ValueError, match="the real error"):
        with held_background_errors():
            _raise_in_thread("during")
            raise ValueError("the real error")
    _raise_in_thread("after")
    _log_asyncio("task two")
    assert seen == ["first"] and "task two" not in caplog.text
