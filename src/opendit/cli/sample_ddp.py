"""Sample many images for evaluation, on any number of processes (torchrun).

    torchrun --standalone --nproc_per_node=8 scripts/dit/sample_ddp.py --ckpt DiT-XL-2-256x256.pt --num_samples 50000
    python scripts/dit/sample_ddp.py --ckpt outputs/demo/000-DiT-N-2 --num_samples 500 --sample_dir samples/demo

Sample i has label i mod num_classes (exactly uniform over classes) and is written to DIR/iiiiii.png; then DIR.npz holds
them all in the ADM evaluation format (arr_0: uint8 N x H x W x C, arr_1: int64 labels). Work is cut into batches of
--per_proc_batch_size; batch b is seeded from (seed, b) and done by rank b mod world_size, so every rank has its own
seeds and the result does not depend on the number of processes.

DIR/samples.json records what wrote the samples (the weights file and its SHA-256, model, sampler, steps, guidance,
seed, image size, VAE, labels, count, batch size, precision); DIR.npz carries the same record (``opendit_settings``, a
JSON string). A rerun with the same settings resumes (batches whose PNGs exist are skipped); other settings are refused
(one line naming what differs) unless --overwrite, which samples into DIR.overwrite/ and replaces DIR only once the new
samples are complete. Without --sample_dir the folder is named after the settings (samples/<model>-<checkpoint>-...),
so two different runs never share a default folder.
"""

from __future__ import annotations

import sys

from ..config import FolderConfig
from ..sampling.folder import sample_all
from .flags import add_settings, parse_config
from .program import ArgumentParser, run_main


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Sample many images (PNGs + an ADM-format .npz) from a DiT checkpoint, on N processes.")
    add_settings(p, FolderConfig)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(lambda _: sample_all(parse_config(FolderConfig, parser, argv, section="sample")[0]), None)


if __name__ == "__main__":
    sys.exit(main())
