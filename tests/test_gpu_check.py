"""scripts/gpu_check.sh fits its window: worst-case time within budget, few output files, the summary rewritten after
every step, cuDNN before Pallas, python3, runs that fit in memory.

The fast tests run the real script with a stub interpreter (PYTHON=stub) that answers each step with a canned
JSON line in milliseconds and records what OUT held when the step started; the slow test runs the dry run for
real (tiny configs on CPU).
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT

SCRIPT = str(REPO_ROOT / "scripts" / "gpu_check.sh")
ALLOWED = {"log.txt", "results.jsonl", "summary.md", "attention.md"}


def plan() -> tuple[list[tuple[str, int, str]], int, int]:
    out = subprocess.run(["bash", SCRIPT], env={**os.environ, "GPU_CHECK_DRY_RUN": "plan"}, capture_output=True,
                         text=True, check=True, timeout=30).stdout
    steps = [(m[1], int(m[2]), m[3]) for m in re.finditer(r"^step (\S+) (\d+) (.*)$", out, re.M)]
    worst, budget = map(int, re.search(r"worst case: (\d+) s \(budget (\d+) s\)", out).groups())
    return steps, worst, budget


def test_plan_fits_the_window():
    steps, worst, budget = plan()
    assert budget <= 540 and worst <= budget
    # the worst case counts every limit, the kill grace after it and some overhead
    assert worst >= sum(limit for _, limit, _ in steps) + 5 * len(steps)
    names = [name for name, _, _ in steps]
    assert names.index("train_d20_cudnn") < names.index("train_d20_pallas") == len(names) - 1
    assert all(cmd.startswith("python3 ") for _, _, cmd in steps)
    cmds = dict((name, cmd) for name, _, cmd in steps)
    assert "--grad-accum=4" in cmds["train_d20_cudnn_accum4"]
    for name, cmd in cmds.items():  # d20 trains only with flash attention (XLA's would keep the T×T scores)
        if name.startswith("train_"):
            assert "--depth=20" in cmd and "--attention=xla" not in cmd
            batch = int(re.search(r"--device-batch-size=(\d+)", cmd)[1])
            assert batch <= 16  # scripts/memory_estimate.py: ~47.5 GB at 16 with cuDNN attention
    assert "--batch-sizes=1," in cmds["infer_d20"] and "--depth=20" in cmds["infer_d20"]
    assert "--backends=xla,cudnn,pallas" in cmds["attention"]  # XLA: the reference for the error columns


STUB = r'''#!{python}
"""Stands in for python3: records the state of OUT when a step starts, prints a canned result."""
import json, os, sys
out, record = os.environ["STUB_OUT"], os.environ["STUB_RECORD"]
results, summary_md = os.path.join(out, "results.jsonl"), os.path.join(out, "summary.md")
done = sum(1 for _ in open(results)) if os.path.exists(results) else 0
summary = open(summary_md).read() if os.path.exists(summary_md) else ""
with open(record, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "done": done, "summary": summary}}) + "\n")
args = " ".join(sys.argv[1:])
print("some output line")
if done == 0:
    print(json.dumps({{"jax": "0.11.2", "devices": 1, "device_kind": "NVIDIA H100 80GB HBM3", "memory_gb": 73.6}}))
elif "bench_train.py" in args and done == 5:
    print("Segmentation fault (core dumped)")
    sys.exit(139)
elif "bench_train.py" in args:
    four = "--grad-accum=4" in args
    print(json.dumps({{"attention": "cudnn", "step_seconds": 1.45 if four else 0.40, "tokens_per_s": 1e5,
                      "mfu_percent": 40.0, "compile_seconds": 30.0, "peak_bytes_in_use": 47e9,
                      "config": {{"device_batch_size": 16, "grad_accum": 4 if four else 1}}}}))
elif "bench_infer.py" in args:
    print(json.dumps({{"device_kind": "NVIDIA H100", "compute_dtype": "bfloat16", "results": [
        {{"batch": 1, "ttft_ms": 20.0, "tpot_ms": 2.5, "decode_tokens_per_s": 400.0,
          "bandwidth_util_percent": 72.5}},
        {{"batch": 8, "ttft_ms": 30.0, "tpot_ms": 2.7, "decode_tokens_per_s": 2960.0,
          "bandwidth_util_percent": 70.1}}]}}))
elif "bench_attention.py" in args:
    dest = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--out="))
    open(dest, "w").write("| backend | fwd ms |\n|---|---|\n| cudnn | 1.0 |\n")
'''


@pytest.fixture
def stub_run(tmp_path):
    stub, record, out = tmp_path / "stub", tmp_path / "record.jsonl", tmp_path / "out"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "GPU_CHECK_DRY_RUN": "1", "STUB_OUT": str(out),
           "STUB_RECORD": str(record), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=60)
    return proc, out, [json.loads(line) for line in record.read_text().splitlines()]


def test_summary_is_written_after_every_step_and_outputs_stay_few(stub_run):
    proc, out, calls = stub_run
    assert proc.returncode == 0, proc.stderr
    steps, _, _ = plan()
    assert len(calls) == len(steps)
    for k, call in enumerate(calls):  # step k starts with k records and a summary of k steps
        assert call["done"] == k
        assert (f"({k} step(s) done)" in call["summary"]) if k else call["summary"] == ""
    files = {p.name for p in out.iterdir()}
    assert files <= ALLOWED and len(files) <= 7, files
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [name for name, _, _ in steps]
    assert [r["rc"] for r in records] == [0, 0, 0, 0, 0, 139]
    summary = (out / "summary.md").read_text()
    assert f"({len(steps)} step(s) done)" in summary
    assert "| train_d20_pallas | 139 |" in summary and "Segmentation fault" in summary
    # Muon's share from t1 = 0.40 s and t4 = 1.45 s: (4 * 0.40 - 1.45) / 3 = 50 ms = 12.5% of t1
    assert "50.0 ms = 12.5% of the d20 step" in summary
    assert "batch-1 decode HBM bandwidth utilisation: 72.5% (meets" in summary
    assert "| cudnn | 1.0 |" in summary  # the attention table
    log = (out / "log.txt").read_text()
    assert log.count("some output line") == len(steps) and "=== train_d20_pallas: exit 139" in log


def test_a_step_over_its_limit_is_killed_and_the_rest_still_runs(tmp_path):
    """The limits are real: a stub that hangs in its first step is stopped (shrunk limits via a copied script)."""
    script = tmp_path / "gpu_check.sh"
    text = open(SCRIPT).read().replace('"env 30 ', '"env 1 ')
    script.write_text(text.replace('cd "$(dirname "$0")/.."', f'cd "{REPO_ROOT}"'))
    stub = tmp_path / "stub"
    stub.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, time
        if sys.argv[1] == "-c":
            time.sleep(30)
        print('{{"ok": 1}}')
        """))
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(stub), "GPU_CHECK_DRY_RUN": "1",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(script), str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert records[0]["step"] == "env" and records[0]["timed_out"] and records[0]["seconds"] <= 3
    assert all(r["rc"] == 0 for r in records[1:]) and len(records) == 6
    assert "TIMED OUT" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_dry_run_on_cpu(tmp_path):
    """Every step for real with tiny configs on CPU (XLA attention; Pallas interpreted in the attention step)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DRY_RUN": "1", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["rc"] for r in records] == [0] * 6, [(r["step"], r["tail"]) for r in records]
    assert all(r["result"] for r in records if r["step"] != "attention")
    assert records[0]["result"]["platform"] == "cpu"
    assert {p.name for p in out.iterdir()} == ALLOWED
    summary = (out / "summary.md").read_text()
    assert "optimizer update" in summary and "### inference d20" in summary and "### attention" in summary
