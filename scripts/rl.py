"""Reinforcement learning on GSM8K (REINFORCE with a group-mean baseline) from the SFT model.

    python scripts/rl.py --mesh=8                                        # 8-GPU node, the reference settings
    python scripts/rl.py --task-data=../shared/data --examples-per-step=4 --num-samples=4 --max-new-tokens=64 \\
        --device-batch-size=4 --num-steps=5 --eval-every=5 --eval-examples=8   # offline, CPU-sized
"""

from nanochat_jax.common import run_main
from nanochat_jax.config import parse_flags, print_config
from nanochat_jax.rl import RLConfig, rl_train

if __name__ == "__main__":
    cfg = parse_flags(RLConfig)
    print_config(cfg)
    run_main(rl_train, cfg)
