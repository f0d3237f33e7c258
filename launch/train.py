"""One entry point for every launcher: the same flags and config as ``zo-scale train``.

    python launch/train.py --config my.yaml optim.lr=1e-6
    torchrun --nproc_per_node 2 launch/train.py --config my.yaml
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json --config my.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml launch/train.py --config my.yaml
"""

import sys

from zo_scale.train.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
