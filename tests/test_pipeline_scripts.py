"""The pipeline drivers: speedrun.sh's stage plan (dry run) and the shell scripts' syntax. cpu_demo.sh itself runs
end to end in CI (`bash scripts/cpu_demo.sh --smoke` in .ci/run)."""

import os
import subprocess

import pytest

from conftest import REPO_ROOT

SCRIPTS = ["speedrun.sh", "cpu_demo.sh", "test.sh", "_env.sh", "_stages.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_shell_syntax(name):
    subprocess.run(["bash", "-n", str(REPO_ROOT / "scripts" / name)], check=True)


def dry_run(tmp_path, *args):
    env = {**os.environ, "NANOCHAT_JAX_EXTRAS": "", "NANOCHAT_JAX_BASE_DIR": str(tmp_path)}
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "speedrun.sh"), "--dry-run", *args], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return {line.split(":", 1)[0].split("] ", 1)[1]: line.split(": ", 1)[1]
            for line in out.stdout.splitlines() if line.startswith("[speedrun] ") and ": " in line
            and not line.startswith("[speedrun] identity")}


def test_speedrun_plan_d24_and_d20_are_one_flag_apart(tmp_path):
    d24, d20 = dry_run(tmp_path), dry_run(tmp_path, "--depth=20")
    order = ["download_first", "tokenizer", "tok_eval", "pretrain", "base_loss", "base_eval", "midtrain",
             "chat_eval_mid", "sft", "chat_eval_sft"]
    assert list(d24) == order and list(d20) == order
    assert "--depth=24 --target-param-data-ratio=8 --device-batch-size=16 --model-tag=d24" in d24["pretrain"]
    assert "--depth=20 --target-param-data-ratio=20 --device-batch-size=32 --model-tag=d20" in d20["pretrain"]
    assert d24["tokenizer"] == d20["tokenizer"]
    with_rl = dry_run(tmp_path, "--rl")
    assert list(with_rl)[-2:] == ["rl", "chat_eval_rl"] and "-a GSM8K" in with_rl["chat_eval_rl"]


@pytest.mark.slow
def test_speedrun_halves_the_device_batch_until_the_memory_estimate_fits(tmp_path):
    # d20 at device batch 32 needs ~55 GB per device (scripts/memory_estimate.py): over a 40 GB card's 36 GB usable,
    # so the recipe halves it; pretraining's gradient accumulation keeps the total batch. A given batch is kept as is.
    d20 = dry_run(tmp_path, "--depth=20", "--gpu=a100-40gb")
    assert "--depth=20 --target-param-data-ratio=20 --device-batch-size=16 --model-tag=d20" in d20["pretrain"]
    d20 = dry_run(tmp_path, "--depth=20", "--gpu=a100-40gb", "--device-batch-size=32")
    assert "--device-batch-size=32" in d20["pretrain"]


def test_speedrun_rejects_unknown_flags(tmp_path):
    env = {**os.environ, "NANOCHAT_JAX_EXTRAS": "", "NANOCHAT_JAX_BASE_DIR": str(tmp_path)}
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "speedrun.sh"), "--deepth=20"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown argument: --deepth=20" in out.stderr


@pytest.mark.slow
def test_cpu_demo_killed_during_pretraining_continues_from_its_last_checkpoint(tmp_path):
    """kill -9 of the whole demo mid-pretraining, then the same command again: finished stages are skipped and
    pretraining continues from its last saved step (the training scripts resume by default)."""
    import signal

    from conftest import shared_data

    shared_data("gutenberg")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_JAX_") and k != "XLA_FLAGS"}
    env["NANOCHAT_JAX_BASE_DIR"] = str(tmp_path)
    cmd = ["bash", str(REPO_ROOT / "scripts" / "cpu_demo.sh"), "--smoke", "--stop-after=pretrain"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    saved, log = [], []
    try:
        for line in proc.stdout:
            log.append(line)
            if "saved checkpoint demo_d2 step" in line:
                saved.append(int(line.split(" step ")[1].split()[0]))
                if len(saved) == 2:  # the first save is committed once the second starts
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert len(saved) == 2, "".join(log)[-3000:]
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[demo] skip tokenizer" in again.stdout
    resumed = [line for line in again.stdout.splitlines() if line.startswith("resumed demo_d2 from step ")]
    assert resumed and int(resumed[0].split()[4]) >= saved[0], again.stdout[-3000:]
    assert "<== pretrain done" in again.stdout and "stopping after pretrain" in again.stdout
