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

from .errors import POSITIVE_INT, POSITIVE_INT_OR_AUTO, ArgumentParser
from .program import run_main
from .recipes import parse_with_config
from .sample import add_model_flags
from .sampling.folder import sample_all


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Sample many images (PNGs + an ADM-format .npz) from a DiT checkpoint, on N processes.")
    add_model_flags(p, cfg_scale=1.5)
    p.add_argument("--num_samples", type=POSITIVE_INT, default=50_000)
    p.add_argument("--per_proc_batch_size", type=POSITIVE_INT_OR_AUTO, default=32,
                   help="samples per batch and process, or auto: the largest power of two that fits the GPU (measured "
                        "by two short probe runs; 32 on a CPU). Batch b is seeded from (seed, b): the batch size is "
                        "part of the samples' settings")
    p.add_argument("--sample_dir", default=None,
                   help="PNGs go here, DIR.npz beside it (default: samples/ plus a name made of the settings)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --sample_dir that holds samples of other settings (once the new ones are complete)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    return run_main(lambda _: sample_all(parse_with_config(parser, sys.argv[1:] if argv is None else list(argv),
                                                      section="sample")[0]), None)


if __name__ == "__main__":
    sys.exit(main())
