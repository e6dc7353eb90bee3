"""A DiT ready to sample from any checkpoint: the model it describes, built and loaded, and the space it works in.

What the checkpoint determines (classes, channels, patch size, width, depth, token grid) is read from it; flags that
contradict it are errors. A run directory's config.json adds what a bare state dict cannot say (image size, VAE, class
names, a non-square grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


from ..checkpoint import load_into, load_weights
from ..config.sample import CheckpointSettings
from ..errors import UserError
from ..models import MODEL_NAMES, DiT, DiTConfig, config_from_state_dict, model_config, unknown_model
from ..objectives import Objective, resolve_objective
from ..parallelize import ModelOptions, check_model_options
from ..published import fetch_latent_stats, published_objective
from ..space import Space, sampling_space
from ..vae import LatentNorm, load_latent_stats, resolve_vae


@dataclass
class Loaded:
    model: DiT
    space: Space
    name: str  # the registry name (DiT-XL/2, ...)
    num_classes: int
    class_names: list
    source: str  # the weights file
    objective: Objective = None  # what the model was trained with (opendit.objectives)
    objective_note: str = ""  # how the objective was decided

    # what the space says, by the names the sampling programs use
    codec = property(lambda self: self.space.codec)
    image_size = property(lambda self: self.space.image_size)
    input_size = property(lambda self: self.space.input_size)
    in_channels = property(lambda self: self.space.channels)


def _model_name(model: str | None, run_cfg: dict | None, cfg: dict) -> str:
    """The registry name of the checkpoint's model: --model (checked), the run's, or the one its shapes match."""
    desc = f"depth {cfg['depth']}, width {cfg['hidden_size']}, patch {cfg['patch_size']}"
    name = model or (run_cfg or {}).get("model") or cfg["name"]
    if name is None:
        raise UserError(f"the checkpoint ({desc}) matches no registered config; pass --model")
    if name not in MODEL_NAMES:
        raise UserError(unknown_model(name))
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


def _vae_name(vae: str, run_cfg: dict | None, cfg: dict, image_size: int | None) -> str | None:
    if vae != "auto":
        return resolve_vae(vae, image_size or 0)
    if run_cfg is not None and "vae_resolved" in run_cfg:
        return run_cfg["vae_resolved"]
    return resolve_vae("ema", 0) if cfg["in_channels"] == 4 else None  # the published checkpoints: SD-VAE latents


def latent_norm(c: CheckpointSettings, run_cfg: dict | None) -> LatentNorm | None:
    """The per-channel latent normalization the model was trained with: --latent_stats, else the run's record, else
    the statistics published with the checkpoint (by name)."""
    run = (run_cfg or {}).get("latent_stats")
    multiplier, stats = c.latent_multiplier, c.latent_stats
    if not stats and run is None:  # a published LightningDiT's statistics, fetched beside it
        stats = fetch_latent_stats(c.ckpt)
    if stats:
        return load_latent_stats(stats, multiplier if multiplier is not None else (run or {}).get("multiplier", 1.0))
    if multiplier is not None:
        raise UserError("--latent_multiplier goes with --latent_stats")
    return LatentNorm.from_record(run, "of the run's config.json") if run else None


def checkpoint_config(sd: dict, run_cfg: dict | None, name: str, input_size: tuple[int, int]) -> DiTConfig:
    """The DiTConfig of a checkpoint: what the weights show, and from the run's config.json what they cannot (no
    absolute position embedding, a non-square grid); the heads of the registry name."""
    return DiTConfig.from_state_dict(sd, input_size=input_size, num_heads=model_config(name)["num_heads"],
                                     wo_pos_embed=bool((run_cfg or {}).get("wo_pos_embed", False)))


def load_for_sampling(c: CheckpointSettings, options: ModelOptions, device, precision=None) -> Loaded:
    """Build the model a checkpoint describes (``c``: the sampling programs' checkpoint settings), check the settings
    against it and ``options`` (attention backend) against this machine, and load the weights."""
    sd, source, run_cfg = load_weights(c.ckpt, c.use_model_weights)
    try:
        described = config_from_state_dict(sd)
    except ValueError as e:
        raise UserError(f"--ckpt {c.ckpt}: {e}") from None
    name = _model_name(c.model, run_cfg, described)
    if c.num_classes is not None and c.num_classes != described["num_classes"]:
        raise UserError(f"checkpoint has {described['num_classes']} classes, --num_classes is {c.num_classes}")
    check_model_options(options, device, precision)
    image_size = c.image_size or (run_cfg or {}).get("image_size")
    space = sampling_space(_vae_name(c.vae, run_cfg, described, image_size), _input_size(run_cfg, described),
                           described["in_channels"], described["patch_size"], device, image_size=image_size,
                           norm=latent_norm(c, run_cfg))
    model = DiT(checkpoint_config(sd, run_cfg, name, space.input_size))
    load_into(model, sd, f"--ckpt {source}")
    objective, note = resolve_objective(c.objective, c.flow_flags, run_cfg, sd, described, source,
                                        published_objective(c.ckpt))
    model = model.to(device).eval().set_attention_impl(options.attention)
    names = (run_cfg or {}).get("class_names") or [str(i) for i in range(described["num_classes"])]
    return Loaded(model, space, name, described["num_classes"], names, source, objective, note)


def sampler_settings(cfg, loaded: Loaded) -> dict:
    """``generate``'s keyword arguments from a sampling program's config (GridConfig or FolderConfig), checked
    against the checkpoint's objective."""
    from .cache import cache_from_flags
    from .generate import guidance_interval

    objective, s, g, c = loaded.objective, cfg.sampler, cfg.guidance, cfg.cache
    if g.guidance_channels is not None and g.guidance_channels > loaded.in_channels:  # the parser checked >= 1
        raise UserError(f"--guidance_channels must be in 1..{loaded.in_channels}, got {g.guidance_channels}")
    sampler = s.sampler if s.sampler != "auto" else objective.default_sampler
    if sampler not in objective.samplers:
        raise UserError(f"--sampler {sampler}: {loaded.source} is a {objective.name} model ({loaded.objective_note}); "
                        f"its samplers are {', '.join(objective.samplers)}")
    if unknown := [k for k in s.options if k not in objective.options]:
        raise UserError(f"--{unknown[0]} is a flow sampling option; {loaded.source} is a {objective.name} model")
    objective.check_sampler(sampler, s.options)
    if s.clip_denoised != "auto" and not objective.predicts_x0:
        raise UserError(f"--clip_denoised does not apply to the {objective.name}'s {sampler} sampler (a {objective.name} "
                        f"predicts no x0 to clamp)")
    steps = s.num_sampling_steps if s.num_sampling_steps is not None else (objective.default_steps or 250)
    if steps < objective.min_steps:
        raise UserError(f"--num_sampling_steps: a {objective.name} sampler needs at least {objective.min_steps}")
    scale = g.cfg_scale if g.cfg_scale is not None else (1.0 if objective.guidance_trained_in else g.DEFAULT_SCALE)
    if objective.guidance_trained_in and scale != 1.0:
        raise UserError(f"--cfg_scale {scale:g}: guidance is trained into {loaded.source} ({loaded.objective_note}); "
                        f"sample it at --cfg_scale 1 (another scale would guide twice)")
    interval = guidance_interval(g.cfg_interval, g.cfg_interval_sigma)
    out = dict(sampler=sampler, steps=steps, cfg_scale=scale,
               guidance_channels=g.guidance_channels, cfg_interval=None, cfg_interval_sigma=None, objective=objective,
               **s.options)
    if interval is not None:
        out["cfg_interval" if interval.axis == "t" else "cfg_interval_sigma"] = (interval.lo, interval.hi)
    if (cache := cache_from_flags(c.cache_method, c.cache_interval, c.cache_warmup)) is not None:
        out["cache"] = cache
    return out


def clip_for(cfg, loaded: Loaded) -> bool:
    """Clamp the x0 prediction (an objective without one: False; auto: in pixel space)."""
    if not loaded.objective.predicts_x0:
        return False
    return {"yes": True, "no": False}.get(cfg.sampler.clip_denoised, loaded.codec is None)
