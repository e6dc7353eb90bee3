"""A DiT ready to sample from any checkpoint: the model it describes, built and loaded, and the space it works in.

What the checkpoint determines (classes, channels, patch size, width, depth, token grid) is read from it; flags that
contradict it are errors. A run directory's config.json adds what a bare state dict cannot say (image size, VAE, class
names, a non-square grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


from ..errors import UserError
from ..models import DiT, DiT_models, config_from_state_dict, model_config
from ..parallelize import ModelOptions, check_model_options
from ..space import Space, sampling_space
from ..training.checkpoint import load_into, load_weights
from ..vae import resolve_vae


@dataclass
class Loaded:
    model: DiT
    space: Space
    name: str  # the registry name (DiT-XL/2, ...)
    num_classes: int
    class_names: list
    source: str  # the weights file

    # what the space says, by the names the sampling programs use
    codec = property(lambda self: self.space.codec)
    image_size = property(lambda self: self.space.image_size)
    input_size = property(lambda self: self.space.input_size)
    in_channels = property(lambda self: self.space.channels)


def _model_name(args, run_cfg: dict | None, cfg: dict) -> str:
    """The registry name of the checkpoint's model: --model (checked), the run's, or the one its shapes match."""
    desc = f"depth {cfg['depth']}, width {cfg['hidden_size']}, patch {cfg['patch_size']}"
    name = args.model or (run_cfg or {}).get("model") or cfg["name"]
    if name is None:
        raise UserError(f"the checkpoint ({desc}) matches no registered config; pass --model")
    if name not in DiT_models:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(DiT_models)}")
    mc = model_config(name)
    if (mc["depth"], mc["hidden_size"], mc["patch_size"]) != (cfg["depth"], cfg["hidden_size"], cfg["patch_size"]):
        raise UserError(f"the checkpoint is {cfg['name'] or 'a DiT'} ({desc}), --model is {name}")
    return name


def _input_size(run_cfg: dict | None, cfg: dict) -> tuple[int, int]:
    """The model's input grid: the run's (possibly non-square) or the square one of the token count."""
    run_input = (run_cfg or {}).get("input_size")
    if run_input is not None and not isinstance(run_input, int):
        return tuple(run_input)  # a non-square run
    side = math.isqrt(cfg["num_tokens"])
    if side * side != cfg["num_tokens"]:
        raise UserError(f"the checkpoint has {cfg['num_tokens']} tokens, not a square grid; sample it from its run directory")
    return (side * cfg["patch_size"],) * 2


def _vae_name(args, run_cfg: dict | None, cfg: dict, image_size: int | None) -> str | None:
    if args.vae != "auto":
        return resolve_vae(args.vae, image_size or 0)
    if run_cfg is not None and "vae_resolved" in run_cfg:
        return run_cfg["vae_resolved"]
    return resolve_vae("ema", 0) if cfg["in_channels"] == 4 else None  # the published checkpoints: SD-VAE latents


def load_for_sampling(args, device, precision=None) -> Loaded:
    """Build the model a checkpoint describes (``args``: the sampling programs' model flags), check the flags against
    it and against this machine, and load the weights."""
    sd, source, run_cfg = load_weights(args.ckpt, args.use_model_weights)
    try:
        cfg = config_from_state_dict(sd)
    except ValueError as e:
        raise UserError(f"--ckpt {args.ckpt}: {e}") from None
    name = _model_name(args, run_cfg, cfg)
    if args.num_classes is not None and args.num_classes != cfg["num_classes"]:
        raise UserError(f"checkpoint has {cfg['num_classes']} classes, --num_classes is {args.num_classes}")
    options = ModelOptions.from_flags(args)
    check_model_options(options, device, precision)
    image_size = args.image_size or (run_cfg or {}).get("image_size")
    space = sampling_space(_vae_name(args, run_cfg, cfg, image_size), _input_size(run_cfg, cfg), cfg["in_channels"],
                           cfg["patch_size"], device, image_size=image_size)
    model = DiT(input_size=space.input_size, patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
                hidden_size=cfg["hidden_size"], depth=cfg["depth"], num_heads=model_config(name)["num_heads"],
                mlp_ratio=cfg["mlp_ratio"], class_dropout_prob=0.1, num_classes=cfg["num_classes"],
                learn_sigma=cfg["learn_sigma"])
    load_into(model, sd, f"--ckpt {source}")
    model = model.to(device).eval().set_attention_impl(options.attention)
    names = (run_cfg or {}).get("class_names") or [str(i) for i in range(cfg["num_classes"])]
    return Loaded(model, space, name, cfg["num_classes"], names, source)


def check_sampling_flags(args, loaded: Loaded) -> None:
    g = args.guidance_channels  # the parser has checked the ranges that do not depend on the checkpoint
    if g is not None and g > loaded.in_channels:
        raise UserError(f"--guidance_channels must be in 1..{loaded.in_channels}, got {g}")


def clip_for(args, loaded: Loaded) -> bool:
    return {"yes": True, "no": False}.get(args.clip_denoised, loaded.codec is None)
