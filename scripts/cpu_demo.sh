#!/usr/bin/env bash
# The main command: the pipeline end to end at a tiny size on CPU (grows stage by stage as stages land).
#
#   bash scripts/cpu_demo.sh [--data-dir=DIR]
#
# Data: --data-dir=DIR or $NANOCHAT_JAX_DATA_DIR (a folder of *.parquet with a `text` column; the last file is
# validation), else ../shared/data/gutenberg when it exists beside the repo, else it downloads 2 ClimbMix shards.
# Outputs go under $NANOCHAT_JAX_BASE_DIR (default ~/.cache/nanochat_jax).
source "$(dirname "$0")/_env.sh"
cd "$REPO_ROOT"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

DATA_DIR="${NANOCHAT_JAX_DATA_DIR:-}"
for arg in "$@"; do
  case "$arg" in
    --data-dir=*) DATA_DIR="${arg#--data-dir=}" ;;
    *) echo "unknown argument: $arg (usage: bash scripts/cpu_demo.sh [--data-dir=DIR])" >&2; exit 2 ;;
  esac
done
if [ -z "$DATA_DIR" ] && [ -d "$REPO_ROOT/../shared/data/gutenberg" ]; then
  DATA_DIR="$(cd "$REPO_ROOT/../shared/data/gutenberg" && pwd)"
  echo "[demo] using the local Gutenberg shards in $DATA_DIR"
fi
if [ -z "$DATA_DIR" ]; then
  echo "[demo] downloading 1 train shard + the validation shard"
  python -m nanochat_jax.dataset -n 1
  DATA_DIR="$(python -c 'from nanochat_jax.dataset import resolve_data_dir; print(resolve_data_dir())')"
fi
export NANOCHAT_JAX_DATA_DIR="$DATA_DIR"

SECONDS=0
echo "[demo] 1/4 tokenizer training"
python scripts/tok_train.py --max-chars=20000000 --vocab-size=4096
echo "[demo] 2/4 tokenizer evaluation"
python scripts/tok_eval.py
echo "[demo] 3/4 pretraining data loader throughput"
python scripts/bench_loader.py --num-batches=30
echo "[demo] 4/4 pretraining a tiny model (d2) on CPU"
python scripts/pretrain.py --depth=2 --head-dim=64 --max-seq-len=256 --device-batch-size=8 --total-batch-size=4096 \
  --num-iterations=60 --warmup-steps=5 --eval-every=30 --eval-tokens=16384 --sample-every=60 --save-every=30 \
  --matrix-lr=0.04 --embedding-lr=0.6 --unembedding-lr=0.016 --model-tag=demo_d2
echo "[demo] done in ${SECONDS}s"
