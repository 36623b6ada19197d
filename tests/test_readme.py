"""The README's command blocks run as printed. Every ```bash block carries a marker on the line before it:
`<!-- readme-test: run -->` (run here, on CPU, from the repo root in a fresh base dir) or
`<!-- readme-test: skip (why) -->` (e.g. it needs 8 GPUs, or .ci/run runs it itself)."""

import os
import re
import subprocess

import pytest

from conftest import REPO_ROOT, shared_data

MARKER = re.compile(r"<!-- readme-test: (run|skip \(.+\)) -->")


def readme_blocks():
    """[(marker, code)] for every ```bash block of README.md; marker None when the line before it has none."""
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            m = MARKER.fullmatch(lines[i - 1].strip()) if i else None
            end = lines.index("```", i + 1)
            blocks.append((m.group(1) if m else None, "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


def test_every_command_block_says_whether_it_is_tested():
    blocks = readme_blocks()
    assert blocks and any(marker == "run" for marker, _ in blocks)
    unmarked = [code.splitlines()[0] for marker, code in blocks if marker is None]
    assert not unmarked, f"README blocks without a readme-test marker: {unmarked}"


@pytest.mark.slow
@pytest.mark.parametrize("index", [i for i, (marker, _) in enumerate(readme_blocks()) if marker == "run"])
def test_readme_block_runs_as_printed(index, tmp_path):
    shared_data("gutenberg")
    if not (REPO_ROOT / ".venv" / "bin" / "activate").is_file():
        pytest.skip("no .venv in the repo: the README's commands assume the one `bash scripts/test.sh` makes "
                    "(run it once)")
    code = readme_blocks()[index][1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_JAX_") and k != "XLA_FLAGS"}
    env.update(NANOCHAT_JAX_BASE_DIR=str(tmp_path / "base"), JAX_PLATFORMS="cpu")
    out = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, f"README block {index} failed:\n{code}\n--- stdout\n{out.stdout[-3000:]}\n" \
                                f"--- stderr\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr
