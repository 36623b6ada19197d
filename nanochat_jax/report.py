"""The report card and the runs' TensorBoard scalars it plots.

    python -m nanochat_jax.report reset       # new run: header with git, hardware, software, cost rate
    ... each stage calls get_report().log("Base model training", {...}, run_dir=...) ...
    python -m nanochat_jax.report generate    # report.md (+ loss/bpb PNGs) under <base>/report, copied to cwd

Under `<base_dir>/report/`: `header.json`/`.md`, a `<slug>.json` + `.md` per section, `report.md` and `plots/`; the
JSON files are the source of truth, every file is written atomically. The summary table (Metric × BASE/MID/SFT/RL)
counts wall clock from the header to the last non-RL section, as the reference does, then the estimated cost.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from nanochat_jax.common import atomic_write, format_duration, get_base_dir, process_index

# Sections in report order. `column` says which summary-table column a section's metrics fill.
SECTIONS = [("Tokenizer training", None), ("Tokenizer evaluation", None), ("Base model training", None),
            ("Base model loss", None), ("Base model evaluation", "BASE"), ("Midtraining", None),
            ("Chat evaluation mid", "MID"), ("Chat SFT", None), ("Chat evaluation sft", "SFT"), ("Chat RL", None),
            ("Chat evaluation rl", "RL")]
COLUMNS = ("BASE", "MID", "SFT", "RL")
# Metric name in the table → key in a section's data (chat evals log task names as keys).
TABLE_METRICS = ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "SpellingBee", "ChatCORE"]
# Tasks in the full CORE benchmark (the eval bundle's core.yaml); a CORE over fewer is labelled "CORE (k/22 tasks)".
CORE_TASKS = 22

# $ per GPU-hour used for the cost estimate (the reference's rates; H200 is our assumption, same as H100).
GPU_HOURLY_RATE = {"H100": 3.00, "H200": 3.00, "A100": 1.79, "A800": 1.79, "V100": 0.55}
DEFAULT_HOURLY_RATE = 2.00

# Scalars plotted from each training section's TensorBoard run dir (tag → plot title).
PLOT_TAGS = {"train/loss": "training loss", "val/bpb": "validation bits per byte", "rl/reward": "mean reward"}


def slugify(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def format_value(v) -> str:
    """The reference's style: floats with 4 decimals, ints ≥ 10,000 with thousands separators."""
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _json_default(o):
    try:  # numpy / jax scalars
        return o.item()
    except AttributeError:
        return str(o)


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_info() -> dict:
    return {"branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"]) or "unknown",
            "commit": _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
            "dirty": bool(_run(["git", "status", "--porcelain"])),
            "message": _run(["git", "log", "-1", "--pretty=%s"])}


def bloat() -> dict:
    """Size of the code a reader has to read: the package, kernels and scripts."""
    root = Path(__file__).resolve().parent.parent
    files = [p for d in ("nanochat_jax", "kernels", "scripts") for p in sorted((root / d).rglob("*"))
             if p.suffix in (".py", ".sh", ".html", ".js", ".css") and "__pycache__" not in p.parts]
    chars = lines = 0
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        chars, lines = chars + len(text), lines + text.count("\n")
    return {"files": len(files), "lines": lines, "chars": chars, "tokens": chars // 4}


def _bloat_lines(b: dict) -> list[str]:
    return [f"- Characters: {b['chars']:,}", f"- Lines: {b['lines']:,}", f"- Files: {b['files']:,}",
            f"- Tokens (approx): {b['tokens']:,}"]


def hourly_rate(device_kind: str) -> float:
    return next((rate for name, rate in GPU_HOURLY_RATE.items() if name in device_kind.upper()), DEFAULT_HOURLY_RATE)


def environment() -> dict:
    """Hardware and software facts for the header (JAX imported here: reports run after the stages)."""
    import jax
    import jaxlib

    devices = jax.devices()
    kind = devices[0].device_kind if devices else "none"
    env = {"platform": f"{platform.system()} {platform.release()}", "cpus": os.cpu_count(),
           "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "backend": jax.default_backend(), "device_kind": kind, "device_count": jax.device_count(),
           "process_count": jax.process_count()}
    with contextlib.suppress(ValueError, OSError, AttributeError):
        env["ram_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    if env["backend"] == "gpu":
        env["gpu_hourly_rate"] = hourly_rate(kind)
        stats = devices[0].memory_stats() or {}
        if "bytes_limit" in stats:
            env["gpu_memory_gb"] = round(stats["bytes_limit"] / 2**30, 1)
    return env


class Report:
    def __init__(self, report_dir: str | os.PathLike):
        self.dir = Path(report_dir)

    def reset(self, env: dict | None = None) -> Path:
        """Start a new report: remove old sections and write the header (git, hardware, software, bloat)."""
        if self.dir.exists():
            for p in self.dir.iterdir():
                if p.suffix in (".md", ".json") or p.name == "plots":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        header = {"started": time.time(), "git": git_info(), "env": environment() if env is None else env,
                  "bloat": bloat()}
        _write_text(self.dir / "header.json", json.dumps(header, indent=2, default=_json_default))
        _write_text(self.dir / "header.md", self._header_md(header))
        return self.dir / "header.md"

    def log(self, section: str, data: dict | list, *, run_dir: str | os.PathLike | None = None) -> Path:
        """Write one section (replacing an earlier one of the same name). `data` is a dict, or a list of dicts
        and strings (strings become paragraphs, e.g. generated samples). `run_dir`: a TensorBoard log dir whose
        scalars are plotted in the report."""
        self.dir.mkdir(parents=True, exist_ok=True)
        items = [data] if isinstance(data, dict) else list(data)
        record = {"section": section, "timestamp": time.time(), "items": items,
                  "run_dir": None if run_dir is None else str(run_dir)}
        slug = slugify(section)
        _write_text(self.dir / f"{slug}.json", json.dumps(record, indent=2, default=_json_default))
        _write_text(self.dir / f"{slug}.md", self._section_md(record))
        return self.dir / f"{slug}.md"

    def header(self) -> dict | None:
        p = self.dir / "header.json"
        return json.loads(p.read_text()) if p.exists() else None

    def sections(self) -> list[dict]:
        """Logged sections, known ones in the reference's order, then any others by time."""
        found = [json.loads(p.read_text()) for p in self.dir.glob("*.json") if p.name != "header.json"]
        order = {name: i for i, (name, _) in enumerate(SECTIONS)}
        return sorted(found, key=lambda r: (order.get(r["section"], len(order)), r["timestamp"]))

    def metrics(self, record: dict) -> dict:
        return {k: v for item in record["items"] if isinstance(item, dict) for k, v in item.items()}

    def summary_table(self) -> tuple[list[str], dict[str, dict[str, float]]]:
        """(metric names in display order, {metric: {column: value}}) from the sections' logged numbers."""
        columns = dict(SECTIONS)
        table: dict[str, dict[str, float]] = {}
        for rec in self.sections():
            col = columns.get(rec["section"])
            if col is None:
                continue
            for k, v in self.metrics(rec).items():
                if k in TABLE_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool):
                    table.setdefault(k, {})[col] = float(v)
        middle = sorted(m for m in table if m not in ("CORE", "ChatCORE"))
        order = [m for m in ["CORE"] + middle + ["ChatCORE"] if m in table]
        return order, table

    def row_label(self, metric: str) -> str:
        """The summary row's name: CORE says how many tasks it covers when the base eval scored fewer than all 22
        (scripts/base_eval.py logs "tasks", e.g. 21 when the bundle lacks coqa)."""
        base = [self.metrics(r).get("tasks") for r in self.sections() if dict(SECTIONS).get(r["section"]) == "BASE"]
        if metric == "CORE" and base and isinstance(base[0], int) and base[0] < CORE_TASKS:
            return f"CORE ({base[0]}/{CORE_TASKS} tasks)"
        return metric

    def wall_clock_seconds(self) -> float | None:
        """Header start → last non-RL section (the reference leaves RL out of the headline time)."""
        head = self.header()
        stamps = [r["timestamp"] for r in self.sections() if "RL" not in r["section"] and " rl" not in r["section"]]
        return max(stamps) - head["started"] if head and stamps else None

    def generate(self, copy_to: str | os.PathLike | None = None, plots: bool = True) -> Path:
        """Write report.md (header, sections, plots, summary) and optionally copy it to `copy_to`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        head = self.header()
        parts = [self._header_md(head) if head else "# nanochat-jax report\n\n(no header: run `reset` first)\n"]
        for rec in self.sections():
            parts.append(self._section_md(rec))
            if plots and rec.get("run_dir"):
                for rel in self._plot(rec):
                    parts.append(f"![{rec['section']}]({rel})\n")
        parts.append(self._summary_md(head))
        path = self.dir / "report.md"
        _write_text(path, "\n".join(parts))
        if copy_to is not None:
            _write_text(Path(copy_to) / "report.md", path.read_text(encoding="utf-8"))
        return path

    def _header_md(self, head: dict) -> str:
        g, env = head["git"], head["env"]
        started = datetime.fromtimestamp(head["started"]).strftime("%Y-%m-%d %H:%M:%S")
        lines = ["# nanochat-jax training report", "", f"Generated: {datetime.now():%Y-%m-%d %H:%M:%S}", "",
                 "## Environment", "", "### Git",
                 f"- Branch: {g['branch']}", f"- Commit: {g['commit']}{' (dirty)' if g['dirty'] else ''}",
                 f"- Message: {g['message']}", "", "### Hardware",
                 f"- Platform: {env.get('platform', '?')}", f"- CPUs: {env.get('cpus', '?')}"]
        if "ram_gb" in env:
            lines.append(f"- Memory: {env['ram_gb']} GB")
        lines.append(f"- Devices: {env.get('device_count', '?')} × {env.get('device_kind', '?')} "
                     f"({env.get('backend', '?')}, {env.get('process_count', 1)} process(es))")
        if "gpu_memory_gb" in env:
            lines.append(f"- GPU memory per device: {env['gpu_memory_gb']} GiB")
        if "gpu_hourly_rate" in env:
            lines.append(f"- Hourly rate: ${env['gpu_hourly_rate']:.2f}/GPU-hour × {env['device_count']} = "
                         f"${env['gpu_hourly_rate'] * env['device_count']:.2f}/hour")
        lines += ["", "### Software", f"- Python: {env.get('python', '?')}",
                  f"- JAX: {env.get('jax', '?')} (jaxlib {env.get('jaxlib', '?')})", "",
                  "### Bloat", *_bloat_lines(head["bloat"]), "", f"Run started: {started}", "", "---", ""]
        return "\n".join(lines)

    def _section_md(self, rec: dict) -> str:
        when = datetime.fromtimestamp(rec["timestamp"]).strftime("%Y-%m-%d %H:%M:%S")
        lines = [f"## {rec['section']}", f"timestamp: {when}", ""]
        for item in rec["items"]:
            if isinstance(item, dict):
                lines += [f"- {k}: {format_value(v)}" for k, v in item.items()]
            else:
                lines += ["", str(item), ""]
        return "\n".join(lines) + "\n"

    def _summary_md(self, head: dict | None) -> str:
        order, table = self.summary_table()
        lines = ["## Summary", ""]
        if head:
            lines += [*_bloat_lines(head["bloat"]), ""]
        if order:
            lines += ["| Metric | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
            for m in order:
                # + 0.0: no "-0.0000"
                cells = [f"{round(table[m][c], 4) + 0.0:.4f}" if c in table[m] else "-" for c in COLUMNS]
                lines.append(f"| {self.row_label(m)} | " + " | ".join(cells) + " |")
            lines.append("")
        secs = self.wall_clock_seconds()
        env = (head or {}).get("env", {})
        if secs is not None:
            h, m = int(secs // 3600), int(secs % 3600 // 60)
            lines.append(f"Total wall clock time: {h}h{m}m")
        # always a cost line (the README promises one): a $ figure needs both the time and an hourly rate
        if "gpu_hourly_rate" not in env:
            lines.append(f"Estimated cost: n/a (no hourly rate for {env.get('device_kind', 'unknown devices')})")
        elif secs is None:
            lines.append("Estimated cost: n/a (no wall clock time: no sections logged after the header)")
        else:
            rate = env["gpu_hourly_rate"] * env.get("device_count", 1)
            lines.append(f"Estimated cost: ${secs / 3600 * rate:.2f} ({format_duration(secs)} at ${rate:.2f}/hour)")
        return "\n".join(lines) + "\n"

    def _plot(self, rec: dict) -> list[str]:
        """PNG line plots of the section's TensorBoard scalars; returns paths relative to the report dir."""
        curves = read_scalars(rec["run_dir"], list(PLOT_TAGS))
        if not curves:
            return []
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: skipping plots (pip install matplotlib)", file=sys.stderr)
            return []
        out = []
        (self.dir / "plots").mkdir(exist_ok=True)
        for tag, points in curves.items():
            fig, ax = plt.subplots(figsize=(6, 3.5))
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
            ax.set_xlabel("step")
            ax.set_ylabel(tag)
            ax.set_title(f"{rec['section']}: {PLOT_TAGS.get(tag, tag)}")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            rel = f"plots/{slugify(rec['section'])}-{slugify(tag)}.png"
            with atomic_write(self.dir / rel) as f:
                fig.savefig(f, format="png", dpi=120)
            plt.close(fig)
            out.append(rel)
        return out


def read_scalars(logdir: str | os.PathLike, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TensorBoard event files in `logdir` (the last value per step wins,
    so a resumed run's overlap is not plotted twice)."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    by_tag: dict[str, dict[int, float]] = {}
    for events in sorted(logdir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        have = acc.Tags()
        for tag in tags:
            if tag in have.get("tensors", []):  # tensorboard.summary.Writer stores scalars as tensors
                for ev in acc.Tensors(tag):
                    by_tag.setdefault(tag, {})[ev.step] = float(tensor_util.make_ndarray(ev.tensor_proto))
            elif tag in have.get("scalars", []):
                for ev in acc.Scalars(tag):
                    by_tag.setdefault(tag, {})[ev.step] = float(ev.value)
    return {tag: sorted(points.items()) for tag, points in by_tag.items() if points}


def run_dir(model_tag: str) -> Path:
    """A run's TensorBoard folder (a report section's `run_dir`, whose scalars it plots)."""
    return get_base_dir() / "runs" / model_tag


class ScalarLog:
    """TensorBoard scalars of a run: log(step, **{"train/loss": ...}); process 0 only, nothing when logdir is None."""

    def __init__(self, logdir):
        self.writer = None
        if process_index() == 0 and logdir:
            from tensorboard.summary import Writer

            self.writer = Writer(str(logdir))

    def __call__(self, step: int, **scalars):
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, float(v), step=step)

    def close(self):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def get_report(report_dir: str | os.PathLike | None = None) -> Report:
    """The run's report (under the base dir). Only process 0 should write: callers check that."""
    return Report(report_dir or get_base_dir() / "report")


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="nanochat-jax report card")
    ap.add_argument("command", choices=["reset", "generate"],
                    help="reset: start a new report (system info, timestamp); generate: assemble report.md")
    ap.add_argument("--report-dir", default=None, help="default: <base_dir>/report")
    ap.add_argument("--copy-to", default=".", help="also copy report.md here (generate); '' to skip")
    ap.add_argument("--no-plots", action="store_true", help="skip the loss/metric plots (generate)")
    args = ap.parse_args(argv)
    report = get_report(args.report_dir)
    if args.command == "reset":
        print(f"wrote {report.reset()}")
    else:
        path = report.generate(copy_to=args.copy_to or None, plots=not args.no_plots)
        print(path.read_text(encoding="utf-8"))
        print(f"wrote {path}" + (f" and {Path(args.copy_to) / 'report.md'}" if args.copy_to else ""))


if __name__ == "__main__":
    from nanochat_jax.common import run_main

    run_main(main)
