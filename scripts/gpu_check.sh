#!/usr/bin/env bash
# The first GPU session's checks as ONE command that ends within a 600 s window (machine start-up included):
# env (jax, devices, memory; the benchmarks import without grain/flask/rustbpe); d20 train step with cuDNN attention
# (tokens/s, MFU, peak memory, compile time); the same with --grad-accum=4 (the optimizer's share of the step); d20
# inference (TTFT, ms/token, batch-1 decode HBM bandwidth utilisation, issue 16: >= 70%); attention kernels at
# T=2048 (XLA, cuDNN, Pallas); last, d20 with our Pallas flash attention (a crash there loses nothing before it).
#
#   bash scripts/gpu_check.sh [OUT]                       # on the GPU machine, from any directory
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh OUT     # on CPU: the same steps with tiny configs
#   GPU_CHECK_DRY_RUN=plan bash scripts/gpu_check.sh      # print the plan and the worst-case time, run nothing
#
# Needs python3 with jax (CUDA), flax, optax, numpy (PYTHON= picks another interpreter). Writes to OUT only log.txt,
# results.jsonl (one record per step), summary.md (rewritten after EVERY step, so a check cut short keeps what
# finished) and attention.md. The worst case (every step killed at its limit) must fit BUDGET. Compilations persist
# in $JAX_COMPILATION_CACHE_DIR (default .jax_compilation_cache/ in the repo) for faster reruns.
# Memory: `python scripts/memory_estimate.py --depth=20 --device-batch-size=8 --mesh=1 --gpu=h100` (on CPU) gives
# 28.3 GB + ~2.4 GB per sequence with cuDNN attention: ~47.5 GB at batch 16 (72 GB usable). XLA attention would keep
# the T×T scores (166 GB at batch 16), so it is not trained here.
set -uo pipefail
OUT="${1:-${OUT:-gpu_check_out}}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # relative to where it was called from
cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY_RUN:-0}"
PY="${PYTHON:-python3}"
case "$DRY" in 0|1|plan) ;; *) echo "error: GPU_CHECK_DRY_RUN must be 0, 1 or plan, got '$DRY'" >&2; exit 2;; esac
BUDGET=540        # seconds: the 600 s window less the machine's start-up
KILL_GRACE=5      # timeout -k: a step ignoring SIGTERM is killed this much later
STEP_OVERHEAD=3   # per step: logging and the summary rewrite (measured well under 1 s)
START_OVERHEAD=10 # before the first step

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_compilation_cache}"

if [ "$DRY" != 1 ]; then  # the GPU run (and its plan)
  D20=(--depth=20 --max-seq-len=2048 --compute-dtype=bfloat16)
  TRAIN=(--device-batch-size=16 --steps=8 --warmup-steps=3)
  ACCUM=(--device-batch-size=16 --grad-accum=4 --steps=4 --warmup-steps=2)
  INFER=(--depth=20 --batch-sizes=1,8 --prompt-len=128 --max-new-tokens=64)
  ATTN=(--seq-lens=2048 --windows=512 --iters=5)
  CUDNN=--attention=cudnn PALLAS=--attention=pallas
else                     # CPU: tiny shapes, XLA attention (cuDNN needs a GPU; Pallas is interpreted)
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  D20=(--depth=2 --aspect-ratio=32 --head-dim=32 --max-seq-len=64 --vocab-size=512 --compute-dtype=float32)
  TRAIN=(--device-batch-size=2 --steps=2 --warmup-steps=1)
  ACCUM=(--device-batch-size=2 --grad-accum=4 --steps=2 --warmup-steps=1)
  INFER=(--depth=2 --aspect-ratio=32 --head-dim=32 --max-seq-len=64 --vocab-size=512 --batch-sizes=1,2
         --prompt-len=8 --max-new-tokens=8)
  ATTN=(--tiny)
  CUDNN=--attention=xla PALLAS=--attention=xla
fi

ENV_CHECK='
import json, platform, sys
import jax
from nanochat_jax import engine, gpt, optim, sharding, train  # what the benchmarks import
import kernels.flash_attention
absent = [m for m in ("grain", "flask", "rustbpe") if m in sys.modules]
assert not absent, f"imported {absent}: the GPU machine does not have them"
d = jax.devices()
stats = d[0].memory_stats() or {}
print(jax.print_environment_info(return_string=True) if hasattr(jax, "print_environment_info") else "")
print(json.dumps({"jax": jax.__version__, "devices": len(d), "device_kind": d[0].device_kind,
                  "platform": d[0].platform, "python": platform.python_version(),
                  "memory_gb": round(stats.get("bytes_limit", 0) / 1e9, 1) or None}))
'
export ENV_CHECK

# The plan: NAME LIMIT_SECONDS COMMAND... (one line each, in the order they run)
PLAN=(
  "env 30 $PY -c \"\$ENV_CHECK\""
  "train_d20_cudnn 120 $PY scripts/bench_train.py ${D20[*]} ${TRAIN[*]} $CUDNN"
  "train_d20_cudnn_accum4 100 $PY scripts/bench_train.py ${D20[*]} ${ACCUM[*]} $CUDNN"
  "infer_d20 80 $PY scripts/bench_infer.py ${INFER[*]}"
  "attention 60 $PY kernels/bench_attention.py ${ATTN[*]} --backends=xla,cudnn,pallas --out=$OUT/attention.md"
  "train_d20_pallas 80 $PY scripts/bench_train.py ${D20[*]} ${TRAIN[*]} $PALLAS"
)

worst=$START_OVERHEAD
for line in "${PLAN[@]}"; do
  read -r _ limit _ <<< "$line"
  worst=$((worst + limit + KILL_GRACE + STEP_OVERHEAD))
  [ "$DRY" = plan ] && echo "step $line"
done
if [ "$DRY" = plan ]; then
  echo "worst case: $worst s (budget $BUDGET s); files in OUT: log.txt results.jsonl summary.md attention.md"
  exit 0
fi
if [ "$worst" -gt "$BUDGET" ]; then
  echo "error: the plan's worst case is $worst s, over the $BUDGET s budget" >&2
  exit 2
fi

mkdir -p "$OUT"
rm -f "$OUT/log.txt" "$OUT/results.jsonl" "$OUT/summary.md" "$OUT/attention.md"
STEP_OUT="$(mktemp)"  # one step's output, outside OUT (its file count is limited)
trap 'rm -f "$STEP_OUT"' EXIT
echo "gpu_check $(date -u +%FT%TZ) dry_run=$DRY python=$PY worst case ${worst}s; cache $JAX_COMPILATION_CACHE_DIR" \
  | tee "$OUT/log.txt"
for line in "${PLAN[@]}"; do
  read -r name limit cmd <<< "$line"
  echo "=== $name (limit ${limit}s): $cmd" | tee -a "$OUT/log.txt"
  t0=$SECONDS
  timeout -k "$KILL_GRACE" "$limit" bash -c "$cmd" 2>&1 | tee -a "$OUT/log.txt" > "$STEP_OUT"
  rc=${PIPESTATUS[0]}
  took=$((SECONDS - t0))
  echo "=== $name: exit $rc after ${took}s" | tee -a "$OUT/log.txt"
  python3 scripts/gpu_check_summary.py "$OUT" "$name" "$rc" "$took" "$limit" "$STEP_OUT" \
    || echo "(summary update failed after $name)" | tee -a "$OUT/log.txt"
done
cat "$OUT/summary.md"
