"""Every repository path the code and docs mention exists: a comment or README line that names a docs/*.md,
scripts/*.py, nanochat_jax/*.py, tests/*.py, ... file must lead somewhere. Paths into ../shared/ (data beside the
checkout) and nanochat's own files (nanochat/gpt.py, its scripts/base_train.py, ...) are not ours to check."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_DIRS = ("docs", "scripts", "nanochat_jax", "tests", "kernels", "tools", ".ci")
# A path starts at a boundary (so the "tasks/..." inside "nanochat_jax/tasks/..." is not read on its own and
# "../shared/docs/x.md" is skipped) and ends at a word character (placeholders like <step> end it).
PATH_RE = re.compile(r"(?<![\w./<>-])(?:%s)/[\w./-]*\w" % "|".join(re.escape(d) for d in OUR_DIRS))
# nanochat's scripts that have no namesake here: comments cite them as nanochat's files.
NANOCHAT_SCRIPTS = {"scripts/base_train.py", "scripts/mid_train.py", "scripts/chat_sft.py", "scripts/chat_rl.py",
                    "scripts/infer_bench.py"}


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist): scan the tree
        files = [p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    keep = (".py", ".sh", ".md", ".toml", ".txt")
    return sorted(p for p in files if p.is_file() and (p.suffix in keep or p.name == "run")
                  and "golden" not in p.relative_to(ROOT).parts)


def mentioned_paths(text: str) -> set[str]:
    found = set()
    for m in PATH_RE.finditer(text):
        path = m.group(0).rstrip(".")
        if text[m.end():m.end() + 1] in "*{<" or path in NANOCHAT_SCRIPTS:  # globs, placeholders; nanochat's
            continue
        found.add(path)
    return found


def test_path_pattern_reads_citations_as_written():
    text = ("see docs/benchmarks.md. and nanochat_jax/tasks/spellingbee.py, ../shared/docs/env_notes.md, "
            "nanochat's tasks/spellingbee.py and scripts/base_train.py, tests/*.py, <base dir>/tokenizer")
    assert mentioned_paths(text) == {"docs/benchmarks.md", "nanochat_jax/tasks/spellingbee.py"}


@pytest.mark.parametrize("path", tracked_text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_mentioned_repo_paths_exist(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    missing = sorted(p for p in mentioned_paths(text) if not (ROOT / p).exists())
    assert not missing, f"{path.relative_to(ROOT)} mentions paths that are not in the repository: {missing}"
