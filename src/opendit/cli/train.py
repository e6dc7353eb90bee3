"""Train a class-conditional DiT: the command line of scripts/dit/train.py, scripts/dit/train_dit.py and
``opendit train``.

    python scripts/dit/train.py --dataset digits --model DiT-S/2 --mixed_precision fp32       # one process
    torchrun --standalone --nproc_per_node=2 scripts/dit/train.py --model DiT-XL/2 --batch_size 2 --num_classes 10

The flags are the settings of opendit.config.TrainConfig; the training itself is opendit.training.trainer.train (read it
top to bottom).
"""

from __future__ import annotations

import sys

from ..config import TrainConfig
from ..training.trainer import train
from .flags import add_settings, parse_config
from .program import ArgumentParser, run_main


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Train a class-conditional DiT (torchrun for several processes).")
    add_settings(p, TrainConfig)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()

    def body(_) -> int:  # inside run_main: a bad --config file is one line too
        cfg, given, _ = parse_config(TrainConfig, parser, argv, section="train")
        return train(cfg, given=given, command=[sys.argv[0], *argv])

    return run_main(body, None)


if __name__ == "__main__":
    sys.exit(main())
