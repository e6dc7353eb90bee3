"""The ``opendit`` command (also ``python -m opendit``): ``opendit models`` lists the model configs and the published
checkpoints ``--ckpt`` takes by name; ``opendit train|sample|sample-ddp|score-digits|extract-features|eval|convert|
export|serve|run`` run the programs of scripts/dit/ (and export, serve) under one name."""

from __future__ import annotations

import sys

import torch

from ..errors import POSITIVE_INT, UserError
from .program import ArgumentParser, run_main


def cmd_models(args) -> int:
    from opendit.models import LIGHTNING_NAMES, DiT_models, PUBLISHED_MODELS, model_config

    if args.image_size % args.vae_downsample:
        raise UserError(f"--image_size {args.image_size} is not divisible by --vae_downsample {args.vae_downsample}")
    side = args.image_size // args.vae_downsample
    print(f"{'model':<19} {'depth':>5} {'hidden':>6} {'heads':>5} {'patch':>5} {'tokens':>6} {'params':>10}  (input {side}x{side}x{args.in_channels})")
    for name in DiT_models:
        cfg = model_config(name)
        if side % cfg["patch_size"]:
            continue
        with torch.device("meta"):
            m = DiT_models[name](input_size=side, in_channels=args.in_channels, num_classes=args.num_classes)
        n = sum(v.numel() for v in m.state_dict().values())
        tag = ("" if name in PUBLISHED_MODELS else "  (LightningDiT's name; block options are flags)"
               if name in LIGHTNING_NAMES else "  (extra: patch 1)" if cfg["patch_size"] == 1 else "  (extra: CPU-sized)")
        print(f"{name:<19} {cfg['depth']:>5} {cfg['hidden_size']:>6} {cfg['num_heads']:>5} {cfg['patch_size']:>5} "
              f"{m.x_embedder.num_patches:>6} {n / 1e6:>9.2f}M{tag}")
    from opendit.published import describe_published

    print("\n".join(describe_published()))
    return 0


# subcommand -> (module with main(argv), help): the scripts under scripts/dit/, by another name
PROGRAMS = {
    "train": ("opendit.cli.train", "train a DiT (the flags of scripts/dit/train.py)"),
    "sample": ("opendit.cli.sample", "a grid of samples from any checkpoint (scripts/dit/sample_dit.py)"),
    "sample-ddp": ("opendit.cli.sample_ddp", "many samples to PNGs + an ADM .npz (scripts/dit/sample_ddp.py)"),
    "score-digits": ("opendit.cli.score_digits", "score generated digits (scripts/dit/score_digits.py)"),
    "extract-features": ("opendit.cli.extract_features", "VAE posteriors of a data set for --dataset latents"),
    "eval": ("opendit.cli.evaluate", "FID / IS / KID of samples against a reference (scripts/dit/evaluate.py)"),
    "convert": ("opendit.cli.convert", "convert weights between opendit, published .pt, .safetensors and diffusers"),
    "export": ("opendit.cli.export", "a run as a Hugging Face Hub model folder (weights, config, model card)"),
    "serve": ("opendit.cli.serve", "a local web page to sample a checkpoint (classes, sampler, guidance, seed)"),
    "run": ("opendit.cli.launch", "torchrun a script on every host of a hostfile, over ssh"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = ArgumentParser(prog="opendit", description="Train and sample DiT with plain PyTorch.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list the model configs and their parameter counts")
    p.add_argument("--image_size", type=POSITIVE_INT, default=256)
    p.add_argument("--vae_downsample", type=POSITIVE_INT, default=8, help="8 for the SD VAE latent space, 1 for pixels")
    p.add_argument("--in_channels", type=POSITIVE_INT, default=4)
    p.add_argument("--num_classes", type=POSITIVE_INT, default=1000)
    for name, (_, help_text) in PROGRAMS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if argv and argv[0] in PROGRAMS:
        import importlib

        saved, sys.argv[0] = sys.argv[0], f"opendit {argv[0]}"  # the program's usage line names the subcommand
        try:
            return importlib.import_module(PROGRAMS[argv[0]][0]).main(argv[1:])
        finally:
            sys.argv[0] = saved
    return run_main(cmd_models, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
