#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the default (fast) test suite in two processes.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `bash scripts/test.sh tests/test_dataloader.py`.
source "$(dirname "$0")/_env.sh"
cd "$REPO_ROOT"
export JAX_PLATFORMS=cpu
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
# Two pytest processes (pytest-xdist): the tests mostly compile small XLA programs on one core each, so one process
# leaves a 2-core box partly idle. loadfile keeps each file whole, in order, in one process (its module fixtures
# are built once, and a test that counts a shared fixture's compilations sees the same history as in one process).
# NANOCHAT_JAX_TEST_WORKERS=0 runs them in this process (e.g. for --pdb).
exec python -m pytest -q --timeout=900 --durations=15 -n "${NANOCHAT_JAX_TEST_WORKERS:-2}" --dist=loadfile "$@"
