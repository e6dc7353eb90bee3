"""``opendit export RUN_OR_CKPT DIR``: a trained run as a Hugging Face Hub model folder (opendit.export).

    opendit export outputs/demo/000-DiT-N-2 dit-n2-digits/ --repo me/dit-n2-digits
    hf upload me/dit-n2-digits dit-n2-digits/             # the Hub's own client uploads it
    python scripts/dit/sample_dit.py --ckpt hf://me/dit-n2-digits
"""

from __future__ import annotations

import sys

from ..export import export_run
from .program import ArgumentParser, run_main


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="opendit export", description="Write a run as a Hub model folder: model.safetensors, "
                       "config.json, a model card README.md, samples.png.")
    p.add_argument("src", help="a run directory (its newest intact checkpoint) or a checkpoint directory")
    p.add_argument("dst", help="the folder to write (new or empty; --force replaces it)")
    p.add_argument("--model_weights", action="store_true", help="the raw training weights instead of the EMA")
    p.add_argument("--repo", default="OWNER/NAME", help="the Hub repository the card's commands name")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    return p


def report(args) -> int:
    dst = export_run(args.src, args.dst, model_weights=args.model_weights, force=args.force, repo=args.repo)
    print(f"wrote {dst}/ (model.safetensors, config.json, README.md); upload it with: hf upload {args.repo} {dst}")
    return 0


def main(argv=None) -> int:
    return run_main(report, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
