#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the default (fast) test suite in two processes.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `bash scripts/test.sh tests/test_dataloader.py`.
source "$(dirname "$0")/_env.sh"
cd "$REPO_ROOT"
export JAX_PLATFORMS=cpu
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
# Two pytest processes (pytest-xdist): the tests mostly compile small XLA programs on one core each, so one process
# leaves a 2-core box half idle. worksteal gives each process one contiguous half of the tests (a file's module
# fixtures are mostly built once) and moves the tail of the busier one to the idle one.
# NANOCHAT_JAX_TEST_WORKERS=0 runs them in this process (e.g. for --pdb).
exec python -m pytest -q --timeout=900 --durations=15 -n "${NANOCHAT_JAX_TEST_WORKERS:-2}" --dist=worksteal "$@"
