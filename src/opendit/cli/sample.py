"""Sample a DiT from any checkpoint.

    python scripts/dit/sample_dit.py --ckpt DiT-XL-2-256x256.pt --cfg_scale 4.0 --out sample.png
    python scripts/dit/sample_dit.py --ckpt outputs/000-DiT-XL-2 --sampler dpm-solver++ --num_sampling_steps 20

What the checkpoint determines (classes, channels, patch size, width, depth, token grid) is read from it; flags that
contradict it are errors. The published sampler is reproduced exactly with ``--sampler ddpm --num_sampling_steps 250
--guidance_channels 3`` and the same seed: torch.manual_seed(seed), then z = randn(n, C, H, W), then the loop.
"""

from __future__ import annotations

import sys

from ..config import GridConfig
from ..sampling.grid import sample_grid
from .flags import add_settings, parse_config
from .program import ArgumentParser, run_main


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Sample a grid of images from a DiT checkpoint.")
    add_settings(p, GridConfig)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(lambda _: sample_grid(parse_config(GridConfig, parser, argv, section="sample")[0]), None)


if __name__ == "__main__":
    sys.exit(main())
