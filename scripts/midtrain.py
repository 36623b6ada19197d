"""Midtraining: teach the base model the chat format, tool use and multiple choice (one epoch of the mixture).

    python scripts/midtrain.py --mesh=8                                       # 8-GPU node, reference mixture
    python scripts/midtrain.py --mixture=local --task-data=../shared/data \\
        --max-seq-len=256 --device-batch-size=4 --total-batch-size=2048 --eval-tokens=8192   # offline, CPU-sized
"""

import sys

from nanochat_jax.chat_train import ChatTrainConfig, chat_train
from nanochat_jax.common import run_main
from nanochat_jax.config import parse_flags, print_config

if __name__ == "__main__":
    cfg = parse_flags(ChatTrainConfig, sys.argv[1:] + ["--stage=mid"])
    print_config(cfg)
    run_main(chat_train, cfg)
