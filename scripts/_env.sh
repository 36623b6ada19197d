# Sourced by the top-level commands: finds a Python >= 3.12, creates .venv and installs the project into it
# (again only when pyproject.toml changes). Usage: source scripts/_env.sh
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NANOCHAT_JAX_VENV:-$REPO_ROOT/.venv}"

_py_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

_find_python() {
  local c
  for c in "${PYTHON:-}" python3.12 python3.13 python3 python; do
    if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && _py_ok "$c"; then command -v "$c"; return 0; fi
  done
  for c in "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    if [ -x "$c" ] && _py_ok "$c"; then echo "$c"; return 0; fi
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ] || ! _py_ok "$VENV/bin/python"; then
  PY="$(_find_python)" || { echo "error: need Python >= 3.12 (JAX 0.11+ dropped 3.11); install one or set PYTHON=/path/to/python3.12" >&2; exit 1; }
  echo "[setup] creating $VENV with $PY ($("$PY" --version 2>&1))"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.nanochat_jax_installed"
EXTRAS="dev${NANOCHAT_JAX_EXTRAS:+,$NANOCHAT_JAX_EXTRAS}"  # e.g. NANOCHAT_JAX_EXTRAS=gpu (speedrun.sh sets it)
# Installs go through constraints.txt: the versions the test suite passed with (scripts/lock.sh updates it).
CONSTRAINTS="${NANOCHAT_JAX_CONSTRAINTS:-$REPO_ROOT/constraints.txt}"
PIP_C=()
if [ "$CONSTRAINTS" != none ]; then
  [ -f "$CONSTRAINTS" ] || { echo "error: constraints file $CONSTRAINTS not found (NANOCHAT_JAX_CONSTRAINTS=none installs without one)" >&2; exit 1; }
  PIP_C=(-c "$CONSTRAINTS")
fi
WANT="$( (cat "$REPO_ROOT/pyproject.toml"; echo "$EXTRAS $CONSTRAINTS"; [ "$CONSTRAINTS" = none ] || cat "$CONSTRAINTS") \
  | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing nanochat-jax and its dependencies into $VENV${PIP_C[*]:+ (pinned by $CONSTRAINTS)}"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_C[@]}" -e "$REPO_ROOT[$EXTRAS]" 2>&1 \
    | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import nanochat_jax, jax, flax, optax, orbax.checkpoint, grain, tiktoken, rustbpe, pyarrow" \
    || { echo "error: installation into $VENV failed (see pip output above)" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1
# GPU runs: XLA may take 92% of each GPU's memory (JAX preallocates 75% by default, too little for the d20
# speedrun's batch; scripts/memory_estimate.py plans with 90%), and compiled programs persist across runs (a rerun
# of a stage skips its minutes of compilation). Values set beforehand win.
if [[ ",${NANOCHAT_JAX_EXTRAS:-}," == *,gpu,* ]] || command -v nvidia-smi >/dev/null 2>&1; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
  _cache_root="${NANOCHAT_JAX_BASE_DIR:-$HOME/.cache/nanochat_jax}"
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$_cache_root/jax_compilation_cache}"
fi
