"""Report card: sections in, report.md with the Metric × {BASE, MID, SFT, RL} table and plots out."""

import json
import os
import stat
import subprocess
import sys

import pytest

from nanochat_jax.report import Report, format_value, read_scalars, slugify

FAKE_ENV = {"platform": "Linux test", "cpus": 2, "python": "3.12", "jax": "0.0", "jaxlib": "0.0", "backend": "gpu",
            "device_kind": "NVIDIA H100 80GB HBM3", "device_count": 8, "process_count": 1, "gpu_hourly_rate": 3.0}


def fixture_report(tmp_path, start_offset_s=3 * 3600 + 51 * 60):
    r = Report(tmp_path / "report")
    r.reset(env=FAKE_ENV)
    # Pretend the run started 3h51m before the sections were logged.
    head = json.loads((r.dir / "header.json").read_text())
    head["started"] -= start_offset_s
    (r.dir / "header.json").write_text(json.dumps(head))
    r.log("Base model training", {"depth": 20, "parameters": 560_988_160, "MFU %": 47.5, "min val bpb": 0.8123})
    r.log("Base model evaluation", {"CORE": 0.2219, "hellaswag": 0.31})
    r.log("Chat evaluation mid", {"ARC-Easy": 0.3561, "ARC-Challenge": 0.2875, "MMLU": 0.3111, "GSM8K": 0.025,
                                  "HumanEval": 0.0671, "ChatCORE": 0.0730})
    r.log("Chat evaluation sft", [{"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455,
                                   "HumanEval": 0.0854, "SpellingBee": 0.9844, "ChatCORE": 0.0884},
                                  "a sample: 2+2=4"])
    r.log("Chat evaluation rl", {"GSM8K": 0.0758})
    return r


def test_summary_table_matches_the_reference_layout(tmp_path):
    r = fixture_report(tmp_path)
    text = r.generate(plots=False).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == "| Metric | BASE | MID | SFT | RL |"
    # CORE first, ChatCORE last, the others alphabetical; '-' where a stage did not measure the metric.
    assert [row.split(" | ")[0][2:] for row in rows[1:]] == [
        "CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "SpellingBee", "ChatCORE"]
    assert "| CORE | 0.2219 | - | - | - |" in rows
    assert "| SpellingBee | - | - | 0.9844 | - |" in rows  # chat_eval's task name, as for the others
    assert "| GSM8K | - | 0.0250 | 0.0455 | 0.0758 |" in rows
    assert "| ChatCORE | - | 0.0730 | 0.0884 | - |" in rows
    # Sections in pipeline order, formatted like the reference; strings kept as paragraphs.
    assert text.index("## Base model training") < text.index("## Base model evaluation") < \
        text.index("## Chat evaluation mid") < text.index("## Chat evaluation sft") < text.index("## Summary")
    assert "- parameters: 560,988,160" in text and "- depth: 20" in text and "- MFU %: 47.5000" in text
    assert "a sample: 2+2=4" in text
    # Wall clock: header start → last non-RL section (3h51m by construction), cost at 8 × $3/h.
    assert "Total wall clock time: 3h51m" in text
    assert "Estimated cost: $92." in text  # 3.85 h × $24/h = $92.4 (the reference's own number)
    assert "- Commit: " in text and "Devices: 8 × NVIDIA H100" in text


def test_partial_core_is_labelled_with_its_task_count(tmp_path):
    r = fixture_report(tmp_path)
    # what scripts/base_eval.py logs when the bundle lacks coqa
    r.log("Base model evaluation", [{"model": "d20 step 21400", "tasks": 21, "missing": "coqa", "CORE": 0.2219},
                                    {"hellaswag": 0.31}])
    rows = [line for line in r.generate(plots=False).read_text().splitlines() if line.startswith("| ")]
    assert "| CORE (21/22 tasks) | 0.2219 | - | - | - |" in rows
    r.log("Base model evaluation", [{"tasks": 22, "missing": "none", "CORE": 0.2219}])
    assert "| CORE | 0.2219 | - | - | - |" in r.generate(plots=False).read_text().splitlines()


def test_summary_always_has_a_cost_line(tmp_path):
    cpu = {k: v for k, v in FAKE_ENV.items() if k != "gpu_hourly_rate"} | {"backend": "cpu", "device_kind": "cpu",
                                                                          "device_count": 1}
    r = Report(tmp_path / "report")
    r.reset(env=cpu)
    text = r.generate(plots=False).read_text()  # no sections yet: no wall clock either
    assert "Estimated cost: n/a (no hourly rate for cpu)" in text
    r.log("Base model evaluation", {"CORE": 0.1})
    summary = r.generate(plots=False).read_text().split("## Summary")[1]
    assert "Total wall clock time: 0h0m" in summary and "Estimated cost: n/a (no hourly rate for cpu)" in summary
    r.reset(env=FAKE_ENV)  # a known rate but nothing logged yet
    assert "Estimated cost: n/a (no wall clock time" in r.generate(plots=False).read_text()


def test_cli_report_on_cpu_has_a_cost_line(tmp_path):
    """`reset` records the real (CPU) environment, which has no hourly rate; report.md still says so."""
    env = dict(os.environ, NANOCHAT_JAX_BASE_DIR=str(tmp_path / "base"), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "nanochat_jax.report"]
    subprocess.run(cmd + ["reset"], check=True, capture_output=True, env=env)
    subprocess.run(cmd + ["generate", "--copy-to="], check=True, capture_output=True, env=env)
    text = (tmp_path / "base" / "report" / "report.md").read_text()
    assert "Estimated cost: n/a (no hourly rate for cpu)" in text.split("## Summary")[1]


def test_relogging_a_section_replaces_it_and_reset_clears(tmp_path):
    r = fixture_report(tmp_path)
    r.log("Base model evaluation", {"CORE": 0.25})
    order, table = r.summary_table()
    assert table["CORE"] == {"BASE": 0.25}
    assert sum(s["section"] == "Base model evaluation" for s in r.sections()) == 1
    r.reset(env=FAKE_ENV)
    assert r.sections() == [] and r.summary_table() == ([], {})


def test_format_and_slug():
    assert format_value(0.123456) == "0.1235"
    assert format_value(9999) == "9999" and format_value(12345) == "12,345"
    assert format_value(True) == "True"
    assert slugify("Chat evaluation sft") == "chat-evaluation-sft"


def test_plots_from_tensorboard_scalars(tmp_path):
    pytest.importorskip("matplotlib")
    from tensorboard.summary import Writer

    run = tmp_path / "runs" / "d2"
    w = Writer(str(run))
    for step in range(5):
        w.add_scalar("train/loss", 5.0 - step * 0.5, step=step)
    w.add_scalar("val/bpb", 2.5, step=0)
    w.add_scalar("val/bpb", 2.0, step=4)
    w.flush()
    w.close()
    assert read_scalars(run, ["train/loss", "val/bpb"]) == {
        "train/loss": [(0, 5.0), (1, 4.5), (2, 4.0), (3, 3.5), (4, 3.0)], "val/bpb": [(0, 2.5), (4, 2.0)]}

    r = Report(tmp_path / "report")
    r.reset(env=FAKE_ENV)
    r.log("Base model training", {"depth": 2}, run_dir=run)
    old_umask = os.umask(0o022)
    try:
        text = r.generate(copy_to=tmp_path).read_text()
    finally:
        os.umask(old_umask)
    for name in ("base-model-training-train-loss.png", "base-model-training-val-bpb.png"):
        png = r.dir / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name})" in text
        assert stat.S_IMODE(png.stat().st_mode) == 0o644, oct(png.stat().st_mode)  # not mkstemp's 0600
    assert (tmp_path / "report.md").read_text() == text
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644


def test_report_files_get_the_umask_mode(tmp_path):
    old_umask = os.umask(0o027)
    try:
        r = fixture_report(tmp_path)
        path = r.generate(plots=False)
    finally:
        os.umask(old_umask)
    for p in (path, r.dir / "header.json", r.dir / "base-model-evaluation.md"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, (p, oct(p.stat().st_mode))


def test_cli_reset_and_generate(tmp_path):
    cmd = [sys.executable, "-m", "nanochat_jax.report"]
    rd = str(tmp_path / "rep")
    subprocess.run(cmd + ["reset", f"--report-dir={rd}"], check=True, capture_output=True)
    Report(rd).log("Base model evaluation", {"CORE": 0.1})
    out = subprocess.run(cmd + ["generate", f"--report-dir={rd}", f"--copy-to={tmp_path}"], check=True,
                         capture_output=True, text=True).stdout
    assert "| CORE | 0.1000 | - | - | - |" in out
    assert "JAX: " in (tmp_path / "report.md").read_text()
