"""One entry point for launchers: ``python launch/train.py --config my.yaml optim.lr=1e-6 ...``.

Same flags and config as ``zo-scale train``. (Multi-process launchers, ``deepspeed`` / ``accelerate
launch`` / ``torchrun``, come with the scale-out backends.)
"""

import sys

from zo_scale.train.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
