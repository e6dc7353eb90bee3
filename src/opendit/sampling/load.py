"""A DiT ready to sample from any checkpoint: the model it describes, built and loaded, and the space it works in.

What the checkpoint determines (classes, channels, patch size, width, depth, token grid) is read from it; flags that
contradict it are errors. A run directory's config.json adds what a bare state dict cannot say (image size, VAE, class
names, a non-square grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..models import DiT, DiT_models, config_from_state_dict, model_config, unknown_model
from ..objectives import FLOW_SETTINGS, build_objective, objective_name
from ..parallelize import ModelOptions, check_model_options
from ..published import fetch_latent_stats, published_objective
from ..space import Space, sampling_space
from ..training.checkpoint import load_into, load_weights
from ..vae import LatentNorm, load_latent_stats, resolve_vae


@dataclass
class Loaded:
    model: DiT
    space: Space
    name: str  # the registry name (DiT-XL/2, ...)
    num_classes: int
    class_names: list
    source: str  # the weights file
    objective: object = None  # the GaussianDiffusion or the Transport (flow) the model was trained with
    objective_note: str = ""  # how the objective was decided

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


def _vae_name(args, run_cfg: dict | None, cfg: dict, image_size: int | None) -> str | None:
    if args.vae != "auto":
        return resolve_vae(args.vae, image_size or 0)
    if run_cfg is not None and "vae_resolved" in run_cfg:
        return run_cfg["vae_resolved"]
    return resolve_vae("ema", 0) if cfg["in_channels"] == 4 else None  # the published checkpoints: SD-VAE latents


def latent_norm(args, run_cfg: dict | None) -> LatentNorm | None:
    """The per-channel latent normalization the model was trained with: --latent_stats, else the run's record, else
    the statistics published with the checkpoint (by name)."""
    run = (run_cfg or {}).get("latent_stats")
    multiplier = getattr(args, "latent_multiplier", None)
    stats = getattr(args, "latent_stats", None)
    if not stats and run is None:  # a published LightningDiT's statistics, fetched beside it
        stats = fetch_latent_stats(getattr(args, "ckpt", None))
    if stats:
        return load_latent_stats(stats, multiplier if multiplier is not None else (run or {}).get("multiplier", 1.0))
    if multiplier is not None:
        raise UserError("--latent_multiplier goes with --latent_stats")
    return LatentNorm.from_record(run, "of the run's config.json") if run else None


def checkpoint_block_options(run_cfg: dict | None, cfg: dict) -> dict:
    """The block options: what the weights show (RMSNorm, SwiGLU, RoPE, QK-norm, no shift), and from the run's
    config.json what they cannot (no absolute position embedding)."""
    return dict(cfg["options"], wo_pos_embed=bool((run_cfg or {}).get("wo_pos_embed", False)))


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
                           cfg["patch_size"], device, image_size=image_size, norm=latent_norm(args, run_cfg))
    model = DiT(input_size=space.input_size, patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
                hidden_size=cfg["hidden_size"], depth=cfg["depth"], num_heads=model_config(name)["num_heads"],
                mlp_ratio=cfg["mlp_ratio"], class_dropout_prob=0.1, num_classes=cfg["num_classes"],
                learn_sigma=cfg["learn_sigma"], **checkpoint_block_options(run_cfg, cfg))
    load_into(model, sd, f"--ckpt {source}")
    objective, note = resolve_objective(args, run_cfg, sd, cfg, source, published_objective(args.ckpt))
    model = model.to(device).eval().set_attention_impl(options.attention)
    names = (run_cfg or {}).get("class_names") or [str(i) for i in range(cfg["num_classes"])]
    return Loaded(model, space, name, cfg["num_classes"], names, source, objective, note)


def trained_kind(sd: dict, cfg: dict) -> str | None:
    """What a learn_sigma DiT state dict was trained as, from its weights: the diffusion trains the variance half of
    the final layer (its vb loss), a flow never touches it (it keeps its zero initialization exactly: no gradient, and
    AdamW's decay keeps zero at zero), as in the published SiT checkpoints. None without a variance half or for an
    untrained model."""
    if not cfg["learn_sigma"]:
        return None
    c = cfg["in_channels"]
    w, b = sd["final_layer.linear.weight"], sd["final_layer.linear.bias"]
    if w.shape[0] % (2 * c):
        return None
    variance = torch.arange(w.shape[0]) % (2 * c) >= c  # rows are (p, q, channel), the channel fastest
    if not (torch.any(w[~variance] != 0) or torch.any(b[~variance] != 0)):
        return None  # an untrained model (the final layer starts at zero): nothing to tell
    untouched = not torch.any(w[variance] != 0) and not torch.any(b[variance] != 0)
    return "flow" if untouched else "diffusion"


def resolve_objective(args, run_cfg: dict | None, sd: dict, cfg: dict, source: str, published: str | None = None):
    """The objective to sample with: the run's (config.json), else --objective, else what the weights say, else what
    the published checkpoint of that name was trained as; a flag that contradicts the run or the weights is a
    one-line error (a flow sampled as a diffusion gives noise)."""
    flag = getattr(args, "objective", "auto") or "auto"
    weights = trained_kind(sd, cfg)
    if run_cfg is not None:
        kind, why = run_cfg.get("objective") or "diffusion", "the run's config.json"
        settings = dict(run_cfg, objective=kind)
        for key in ("path_type", "prediction"):  # what the model was trained to predict is the run's
            ours = getattr(args, key, None)
            if ours is not None and kind == "flow" and ours != run_cfg.get(key):
                raise UserError(f"--{key} {ours}: {source} was trained with --{key} {run_cfg.get(key)}; drop it")
        if getattr(args, "sample_eps", None) is not None:  # a sampling margin: ours may differ (e.g. for SBDM)
            settings["sample_eps"] = args.sample_eps
    else:
        if flag != "auto":
            kind, why = flag, "--objective"
        elif weights is None and published is not None:  # weights that cannot tell (no variance half): the record
            kind, why = published, "the published checkpoint's record"
        else:
            kind, why = weights or "diffusion", "the weights"
        settings = {"objective": kind, **{k: getattr(args, k, None) for k in FLOW_SETTINGS}}
    if flag != "auto" and flag != kind:
        raise UserError(f"--objective {flag}: {source} was trained as {kind} ({why}); drop --objective or use "
                        f"--objective {kind}")
    if weights is not None and weights != kind:
        raise UserError(f"{source} looks {'flow' if weights == 'flow' else 'diffusion'}-trained (its variance "
                        f"channels are {'untouched' if weights == 'flow' else 'trained'}), but {why} says {kind}; "
                        f"sample it with --objective {weights}")
    if weights is None and published is not None and published != kind:
        raise UserError(f"{source} is a published {published} checkpoint, but {why} says {kind}; sample it with "
                        f"--objective {published}")
    if kind != "flow" and run_cfg is None and any(getattr(args, k, None) is not None for k in FLOW_SETTINGS):
        raise UserError(f"--path_type / --prediction / --sample_eps describe a flow; {source} is sampled as {kind}")
    note = f"objective {kind} (from {why})"
    return build_objective(settings), note


def check_sampling_flags(args, loaded: Loaded) -> dict:
    """The sampling flags checked against the checkpoint; returns ``sampler_settings``."""
    g = args.guidance_channels  # the parser has checked the ranges that do not depend on the checkpoint
    if g is not None and g > loaded.in_channels:
        raise UserError(f"--guidance_channels must be in 1..{loaded.in_channels}, got {g}")
    return sampler_settings(args, loaded)  # raises on flags that do not fit the objective


def sampler_settings(args, loaded: Loaded) -> dict:
    """The keyword arguments of ``generate`` for the sampling flags (the sampler resolved for the objective; flow
    options only for a flow), checked against the checkpoint's objective."""
    from .cache import cache_from_flags
    from .generate import DIFFUSION_SAMPLERS, FLOW_OPTIONS, FLOW_SAMPLERS, ODE_ONLY, SDE_ONLY, guidance_interval

    kind = objective_name(loaded.objective)
    sampler = args.sampler if args.sampler != "auto" else ("ode" if kind == "flow" else "ddpm")
    allowed = FLOW_SAMPLERS if kind == "flow" else DIFFUSION_SAMPLERS
    if sampler not in allowed:
        raise UserError(f"--sampler {sampler}: {loaded.source} is a {kind} model ({loaded.objective_note}); its "
                        f"samplers are {', '.join(allowed)}")
    given_flow = [k for k in FLOW_OPTIONS if getattr(args, k, None) is not None]
    if kind != "flow" and given_flow:
        raise UserError(f"--{given_flow[0]} is a flow sampling option; {loaded.source} is a diffusion model")
    unused = {"ode": SDE_ONLY, "sde": ODE_ONLY}.get(sampler, ())
    if kind == "flow" and (ignored := [k for k in given_flow if k in unused] +
                           (["clip_denoised"] if getattr(args, "clip_denoised", "auto") != "auto" else [])):
        raise UserError(f"--{ignored[0]} does not apply to the flow's {sampler} sampler"
                        + (" (a flow predicts no x0 to clamp)" if ignored[0] == "clip_denoised" else ""))
    if args.num_sampling_steps < 2 and kind == "flow":
        raise UserError("--num_sampling_steps: a flow sampler's grid needs at least 2 points")
    interval = guidance_interval(args.cfg_interval, getattr(args, "cfg_interval_sigma", None))
    out = dict(sampler=sampler, steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
               guidance_channels=args.guidance_channels, cfg_interval=None, cfg_interval_sigma=None)
    if interval is not None:
        out["cfg_interval" if interval.axis == "t" else "cfg_interval_sigma"] = (interval.lo, interval.hi)
    if (cache := cache_from_flags(getattr(args, "cache_method", None), getattr(args, "cache_interval", None),
                                  getattr(args, "cache_warmup", None))) is not None:
        out["cache"] = cache
    if kind == "flow":
        out.update(objective=loaded.objective,
                   **{k: getattr(args, k) for k in FLOW_OPTIONS if getattr(args, k, None) is not None})
        if out.get("last_step") == "none":
            out["last_step"] = None
    return out


def clip_for(args, loaded: Loaded) -> bool:
    """Clamp the diffusion's x0 prediction (a flow's samplers have none: False)."""
    if objective_name(loaded.objective) == "flow":
        return False
    return {"yes": True, "no": False}.get(args.clip_denoised, loaded.codec is None)
