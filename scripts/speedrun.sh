#!/usr/bin/env bash
# The whole pipeline on one 8-GPU node: from nothing to a model you can chat with, and its report card.
#
#   bash scripts/speedrun.sh                 # d24, ratio 8: the "GPT-2 grade" run (nanochat leaderboard recipe)
#   bash scripts/speedrun.sh --depth=20      # d20, ratio 20: classic nanochat's "$100" run
#   bash scripts/speedrun.sh --depth=20 --rl # ... plus RL on GSM8K and its eval
#
# Options: --depth=N  --ratio=R (tokens per scaling parameter; default 8 at d>=24, else 20)  --mesh=N (default: all)
#          --device-batch-size=N (default 16 at d>=24, else 32, halved until scripts/memory_estimate.py fits it on
#          --gpu=a800-80gb|a100-80gb|a100-40gb|h100|h200, read from nvidia-smi by default)
#          --shards=N (pretraining shards to download; default 170)  --rl  --fresh (forget finished stages)
#          --dry-run (print the stage commands and exit)
# A rerun skips finished stages (markers in <base>/pipeline_state/speedrun_d<N>) and a training stage cut short
# continues from its last checkpoint (pretraining saves every 1000 steps, mid/SFT every 200, RL every 60). --fresh
# keeps the checkpoints: delete <base>/*_checkpoints/d<N> to train again. Outputs go under $NANOCHAT_JAX_BASE_DIR
# (default ~/.cache/nanochat_jax). Multi-node: run this on every node with JAX_COORDINATOR_ADDRESS/
# JAX_NUM_PROCESSES/JAX_PROCESS_ID set (or under SLURM); see the README.
export NANOCHAT_JAX_EXTRAS="${NANOCHAT_JAX_EXTRAS-gpu}"  # set it empty for a CPU-only install
source "$(dirname "$0")/_env.sh"
source "$(dirname "$0")/_stages.sh"
cd "$REPO_ROOT"
PIPELINE=speedrun

DEPTH=24; RATIO=""; DBS=""; MESH=-1; SHARDS=170; RL=0; FRESH=0; GPU=""
for arg in "$@"; do
  case "$arg" in
    --depth=*) DEPTH="${arg#--depth=}" ;;
    --ratio=*) RATIO="${arg#--ratio=}" ;;
    --device-batch-size=*) DBS="${arg#--device-batch-size=}" ;;
    --mesh=*) MESH="${arg#--mesh=}" ;;
    --shards=*) SHARDS="${arg#--shards=}" ;;
    --gpu=*) GPU="${arg#--gpu=}" ;;
    --rl) RL=1 ;;
    --fresh) FRESH=1 ;;
    --dry-run) DRY_RUN=1 ;;
    *) echo "unknown argument: $arg (see the header of scripts/speedrun.sh)" >&2; exit 2 ;;
  esac
done
USER_DBS="$DBS"
if [ "$DEPTH" -ge 24 ]; then RATIO="${RATIO:-8}"; DBS="${DBS:-16}"; else RATIO="${RATIO:-20}"; DBS="${DBS:-32}"; fi

gpu_kind() {  # nvidia-smi's first GPU as a memory_estimate.py --gpu name, or nothing
  local gpu; gpu="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)"
  case "${gpu^^}" in  # "NAME, MiB"
    *H200*) echo h200 ;; *H100*) echo h100 ;; *A800*) echo a800-80gb ;;
    *A100*) if [ "${gpu##*,}" -gt 61440 ]; then echo a100-80gb; else echo a100-40gb; fi ;;
  esac
}
fitting_batch() {  # the largest of DBS, DBS/2, ... whose train step the memory estimate fits on $GPU
  local b="$DBS" n
  n="$(nvidia-smi -L 2>/dev/null | wc -l)"; [ "$MESH" -gt 0 ] && n="$MESH"; [ "${n:-0}" -gt 0 ] || n=8
  while [ "$b" -gt 1 ] && ! python scripts/memory_estimate.py --depth="$DEPTH" --device-batch-size="$b" \
      --mesh="$n" --gpu="$GPU" 2>/dev/null | tail -1 | python -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["fits"] else 1)'; do
    echo "[speedrun] device batch $b does not fit on $GPU (scripts/memory_estimate.py); trying $((b / 2))" >&2
    b=$((b / 2))
  done
  echo "$b"
}
[ -n "$GPU" ] || GPU="$(gpu_kind)"
if [ -z "$USER_DBS" ] && [ -n "$GPU" ]; then
  DBS="$(fitting_batch)"
elif [ -z "$USER_DBS" ]; then
  echo "[speedrun] unknown GPU, so device batch $DBS is unchecked (pass --gpu=NAME, or check with scripts/memory_estimate.py)"
fi
TAG="d$DEPTH"
BASE_DIR="$(python -c 'from nanochat_jax.common import get_base_dir; print(get_base_dir())')"
STATE_DIR="$BASE_DIR/pipeline_state/speedrun_$TAG"
[ "$FRESH" = 1 ] && rm -rf "$STATE_DIR"
echo "[speedrun] depth $DEPTH, ratio $RATIO, device batch $DBS${GPU:+ (fits on $GPU)}, mesh $MESH, base dir $BASE_DIR"
if [ "${DRY_RUN:-0}" != 1 ]; then
  python -c 'import jax; d = jax.devices(); print(f"[speedrun] {len(d)} × {d[0].device_kind} ({jax.default_backend()})")'
  [ -f "$STATE_DIR/report-reset.done" ] || python -m nanochat_jax.report reset
  mkdir -p "$STATE_DIR" && touch "$STATE_DIR/report-reset.done"
fi
SECONDS=0

# Data: 8 shards now (enough for the tokenizer), the rest in the background while the tokenizer trains.
stage download_first python -m nanochat_jax.dataset -n 8
DL_PID=""
if [ ! -f "$STATE_DIR/download_all.done" ] && [ "${DRY_RUN:-0}" != 1 ]; then
  python -m nanochat_jax.dataset -n "$SHARDS" > "$BASE_DIR/download_all.log" 2>&1 &
  DL_PID=$!
fi
stage tokenizer python scripts/tok_train.py --max-chars=2000000000 --vocab-size=32768
stage tok_eval python scripts/tok_eval.py
if [ -n "$DL_PID" ]; then
  echo "[speedrun] waiting for the shard download (log: $BASE_DIR/download_all.log)"
  wait "$DL_PID"
  mkdir -p "$STATE_DIR" && date -u +%Y-%m-%dT%H:%M:%SZ > "$STATE_DIR/download_all.done"
fi

stage pretrain python scripts/pretrain.py --mesh=$MESH --depth=$DEPTH --target-param-data-ratio=$RATIO \
  --device-batch-size=$DBS --model-tag=$TAG --save-every=1000 --core-metric-every=2000
stage base_loss python scripts/base_loss.py --mesh=$MESH --model-tag=$TAG --device-batch-size=$DBS
stage base_eval python scripts/base_eval.py --mesh=$MESH --model-tag=$TAG
# identity conversations (optional: trained without, with a note, when the download is unreachable)
IDENTITY_FLAG=()
if [ "${DRY_RUN:-0}" != 1 ] && IDENTITY="$(python -c 'from nanochat_jax.tasks.common import fetch_file
from nanochat_jax.tasks.customjson import IDENTITY_CONVERSATIONS_URL as url
print(fetch_file(url, "identity_conversations.jsonl"))' 2>/dev/null)"; then
  IDENTITY_FLAG=(--identity-file="$IDENTITY")
else
  echo "[speedrun] identity conversations unavailable: training without them"
fi
stage midtrain python scripts/midtrain.py --mesh=$MESH --model-tag=$TAG --device-batch-size=$DBS --save-every=200 \
  "${IDENTITY_FLAG[@]}"
stage chat_eval_mid python scripts/chat_eval.py --mesh=$MESH -i mid -g $TAG
stage sft python scripts/sft.py --mesh=$MESH --model-tag=$TAG --device-batch-size=$DBS --save-every=200 \
  "${IDENTITY_FLAG[@]}"
stage chat_eval_sft python scripts/chat_eval.py --mesh=$MESH -i sft -g $TAG
if [ "$RL" = 1 ]; then
  stage rl python scripts/rl.py --mesh=$MESH --model-tag=$TAG
  stage chat_eval_rl python scripts/chat_eval.py --mesh=$MESH -i rl -g $TAG -a GSM8K
fi
[ "${DRY_RUN:-0}" = 1 ] && exit 0
python -m nanochat_jax.report generate
echo "[speedrun] done in ${SECONDS}s. Talk to it: python scripts/chat_cli.py -i sft  (or: python scripts/chat_web.py)"
