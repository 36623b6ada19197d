#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the default (fast) test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `bash scripts/test.sh tests/test_dataloader.py`.
source "$(dirname "$0")/_env.sh"
cd "$REPO_ROOT"
export JAX_PLATFORMS=cpu
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
exec python -m pytest -q --timeout=900 --durations=15 "$@"
