#!/usr/bin/env bash
# The main command: the whole pipeline end to end on CPU at a tiny size (about 20-30 minutes on 2 cores), from the
# tokenizer through pretraining, mid, SFT and RL with their evals to the report card and a one-shot answer. (The
# model is tiny: expect fluent-ish nonsense. The point is that every stage runs, on your machine, in minutes.)
#
#   bash scripts/cpu_demo.sh [--data-dir=DIR] [--task-data=DIR] [--smoke] [--fresh] [--stop-after=STAGE]
#
# Pretraining text: --data-dir=DIR or $NANOCHAT_JAX_DATA_DIR (*.parquet with a `text` column, the last one is
#   validation), else ../shared/data/gutenberg beside the repo, else 2 downloaded ClimbMix shards.
# Task files: --task-data=DIR or $NANOCHAT_JAX_TASK_DATA (laid out like ../shared/data: arc/, mmlu/, gsm8k/,
#   humaneval/, english_words/, chat/, core_eval/), else ../shared/data, else HuggingFace and the CORE eval bundle.
# --smoke: the smallest settings (a few minutes; what CI runs). --fresh: forget finished stages and delete the demo
# model's checkpoints. --stop-after=STAGE: stop once that stage is done. Outputs go under $NANOCHAT_JAX_BASE_DIR
# (default ~/.cache/nanochat_jax); a rerun skips finished stages and continues an interrupted one from its checkpoint.
source "$(dirname "$0")/_env.sh"
source "$(dirname "$0")/_stages.sh"
cd "$REPO_ROOT"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
PIPELINE=demo

DATA_DIR="${NANOCHAT_JAX_DATA_DIR:-}"
TASK_DATA="${NANOCHAT_JAX_TASK_DATA:-}"
SMOKE=0; FRESH=0
for arg in "$@"; do
  case "$arg" in
    --data-dir=*) DATA_DIR="${arg#--data-dir=}" ;;
    --task-data=*) TASK_DATA="${arg#--task-data=}" ;;
    --smoke) SMOKE=1 ;;
    --fresh) FRESH=1 ;;
    --stop-after=*) STOP_AFTER="${arg#--stop-after=}" ;;
    *) echo "unknown argument: $arg (usage: bash scripts/cpu_demo.sh [--data-dir=DIR] [--task-data=DIR] [--smoke] [--fresh] [--stop-after=STAGE])" >&2; exit 2 ;;
  esac
done
SHARED="$REPO_ROOT/../shared/data"
if [ -z "$DATA_DIR" ] && [ -d "$SHARED/gutenberg" ]; then DATA_DIR="$(cd "$SHARED/gutenberg" && pwd)"; fi
if [ -z "$TASK_DATA" ] && [ -d "$SHARED/gsm8k" ]; then TASK_DATA="$(cd "$SHARED" && pwd)"; fi
BASE_DIR="$(python -c 'from nanochat_jax.common import get_base_dir; print(get_base_dir())')"
STATE_DIR="$BASE_DIR/pipeline_state/demo"
echo "[demo] base dir $BASE_DIR; pretraining text ${DATA_DIR:-<download>}; task data ${TASK_DATA:-<HuggingFace>}"

if [ -z "$DATA_DIR" ]; then
  stage download python -m nanochat_jax.dataset -n 1
  DATA_DIR="$(python -c 'from nanochat_jax.dataset import resolve_data_dir; print(resolve_data_dir())')"
fi
export NANOCHAT_JAX_DATA_DIR="$DATA_DIR"
if [ -n "$TASK_DATA" ]; then
  export NANOCHAT_JAX_TASK_DATA="$TASK_DATA"
  MIXTURE=(--mixture=local "--task-data=$TASK_DATA")
  BUNDLE=("--eval-bundle=$TASK_DATA/core_eval")
else
  MIXTURE=(--mixture=default)
  BUNDLE=()
fi

# Sizes: a d4 model (a d2 one with --smoke) on 256-token rows, batches of 4,096 tokens.
if [ "$SMOKE" = 1 ]; then
  DEPTH=2; PRE_ITERS=20; CONVS=64; MAXTASK=2; XPROB=4; RL_STEPS=2; NEW_TOK=16; CHARS=2000000; SAVE=5
else
  DEPTH=4; PRE_ITERS=300; CONVS=1200; MAXTASK=8; XPROB=24; RL_STEPS=6; NEW_TOK=64; CHARS=20000000; SAVE=25
fi
TAG="demo_d$DEPTH"
SEQ=256
if [ "$FRESH" = 1 ]; then
  rm -rf "$STATE_DIR"
  for phase in base mid chatsft chatrl; do rm -rf "$BASE_DIR/${phase}_checkpoints/$TAG"; done
fi
CHAT=(--model-tag="$TAG" --max-seq-len=$SEQ --device-batch-size=8 --total-batch-size=4096 --eval-tokens=16384
      --max-conversations=$CONVS --save-every=$SAVE "${MIXTURE[@]}")

SECONDS=0
[ -f "$STATE_DIR/report-reset.done" ] || python -m nanochat_jax.report reset
mkdir -p "$STATE_DIR" && touch "$STATE_DIR/report-reset.done"
stage tokenizer python scripts/tok_train.py --max-chars=$CHARS --vocab-size=4096
stage tok_eval python scripts/tok_eval.py
stage pretrain python scripts/pretrain.py --depth=$DEPTH --head-dim=64 --max-seq-len=$SEQ --device-batch-size=8 \
  --total-batch-size=4096 --num-iterations=$PRE_ITERS --warmup-steps=10 --eval-every=100 --eval-tokens=16384 \
  --sample-every=-1 --save-every=$SAVE --matrix-lr=0.04 --embedding-lr=0.6 --unembedding-lr=0.016 --model-tag="$TAG"
stage base_loss python scripts/base_loss.py --model-tag="$TAG" --device-batch-size=8 --split-tokens=16384 \
  --num-samples=2 --sample-tokens=32
stage base_eval python scripts/base_eval.py --model-tag="$TAG" --max-per-task=$MAXTASK --batch-tokens=4096 "${BUNDLE[@]}"
stage midtrain python scripts/midtrain.py "${CHAT[@]}" --eval-every=50
stage chat_eval_mid python scripts/chat_eval.py -i mid -g "$TAG" -x $XPROB --max-new-tokens=$NEW_TOK
stage sft python scripts/sft.py "${CHAT[@]}" --eval-every=-1
stage chat_eval_sft python scripts/chat_eval.py -i sft -g "$TAG" -x $XPROB --max-new-tokens=$NEW_TOK
stage rl python scripts/rl.py --model-tag="$TAG" --examples-per-step=2 --num-samples=4 --max-new-tokens=$NEW_TOK \
  --device-batch-size=8 --train-seq-len=512 --num-steps=$RL_STEPS --eval-every=$RL_STEPS --eval-examples=4 \
  --eval-samples=2 --save-every=$RL_STEPS
stage chat_eval_rl python scripts/chat_eval.py -i rl -g "$TAG" -a GSM8K -x $XPROB --max-new-tokens=$NEW_TOK
python -m nanochat_jax.report generate --copy-to=""
echo "[demo] one-shot chat with the RL model:"
python scripts/chat_cli.py -i rl --model-tag="$TAG" -p "Why is the sky blue?" -t 0.6 --max-tokens=48
echo "[demo] done in ${SECONDS}s; report: $BASE_DIR/report/report.md"
