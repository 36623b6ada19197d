"""`--help` of every script documents every flag: each script is run in-process with --help (argparse prints and
exits before any model or data is touched), and the parser it built is checked option by option."""

import argparse
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scripts").glob("*.py")) + [
    "kernels/bench_attention.py", "tools/make_golden.py", "nanochat_jax/dataset.py", "nanochat_jax/report.py"]


def run_help(monkeypatch, capsys, path: str):
    """Run `python <path> --help` in this process; returns (the parsers it built, what it printed)."""
    parsers = []
    parse_known_args = argparse.ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return parse_known_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    monkeypatch.setattr(sys, "argv", [str(ROOT / path), "--help"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / path), run_name="__main__")
    assert exit_info.value.code in (0, None), f"{path} --help exited with {exit_info.value.code}"
    return parsers, capsys.readouterr().out


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_every_flag_has_help(monkeypatch, capsys, path):
    parsers, out = run_help(monkeypatch, capsys, path)
    assert parsers, f"{path} --help built no argparse parser"
    undocumented = [a.option_strings[0] if a.option_strings else a.dest for p in parsers for a in p._actions
                    if not (a.help or "").strip()]
    assert not undocumented, f"{path}: flags without help text: {undocumented}"
    for action in parsers[0]._actions:  # what the user sees: each option with (the start of) its text
        if action.option_strings:
            assert action.option_strings[-1] in out, (path, action.option_strings)
            first_word = action.help.split()[0]
            assert first_word in out, (path, action.option_strings, first_word)


def test_config_flags_resolve_to_field_help(capsys):
    """parse_flags takes the help from the field (`flag(default, help)`), and `--help` prints it with the default."""
    from dataclasses import dataclass

    from nanochat_jax.config import flag, parse_flags

    @dataclass(frozen=True)
    class Demo:
        width_mult: int = flag(3, "how much wider")

    assert parse_flags(Demo, ["--width-mult=5"]).width_mult == 5
    with pytest.raises(SystemExit):
        parse_flags(Demo, ["--help"], prog="demo")
    assert "how much wider (default: 3)" in " ".join(capsys.readouterr().out.split())
