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


def test_speedrun_rejects_unknown_flags(tmp_path):
    env = {**os.environ, "NANOCHAT_JAX_EXTRAS": "", "NANOCHAT_JAX_BASE_DIR": str(tmp_path)}
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "speedrun.sh"), "--deepth=20"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown argument: --deepth=20" in out.stderr
