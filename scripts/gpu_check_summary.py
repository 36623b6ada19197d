"""gpu_check.sh's bookkeeping after each step: append the step's record (exit code, time, whether it hit its limit,
the last JSON line it printed, its last lines) to OUT/results.jsonl, then rewrite OUT/summary.md from all records.

    python3 scripts/gpu_check_summary.py OUT NAME EXIT_CODE SECONDS LIMIT STEP_OUTPUT_FILE

Standard library only: it runs with the machine's python3 between steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path


def last_json(text: str):
    """The last line of `text` that parses as a JSON object, or None."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return None


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def train_line(name: str, r: dict) -> str:
    mem, config = r.get("peak_bytes_in_use"), r.get("config", {})
    return (f"| {name} | {r.get('attention')} | {config.get('device_batch_size')} × {config.get('grad_accum', 1)} | "
            f"{_fmt(r.get('step_seconds') and 1e3 * r['step_seconds'])} | {_fmt(r.get('tokens_per_s'), ',.0f')} | "
            f"{_fmt(r.get('mfu_percent'))} | {_fmt(mem and mem / 1e9)} | {_fmt(r.get('compile_seconds'))} |")


def _result(records: dict, step: str) -> dict:
    return (records.get(step) or {}).get("result") or {}


def optimizer_share(records: dict) -> str | None:
    """Muon/AdamW's share of the d20 step: the same micro-batch with 1 and with 4 micro-batches per step takes
    t1 = F + O and t4 = 4F + O, so O = (4 t1 - t4) / 3."""
    t1 = _result(records, "train_d20_cudnn").get("step_seconds")
    t4 = _result(records, "train_d20_cudnn_accum4").get("step_seconds")
    if not t1 or not t4:
        return None
    opt = (4 * t1 - t4) / 3
    return (f"optimizer update ≈ (4·t1 − t4)/3 = {1e3 * opt:.1f} ms = {100 * opt / t1:.1f}% of the d20 step at "
            f"grad-accum 1 ({1e3 * t1:.1f} ms), {100 * opt / t4:.1f}% at grad-accum 4 ({1e3 * t4:.1f} ms)")


def render(records: list[dict], out: Path) -> str:
    by_name = {r["step"]: r for r in records}
    lines = [f"## GPU check ({len(records)} step(s) done)", "",
             "| step | exit | seconds | limit | note |", "|---|---|---|---|---|"]
    for r in records:
        note = "TIMED OUT" if r["timed_out"] else ("ok" if r["rc"] == 0 else (r["tail"][-1:] or ["failed"])[0][:120])
        lines.append(f"| {r['step']} | {r['rc']} | {r['seconds']} | {r['limit']} | {note.replace('|', '/')} |")
    env = _result(by_name, "env")
    if env:
        lines += ["", f"jax {env.get('jax')} on {env.get('devices')} × {env.get('device_kind')}; "
                      f"memory {env.get('memory_gb')} GB; python {env.get('python')}"]
    trains = [(r["step"], r["result"]) for r in records if r["step"].startswith("train_") and r.get("result")]
    if trains:
        lines += ["", "### train step (random tokens; configs in results.jsonl)", "",
                  "| run | attention | batch × accum | ms/step | tokens/s | MFU % | peak GB | compile s |",
                  "|---|---|---|---|---|---|---|---|"] + [train_line(n, r) for n, r in trains]
        share = optimizer_share(by_name)
        if share:
            lines += ["", share]
    infer = _result(by_name, "infer_d20")
    if infer:
        lines += ["", f"### inference d20 ({infer.get('device_kind')}, {infer.get('compute_dtype')})", "",
                  "| batch | TTFT ms | ms/token | decode tok/s | HBM util % |", "|---|---|---|---|---|"]
        for b in infer.get("results", []):
            lines.append(f"| {b.get('batch')} | {_fmt(b.get('ttft_ms'))} | {_fmt(b.get('tpot_ms'), '.2f')} | "
                         f"{_fmt(b.get('decode_tokens_per_s'))} | {_fmt(b.get('bandwidth_util_percent'))} |")
        one = next((b for b in infer.get("results", []) if b.get("batch") == 1), None)
        if one and one.get("bandwidth_util_percent") is not None:
            util = one["bandwidth_util_percent"]
            lines += ["", f"d20 batch-1 decode HBM bandwidth utilisation: {util:.1f}% "
                          f"({'meets' if util >= 70 else 'below'} issue 16's 70%)"]
    table = out / "attention.md"
    if table.exists():
        lines += ["", "### attention", "", table.read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Record one gpu_check.sh step and rewrite OUT/summary.md.")
    parser.add_argument("out", help="gpu_check.sh's output directory")
    parser.add_argument("name", help="the step's name")
    parser.add_argument("rc", type=int, help="the step's exit code (124/137: killed at its limit)")
    parser.add_argument("seconds", type=int, help="how long the step ran")
    parser.add_argument("limit", type=int, help="the step's limit in seconds")
    parser.add_argument("step_output", help="file holding the step's output")
    args = parser.parse_args(argv)
    out = Path(args.out)
    text = Path(args.step_output).read_text(errors="replace") if os.path.exists(args.step_output) else ""
    record = {"step": args.name, "rc": args.rc, "seconds": args.seconds, "limit": args.limit,
              "timed_out": args.rc in (124, 137), "result": last_json(text),
              "tail": [line[:300] for line in text.splitlines()[-3:]]}
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    (out / ".summary.md.tmp").write_text(render(records, out))
    os.replace(out / ".summary.md.tmp", out / "summary.md")


if __name__ == "__main__":
    main(sys.argv[1:])
