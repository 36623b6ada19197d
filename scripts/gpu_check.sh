#!/usr/bin/env bash
# One GPU session's checks, in one go (each bounded in time), ending with the numbers for docs/benchmarks.md:
#   1. the Pallas flash-attention kernel vs cuDNN vs XLA (correctness columns vs XLA, then time and TFLOP/s)
#   2. the train step at d20 (seq 2048, bf16) with cudnn, xla and pallas attention, and d12 with cudnn: tokens/s, MFU
#   3. the inference engine at d20 (random weights): time to first token, ms/token, bandwidth utilisation
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # on the GPU machine, from the repo root; needs jax with CUDA
#
# Only jax/numpy/optax/orbax are needed (no grain/flask): run it with the machine's python, no venv.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
run() {  # run NAME SECONDS command...: log to $OUT/NAME.log, never abort the whole check
  local name="$1" limit="$2"; shift 2
  echo "=== $name ($*)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: exit $? ($(tail -c 300 "$OUT/$name.log" | tail -1 | cut -c1-200))"
}
$PY -c 'import jax; print(jax.__version__, jax.devices())' | tee "$OUT/devices.txt"
# Worst case (every run hitting its limit) is ~12.5 min; typical runs end well before their limits.
run attention 180 $PY kernels/bench_attention.py --out="$OUT/attention.md"
for attn in cudnn xla pallas; do
  run "train_d20_${attn}" 120 $PY scripts/bench_train.py --depth=20 --device-batch-size=16 --max-seq-len=2048 \
    --attention=$attn --compute-dtype=bfloat16 --steps=8 --warmup-steps=3
done
run train_d12_cudnn 90 $PY scripts/bench_train.py --depth=12 --device-batch-size=16 --max-seq-len=2048 \
  --attention=cudnn --compute-dtype=bfloat16 --steps=8 --warmup-steps=3
run infer_d20 120 $PY scripts/bench_infer.py --depth=20 --batch-sizes=1,8,32 --max-new-tokens=64
{
  echo "## GPU check $(date -u +%Y-%m-%d) on $(cat "$OUT/devices.txt" | tail -1)"
  echo
  echo "### attention"; cat "$OUT/attention.md" 2>/dev/null || echo "(failed: see attention.log)"
  echo
  echo "### train step (last JSON line of each run)"
  for f in "$OUT"/train_*.log; do echo "- $(basename "$f" .log): $(grep '^{' "$f" | tail -1 || echo failed)"; done
  echo
  echo "### inference"; grep -A5 "TTFT" "$OUT/infer_d20.log" || echo "(failed: see infer_d20.log)"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
