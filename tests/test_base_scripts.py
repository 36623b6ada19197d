"""scripts/base_eval.py and scripts/base_loss.py end to end, in subprocesses, on a tiny checkpoint.

The checkpoint's lm_head is zero, so every logit is 0: the loss of every token is ln(vocab) exactly and the argmax is
always token 0 (a byte that never occurs). That pins the expected numbers: val bpb = log2(V) · counted tokens /
bytes over the loader's own batches, and every language-modeling CORE task scores 0."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, shared_data
from nanochat_jax import gpt
from nanochat_jax.checkpoint import PHASE_DIRS, Checkpointer
from nanochat_jax.dataloader import ShardedLoader
from nanochat_jax.dataset import list_parquet_files, split_files
from nanochat_jax.tokenizer import train_tokenizer
from test_dataloader import _write_shards

STEP = 7


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    base = root / "base"
    docs = _write_shards(root / "shards", n_files=3, docs_per_file=60, rows_per_group=8)
    tok = train_tokenizer((d for fd in docs for d in fd), vocab_size=300)
    tok.save(base / "tokenizer")
    cfg = gpt.GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64,
                        head_dim=32, compute_dtype="float32")
    params = gpt.init_params(cfg, jax.random.key(0))
    params["lm_head"] = jnp.zeros_like(params["lm_head"])
    with Checkpointer(base / PHASE_DIRS["base"] / "d1", async_save=False) as ckpt:
        ckpt.save(STEP, params=params, meta={"model_config": cfg.to_dict()})
    return {"base": base, "shards": root / "shards", "tok": tok, "cfg": cfg}


def _run(script, args, base):
    env = {**os.environ, "NANOCHAT_JAX_BASE_DIR": str(base), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / script), *args], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


def test_base_eval_core(setup):
    bundle = shared_data("core_eval")
    out, summary = _run("base_eval.py", [f"--eval-bundle={bundle}", "--max-per-task=2", "--mesh=2", "--min-bucket=32",
                                         "--batch-tokens=256"], setup["base"])
    csv_path = setup["base"] / "base_eval" / f"base_model_d1_{STEP:06d}.csv"
    assert summary["csv"] == str(csv_path) and summary["step"] == STEP and summary["model_tag"] == "d1"
    assert summary["tasks"] == 21 and summary["missing"] == ["coqa"] and summary["examples"] == 42
    # buckets 32, 64 (the model's sequence_len), then powers of two for the longer 10-shot prompts, scored whole
    assert summary["buckets"][:2] == [32, 64] and len(summary["buckets"]) > 2
    assert 1 <= summary["compilations"] <= len(summary["buckets"])
    assert "WARNING" in out and "CORE (21/22 tasks)" in out and "missing: coqa" in out
    from nanochat_jax.core_eval import load_core_tasks, read_core_csv

    rows = read_core_csv(csv_path)
    tasks = load_core_tasks(bundle)
    assert list(rows) == [t.label for t in tasks if t.label != "coqa"] + ["coqa", "CORE"]
    centered = []
    for t in tasks:
        if t.label == "coqa":
            continue
        acc, cen = rows[t.label]
        assert acc in (0.0, 0.5, 1.0) and cen == pytest.approx((acc - t.random_baseline / 100) /
                                                                (1 - t.random_baseline / 100), abs=1e-6)
        if t.task_type == "language_modeling":
            assert acc == 0.0, t.label  # argmax is always token 0
        centered.append(cen)
    assert rows["CORE"][1] == pytest.approx(np.mean(centered), abs=1e-5)
    assert summary["core_metric"] == pytest.approx(np.mean(centered), abs=1e-5)


def test_base_loss_bpb_and_samples(setup):
    B, T, n_dev, steps = 2, setup["cfg"].sequence_len, 2, 2
    out, summary = _run("base_loss.py", [f"--data-dir={setup['shards']}", f"--device-batch-size={B}",
                                         f"--split-tokens={B * T * n_dev * steps}", "--mesh=2", "--num-samples=3",
                                         "--sample-tokens=5"], setup["base"])
    assert summary["model_tag"] == "d1" and summary["step"] == STEP
    # the same batches the script read: val = the last shard, one reader per device
    tok = setup["tok"]
    files = split_files(list_parquet_files(setup["shards"]), "val")
    with ShardedLoader(tok, B, T, "val", files=files, shard_indices=[0, 1], num_shards=n_dev) as loader:
        targets = np.concatenate([next(loader)["targets"] for _ in range(steps)])
    nbytes = tok.token_bytes()[targets]
    expected = math.log2(tok.vocab_size) * (nbytes > 0).sum() / nbytes.sum()
    assert summary["bpb"]["val"] == pytest.approx(expected, rel=1e-5)
    assert summary["bpb"]["train"] > 0
    result = json.loads(open(summary["json"]).read())
    assert result["bpb"] == summary["bpb"] and len(result["samples"]) == 7 and len(result["unconditioned_samples"]) == 3
    assert result["samples"][0].startswith("<|bos|>The capital of France is")
    assert all(s.startswith("<|bos|>") for s in result["unconditioned_samples"])
    assert "conditioned samples" in out and "unconditioned samples" in out


def test_base_loss_rejects_bad_flags(setup):
    env = {**os.environ, "NANOCHAT_JAX_BASE_DIR": str(setup["base"]), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "base_loss.py"), "--eval=bpb,core"],
                          env=env, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 2 and "--eval must be" in proc.stderr
