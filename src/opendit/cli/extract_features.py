"""Encode a data set once with the VAE, for ``--dataset latents`` training without the VAE in the loop.

    torchrun --standalone --nproc_per_node=8 scripts/dit/extract_features.py --dataset imagefolder \\
        --data_path /data/imagenet/train --image_size 256 --vae ema --features_path features/imagenet256
    python scripts/dit/train.py --dataset latents --data_path features/imagenet256 --model DiT-XL/2 ...

The data set is cut into shards of --shard_size images; shard k is encoded by rank k mod world_size and written
atomically, so an interrupted extraction resumes where it stopped (finished shards are skipped) and any number of
processes can share the work. Each image is encoded unflipped and flipped; mean and std of both posteriors are stored
(see opendit/data/latents.py), and with --repa_encoder the encoder features of both (REPA then runs no encoder
in training). Rank 0 writes index.json when every shard exists.
"""

from __future__ import annotations

import sys

from ..data.extraction import DTYPES, extract
from ..errors import NONNEG_INT, POSITIVE_INT
from .program import ArgumentParser, run_main


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Store VAE posteriors (mean, std; image and flip) of a data set for --dataset latents.")
    p.add_argument("--dataset", default="imagefolder", choices=["imagefolder", "cifar10"])
    p.add_argument("--data_path", required=True)
    p.add_argument("--image_size", type=POSITIVE_INT, default=256)
    p.add_argument("--vae", default="ema", help="ema, mse (the SD VAEs) or a local diffusers AutoencoderKL folder")
    p.add_argument("--features_path", required=True, help="output folder (index.json + shards)")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=32, help="images per VAE forward, per process")
    p.add_argument("--shard_size", type=POSITIVE_INT, default=4096)
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES),
                   help="storage precision (fp16: 2 x 2 x 4 x 32 x 32 x 2 bytes = 32 KiB per 256 px image)")
    p.add_argument("--num_workers", type=NONNEG_INT, default=4)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repa_encoder", default=None,
                   help="also store this encoder's patch features of each image and its flip (REPA; the names of "
                        "train.py --repa_encoder, comma-separated), so REPA training on these latents runs no encoder")
    p.add_argument("--repa_encoder_weights", default=None, help="the encoder's weights file(s), as for train.py")
    return p


def main(argv=None) -> int:
    return run_main(lambda args: extract(**vars(args)), build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
