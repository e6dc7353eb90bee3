"""Sample a DiT from any checkpoint.

    python scripts/dit/sample_dit.py --ckpt DiT-XL-2-256x256.pt --cfg_scale 4.0 --out sample.png
    python scripts/dit/sample_dit.py --ckpt outputs/000-DiT-XL-2 --sampler dpm-solver++ --num_sampling_steps 20

What the checkpoint determines (classes, channels, patch size, width, depth, token grid) is read from it; flags that
contradict it are errors. The published sampler is reproduced exactly with ``--sampler ddpm --num_sampling_steps 250
--guidance_channels 3`` and the same seed: torch.manual_seed(seed), then z = randn(n, C, H, W), then the loop.
"""

from __future__ import annotations

import argparse
import sys

from .errors import NONNEG_FLOAT, POSITIVE_INT, SEED, ArgumentParser, int_flag
from .precision import PRECISIONS
from .program import run_main
from .sampling import SAMPLERS
from .sampling.grid import sample_grid


def add_model_flags(p: argparse.ArgumentParser, cfg_scale: float) -> None:
    """Flags shared by sample_dit.py and sample_ddp.py."""
    a = p.add_argument
    a("--ckpt", required=True, help="a bare state dict (.pt), ema.pt, .safetensors, epochX-global_stepY/model, a "
                                    "checkpoint directory or a run directory (its newest intact checkpoint)")
    a("--model", default=None, help="checked against the checkpoint (read from it when omitted)")
    a("--image_size", type=POSITIVE_INT, default=None, help="checked against the checkpoint's token grid (read from it when omitted)")
    a("--num_classes", type=POSITIVE_INT, default=None, help="checked against the checkpoint")
    a("--use_model_weights", action="store_true", help="the raw weights of a checkpoint directory instead of its EMA")
    a("--cfg_scale", type=NONNEG_FLOAT, default=cfg_scale, help="classifier-free guidance scale (1 = none)")
    a("--guidance_channels", type=POSITIVE_INT, default=None, help="guide only the first N epsilon channels (3 = the published sampler)")
    a("--sampler", default="ddpm", choices=SAMPLERS)
    a("--num_sampling_steps", type=int_flag(1, 1000), default=250)
    a("--clip_denoised", default="auto", choices=["auto", "yes", "no"],
      help="clamp the x0 prediction to [-1, 1]; auto: yes in pixel space, no in latent space (as published)")
    a("--vae", default="auto", help="auto (from the run or the image size), ema, mse, none, or a diffusers AutoencoderKL folder")
    a("--mixed_precision", default="fp32", choices=list(PRECISIONS))
    a("--enable_flashattn", action="store_true")
    a("--seed", type=SEED, default=0)
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Sample a grid of images from a DiT checkpoint.")
    add_model_flags(p, cfg_scale=4.0)
    p.add_argument("--labels", default=None, help="comma-separated class indices (default: a fixed set)")
    p.add_argument("--out", default="sample.png", help="the grid PNG (one row per label)")
    return p


def main(argv=None) -> int:
    return run_main(sample_grid, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
