"""Supervised fine-tuning on whole conversations, loss on the assistant's tokens only.

    python scripts/sft.py --mesh=8                                  # from the mid checkpoint (the classic pipeline)
    python scripts/sft.py --source=base --load-optimizer             # current nanochat: straight from base
    python scripts/sft.py --mixture=local --task-data=../shared/data --max-seq-len=256 --device-batch-size=4 \\
        --total-batch-size=2048 --eval-tokens=8192                  # offline, CPU-sized
"""

import sys

from nanochat_jax.chat_train import ChatTrainConfig, chat_train
from nanochat_jax.common import run_main
from nanochat_jax.config import parse_flags, print_config

if __name__ == "__main__":
    cfg = parse_flags(ChatTrainConfig, sys.argv[1:] + ["--stage=sft"])
    print_config(cfg)
    run_main(chat_train, cfg)
