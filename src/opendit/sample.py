"""Sample a DiT from any checkpoint.

    python scripts/dit/sample_dit.py --ckpt DiT-XL-2-256x256.pt --cfg_scale 4.0 --out sample.png
    python scripts/dit/sample_dit.py --ckpt outputs/000-DiT-XL-2 --sampler dpm-solver++ --num_sampling_steps 20

What the checkpoint determines (classes, channels, patch size, width, depth, token grid) is read from it; flags that
contradict it are errors. The published sampler is reproduced exactly with ``--sampler ddpm --num_sampling_steps 250
--guidance_channels 3`` and the same seed: torch.manual_seed(seed), then z = randn(n, C, H, W), then the loop.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import torch

from . import parallel
from .checkpoint import load_into, load_weights
from .diffusion import create_diffusion
from .errors import NONNEG_FLOAT, POSITIVE_INT, SEED, ArgumentParser, UserError, int_flag
from .images import labelled_grid, save_image_atomic
from .models import DiT, DiT_models, config_from_state_dict, model_config
from .vae import LatentCodec, load_vae, resolve_vae

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
PUBLISHED_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # the published sample.py's ImageNet classes


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
    a("--mixed_precision", default="fp32", choices=list(parallel.PRECISIONS))
    a("--enable_flashattn", action="store_true")
    a("--seed", type=SEED, default=0)
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])


@dataclass
class Loaded:
    model: DiT
    codec: LatentCodec | None
    name: str
    image_size: int
    input_size: tuple
    in_channels: int
    num_classes: int
    class_names: list
    source: str


def load_for_sampling(args, device) -> Loaded:
    """Build the model a checkpoint describes, check the flags against it, and load the weights."""
    sd, source, run_cfg = load_weights(args.ckpt, args.use_model_weights)
    try:
        cfg = config_from_state_dict(sd)
    except ValueError as e:
        raise UserError(f"--ckpt {args.ckpt}: {e}") from None
    desc = f"depth {cfg['depth']}, width {cfg['hidden_size']}, patch {cfg['patch_size']}"

    name = args.model or (run_cfg or {}).get("model") or cfg["name"]
    if name is None:
        raise UserError(f"the checkpoint ({desc}) matches no registered config; pass --model")
    if name not in DiT_models:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(DiT_models)}")
    mc = model_config(name)
    if (mc["depth"], mc["hidden_size"], mc["patch_size"]) != (cfg["depth"], cfg["hidden_size"], cfg["patch_size"]):
        raise UserError(f"the checkpoint is {cfg['name'] or 'a DiT'} ({desc}), --model is {name}")
    if args.num_classes is not None and args.num_classes != cfg["num_classes"]:
        raise UserError(f"checkpoint has {cfg['num_classes']} classes, --num_classes is {args.num_classes}")

    # pixel or latent space, and the image size
    image_size = args.image_size or (run_cfg or {}).get("image_size")
    if args.vae != "auto":
        vae_name = resolve_vae(args.vae, image_size or 0)
    elif run_cfg is not None and "vae_resolved" in run_cfg:
        vae_name = run_cfg["vae_resolved"]
    else:  # the published checkpoints: 4 channels are SD-VAE latents
        vae_name = resolve_vae("ema", 0) if cfg["in_channels"] == 4 else None
    grid_side = math.isqrt(cfg["num_tokens"])
    run_input = (run_cfg or {}).get("input_size")
    if run_input is not None and not isinstance(run_input, int):
        input_size = tuple(run_input)  # a non-square run
    else:
        input_size = (grid_side * cfg["patch_size"],) * 2
        if grid_side * grid_side != cfg["num_tokens"]:
            raise UserError(f"the checkpoint has {cfg['num_tokens']} tokens, not a square grid; sample it from its run directory")
    codec = None
    if vae_name is not None:
        codec = load_vae(vae_name, device)
        if codec.latent_channels != cfg["in_channels"]:
            raise UserError(f"checkpoint has {cfg['in_channels']} input channels but the VAE's latents have "
                            f"{codec.latent_channels}; use --vae none for a pixel-space checkpoint")
        implied = input_size[0] * codec.downsample
    else:
        implied = input_size[0]
    if image_size is not None and image_size != implied:
        space = f"latents through the VAE (x{codec.downsample})" if codec else "pixels"
        raise UserError(f"checkpoint has a {input_size[0] // cfg['patch_size']}x{input_size[1] // cfg['patch_size']} token "
                        f"grid with patch {cfg['patch_size']}: in {space} that is --image_size {implied}, not {image_size}")
    image_size = implied

    model = DiT(input_size=input_size, patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
                hidden_size=cfg["hidden_size"], depth=cfg["depth"], num_heads=mc["num_heads"], mlp_ratio=cfg["mlp_ratio"],
                class_dropout_prob=0.1, num_classes=cfg["num_classes"], learn_sigma=cfg["learn_sigma"],
                enable_flashattn=args.enable_flashattn)
    load_into(model, sd, f"--ckpt {source}")
    model = model.to(device).eval()
    names = (run_cfg or {}).get("class_names") or [str(i) for i in range(cfg["num_classes"])]
    return Loaded(model, codec, name, image_size, input_size, cfg["in_channels"], cfg["num_classes"], names, source)


@torch.no_grad()
def generate(model: DiT, labels: torch.Tensor, noise: torch.Tensor, *, sampler: str = "ddpm", steps: int = 250,
             cfg_scale: float = 4.0, guidance_channels: int | None = None, clip_denoised: bool = False,
             progress: bool = False) -> torch.Tensor:
    """Sample from ``noise`` (N, C, H, W) for ``labels`` (N,). Guidance doubles the batch with null labels, as published;
    randomness beyond ``noise`` comes from the global torch RNG (the ddpm/ddim loops' per-step noise)."""
    n = len(labels)
    if cfg_scale != 1.0:
        z = torch.cat([noise, noise])
        kwargs = dict(y=torch.cat([labels, torch.full_like(labels, model.num_classes)]), cfg_scale=cfg_scale,
                      guidance_channels=guidance_channels)
        fn = model.forward_with_cfg
    else:
        z, kwargs, fn = noise, dict(y=labels), model.forward
    if sampler == "ddpm":
        out = create_diffusion(str(steps)).p_sample_loop(fn, z.shape, noise=z, clip_denoised=clip_denoised,
                                                         model_kwargs=kwargs, progress=progress)
    elif sampler == "ddim":
        out = create_diffusion(str(steps)).ddim_sample_loop(fn, z.shape, noise=z, clip_denoised=clip_denoised,
                                                            model_kwargs=kwargs, progress=progress)
    elif sampler == "dpm-solver++":
        out = create_diffusion("").dpm_solver_sample_loop(fn, z.shape, noise=z, model_kwargs=kwargs, num_steps=steps,
                                                          clip_denoised=clip_denoised, progress=progress)
    else:
        raise UserError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    return out[:n]


def check_sampling_flags(args, loaded: Loaded) -> None:
    g = args.guidance_channels  # the parser has checked the ranges that do not depend on the checkpoint
    if g is not None and g > loaded.in_channels:
        raise UserError(f"--guidance_channels must be in 1..{loaded.in_channels}, got {g}")
    if args.enable_flashattn and (not torch.cuda.is_available() or args.mixed_precision == "fp32"):
        raise UserError("--enable_flashattn needs a CUDA GPU and --mixed_precision bf16 or fp16")


def clip_for(args, loaded: Loaded) -> bool:
    return {"yes": True, "no": False}.get(args.clip_denoised, loaded.codec is None)


def to_images(loaded: Loaded, x: torch.Tensor) -> torch.Tensor:
    """Samples (latents or pixels) -> images in [-1, 1]."""
    return loaded.codec.decode(x) if loaded.codec is not None else x.clamp(-1, 1)


def parse_labels(text: str | None, num_classes: int) -> list[int]:
    if text is None:
        if num_classes == 1000:
            return list(PUBLISHED_LABELS)
        return list(range(num_classes)) if num_classes <= 16 else [round(i * (num_classes - 1) / 7) for i in range(8)]
    try:
        labels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--labels must be a comma-separated list of class indices, got {text!r}") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    if not labels or bad:
        raise UserError(f"--labels: class {bad[0] if bad else '?'} is outside 0..{num_classes - 1}")
    return labels


def main(argv=None) -> int:
    p = ArgumentParser(description="Sample a grid of images from a DiT checkpoint.")
    add_model_flags(p, cfg_scale=4.0)
    p.add_argument("--labels", default=None, help="comma-separated class indices (default: a fixed set)")
    p.add_argument("--out", default="sample.png", help="the grid PNG (one row per label)")
    args = p.parse_args(argv)
    try:
        device = parallel.pick_device(args.device, 0)
        precision = parallel.Precision(args.mixed_precision, device)
        loaded = load_for_sampling(args, device)
        check_sampling_flags(args, loaded)
        labels = parse_labels(args.labels, loaded.num_classes)
        torch.manual_seed(args.seed)
        y = torch.tensor(labels, device=device)
        z = torch.randn(len(labels), loaded.in_channels, *loaded.input_size, device=device)
        with precision.autocast():
            x = generate(loaded.model, y, z, sampler=args.sampler, steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
                         guidance_channels=args.guidance_channels, clip_denoised=clip_for(args, loaded), progress=True)
        images = to_images(loaded, x.float())
        if os.path.dirname(args.out):
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
        save_image_atomic(labelled_grid(images, labels, loaded.class_names), args.out)
        print(f"{loaded.name} from {loaded.source}: {len(labels)} samples, {args.sampler} {args.num_sampling_steps} steps, "
              f"cfg {args.cfg_scale} -> {args.out}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
