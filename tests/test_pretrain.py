"""Pretraining end to end on CPU: a tiny run learns, resume is exact, and two processes equal one."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from nanochat_jax import pretrain, report, train
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.common import UserError
from test_dataloader import _write_shards
from nanochat_jax.tokenizer import train_tokenizer

TINY = dict(depth=2, aspect_ratio=64, head_dim=32, max_seq_len=64, device_batch_size=2, total_batch_size=2 * 64 * 2 * 2,
            eval_tokens=2 * 64 * 2 * 2, sample_every=-1, warmup_steps=0, mesh=2, matrix_lr=0.05, embedding_lr=0.5,
            unembedding_lr=0.02)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    docs = _write_shards(root / "shards", n_files=3, docs_per_file=200, rows_per_group=8)
    tok = train_tokenizer((d for fd in docs for d in fd), vocab_size=400)
    tok.save(root / "tok")
    return str(root / "shards"), str(root / "tok")


def _cfg(data, **kw):
    return pretrain.PretrainConfig(data_dir=data[0], tokenizer_dir=data[1], **{**TINY, **kw})


def test_tiny_pretraining_learns_and_checkpoints(data):
    loop = pretrain.pretrain(_cfg(data, num_iterations=30, eval_every=30, save_every=-1, profile_steps="2:4"))
    losses = [loss for _, loss in loop.history]
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0, losses
    assert loop.val_bpb is not None and loop.val_bpb < 10
    with Checkpointer(checkpoint_dir("base", "d2")) as ckpt:
        assert ckpt.latest_step() == 30
        meta = ckpt.read_meta()
    assert meta["model_config"]["n_layer"] == 2 and meta["num_iterations"] == 30 and "loader_state" in meta
    run = report.run_dir("d2")
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard scalars"
    assert list((run / "profile").rglob("*.xplane.pb")), "profiler trace of steps 2..3"
    section = json.loads((run.parent.parent / "report" / "base-model-training.json").read_text())["items"][0]
    assert section["iterations"] == 30 and section["min val bpb"] == loop.min_val_bpb


@pytest.mark.slow
def test_resume_is_exact(data):
    full = pretrain.pretrain(_cfg(data, num_iterations=8, eval_every=-1, save_every=4, model_tag="r"))
    resumed = pretrain.pretrain(_cfg(data, num_iterations=8, eval_every=-1, save_every=4, model_tag="r",
                                  resume_from_step=4))
    # Same compiled program, same restored state and loader position, same host: bit-identical losses.
    assert [loss for s, loss in full.history if s >= 4] == [loss for _, loss in resumed.history]
    assert [s for s, _ in resumed.history] == [4, 5, 6, 7]
    with pytest.raises(UserError, match="other settings .*n_layer: 2 → 3"):
        pretrain.pretrain(_cfg(data, num_iterations=8, eval_every=-1, model_tag="r", resume=True, depth=3))


@pytest.mark.slow
def test_rerun_continues_and_never_overwrites(data):
    """A second run of the same tag continues from its latest checkpoint (the default); one whose settings differ,
    or that asks to start fresh over existing checkpoints, is refused with a one-line reason, and nothing is lost."""
    cut = pretrain.pretrain(_cfg(data, num_iterations=4, eval_every=-1, save_every=2, model_tag="a"))
    with Checkpointer(checkpoint_dir("base", "a")) as ckpt:
        ckpt._mngr.delete(4)  # as if it crashed after saving step 2
    again = pretrain.pretrain(_cfg(data, num_iterations=4, eval_every=-1, save_every=2, model_tag="a"))
    assert [s for s, _ in again.history] == [2, 3]
    assert [loss for _, loss in again.history] == [loss for s, loss in cut.history if s >= 2]
    with pytest.raises(UserError, match=r"already holds checkpoints \(steps \[2, 4\]\).*--resume=0"):
        pretrain.pretrain(_cfg(data, num_iterations=4, eval_every=-1, model_tag="a", resume=False))
    with pytest.raises(UserError, match="num_iterations: 4 → 6"):
        pretrain.pretrain(_cfg(data, num_iterations=6, eval_every=-1, model_tag="a"))
    with Checkpointer(checkpoint_dir("base", "a")) as ckpt:
        assert ckpt.all_steps() == [2, 4]
    with pytest.raises(UserError, match="--resume: no checkpoint"):
        pretrain.pretrain(_cfg(data, num_iterations=4, eval_every=-1, model_tag="fresh", resume=True))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_script(args, env_extra, base_dir):
    env = {**os.environ, "NANOCHAT_JAX_BASE_DIR": str(base_dir), "JAX_PLATFORMS": "cpu", **env_extra}
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "pretrain.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(base_dir, tag="d2"):
    """The losses of the latest run of `tag` (stage.finish appends one line per run)."""
    lines = (base_dir / "runs" / tag / "history.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["losses"]


@pytest.mark.slow
def test_two_processes_match_one(data, tmp_path):
    """jax.distributed for real: 2 processes × 4 CPU devices on 127.0.0.1 give the losses of 1 process × 8, and a
    2-process run resumed from a checkpoint continues exactly (every process's loader position is in it)."""
    args = [f"--data-dir={data[0]}", f"--tokenizer-dir={data[1]}", "--depth=2", "--aspect-ratio=64", "--head-dim=32",
            "--max-seq-len=64", "--device-batch-size=2", f"--total-batch-size={2 * 64 * 8}", "--num-iterations=4",
            "--eval-every=-1", f"--eval-tokens={2 * 64 * 8}", "--sample-every=-1", "--warmup-steps=0",
            "--save-every=-1",
            "--mesh=-1"]
    port = _free_port()
    procs = []
    try:  # SIGKILL on the way out: jax.distributed catches SIGTERM (preemption notice) and would keep running
        one = _run_script(args, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, tmp_path / "one")
        procs.append(one)
        out_one, _ = one.communicate(timeout=600)
        assert one.returncode == 0, out_one[-3000:]
        one_l = _losses(tmp_path / "one")
        def two_processes(extra, port):
            run = [_run_script(args + extra, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                              "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                              "JAX_PROCESS_ID": str(i)}, tmp_path / "two") for i in range(2)]
            procs.extend(run)
            return run, [p.communicate(timeout=600)[0] for p in run]

        two, outs = two_processes(["--save-every=2"], port)
        two_l = _losses(tmp_path / "two")
        resumed, resumed_outs = two_processes(["--resume-from-step=2"], _free_port())
        resumed_l = _losses(tmp_path / "two")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(two + resumed, outs + resumed_outs):
        assert p.returncode == 0, out[-3000:]
    assert "8 × cpu (2 process(es))" in outs[0]
    assert [s for s, _ in one_l] == [s for s, _ in two_l] == [0, 1, 2, 3]
    for (_, a), (_, b) in zip(one_l, two_l):
        assert abs(a - b) <= 1e-5 * abs(a), (one_l, two_l)  # same batches; only cross-process reduction order differs
    assert resumed_l == [[s, loss] for s, loss in two_l if s >= 2]


@pytest.mark.slow
def test_core_metric_during_training(data):
    """--core-metric-every: CORE (2 examples of each of the 21 local tasks) at step 0 and at the end (~40-90 s: every
    length bucket compiles once)."""
    from conftest import shared_data

    bundle = shared_data("core_eval")
    loop = pretrain.pretrain(_cfg(data, num_iterations=2, eval_every=-1, model_tag="core", core_metric_every=2,
                               core_metric_max_per_task=2, eval_bundle=str(bundle)))
    assert loop.core_metric is not None and -1.0 <= loop.core_metric <= 1.0
    section = json.loads((report.run_dir("core").parent.parent / "report" / "base-model-training.json").read_text())
    assert section["items"][0]["CORE estimate"] == loop.core_metric


def test_periodic_samples_reuse_one_engine(data, capsys, monkeypatch):
    """--sample-every: greedy samples of the fixed prompts through one Engine for the whole run (its compiled prefill
    and decode reused, its params replaced at each sampling)."""
    made = []

    class CountedEngine(pretrain.Engine):
        def __init__(self, *a, **k):
            made.append(self)
            super().__init__(*a, **k)

    monkeypatch.setattr(pretrain, "Engine", CountedEngine)
    pretrain.pretrain(_cfg(data, num_iterations=4, eval_every=-1, sample_every=2, model_tag="smp", resume=False))
    out = capsys.readouterr().out
    assert out.count("  sample: ") == 2 * len(train.SAMPLE_PROMPTS)  # steps 2 and 4
    assert len(made) == 1 and [k[0] for k in made[0].compilations] == ["prefill", "decode"]
