"""Pretrain the base model.

    python scripts/pretrain.py --mesh=8 --depth=24 --target-param-data-ratio=8 --device-batch-size=16   # 8-GPU node
    python scripts/pretrain.py --depth=2 --max-seq-len=128 --device-batch-size=4 --total-batch-size=1024 \\
        --num-iterations=20 --eval-every=10 --eval-tokens=4096 --sample-every=-1                          # CPU, tiny
"""

from nanochat_jax.common import run_main
from nanochat_jax.config import parse_flags, print_config
from nanochat_jax.pretrain import PretrainConfig, pretrain

if __name__ == "__main__":
    cfg = parse_flags(PretrainConfig)
    print_config(cfg)
    run_main(pretrain, cfg)
