#!/usr/bin/env bash
# Move constraints.txt to the newest dependency versions if the fast tests pass with them (nanochat-jax[dev,browser]
# resolved afresh in a scratch venv; extra arguments go to pytest). Review `git diff constraints.txt` and commit it
# with the test summary. (The `gpu` extra is not locked: its CUDA wheels follow jaxlib's pin.)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
export NANOCHAT_JAX_VENV="$SCRATCH/venv" NANOCHAT_JAX_CONSTRAINTS=none NANOCHAT_JAX_EXTRAS=browser
bash "$REPO_ROOT/scripts/test.sh" "$@"
{
  sed -n '/^#/p' "$REPO_ROOT/constraints.txt"
  "$SCRATCH/venv/bin/python" -m pip freeze --exclude-editable
} > "$SCRATCH/constraints.txt"
mv "$SCRATCH/constraints.txt" "$REPO_ROOT/constraints.txt"
echo "[lock] tests passed; constraints.txt updated:"
git -C "$REPO_ROOT" diff --stat -- constraints.txt || true
