"""scripts/bench_serve.py: flag routing (ours vs the server's), the summary arithmetic, and one real run (a random
tiny model served by scripts/chat_web.py on loopback, 2 clients)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import bench_serve  # noqa: E402


def test_unknown_flags_go_to_the_server():
    mine, server = bench_serve.split_argv(["--clients=4", "--max-batch=1", "-t", "0.5", "--max-tokens", "16",
                                           "--model-tag=d2", "--port", "9", "--", "--clients=7"])
    assert mine == ["--clients=4", "--max-tokens", "16"]
    assert server == ["--max-batch=1", "-t", "0.5", "--model-tag=d2", "--port", "9", "--clients=7"]


def test_summary_counts_and_percentiles():
    cfg = bench_serve.BenchServeConfig(clients=4, max_tokens=10)
    results = [{"ok": True, "ttft": t, "latency": 2 * t, "tokens": 10} for t in (0.1, 0.2, 0.3)]
    results.append({"ok": False, "error": "time limit", "tokens": 0})
    out = bench_serve.summarize(results, 2.0, cfg)
    assert (out["completed"], out["failed"], out["tokens"], out["short_replies"]) == (3, 1, 30, 0)
    assert out["tokens_per_s"] == 15.0 and out["errors"] == {"time limit": 1}
    assert out["ttft_p50_s"] == pytest.approx(0.2) and out["ttft_p99_s"] == pytest.approx(0.298)
    assert out["latency_p50_s"] == pytest.approx(0.4)


@pytest.mark.slow
def test_two_clients_against_the_real_server(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "NANOCHAT_JAX_BASE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "scripts/bench_serve.py", "--clients=2", "--max-tokens=6",
                           "--time-limit=120", "--warmup-tokens=16"],  # the last one is the server's flag
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["completed"], out["failed"], out["tokens"], out["short_replies"]) == (2, 0, 12, 0)
    assert out["follow_up_ok"] and "--warmup-tokens=16" in out["server_args"]
    assert 0 < out["ttft_p50_s"] <= out["ttft_p99_s"] <= out["latency_p99_s"]
    # the untimed warm-up, the 2 clients and the follow-up: 1 + 2 + 1 requests, 6 + 12 + 4 tokens
    assert out["server_stats"]["requests_served"] == 4 and out["server_stats"]["tokens_generated"] == 22
