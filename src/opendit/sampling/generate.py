"""Samples from noise with any objective's samplers (``Objective.sample``: the diffusion's DDPM, DDIM and
DPM-Solver++, a flow's ODE and SDE), with classifier-free guidance, optionally only inside a time or noise interval,
and optionally cached steps. Nothing here depends on which objective it is."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..models import DiT
from ..objectives import Objective, as_objective
from .cache import CacheSettings, FeatureCache


def guidance_time(objective, t: torch.Tensor) -> float:
    """The time of a model call on the axis of ``--cfg_interval`` (0 = pure noise, 1 = data), as ``objective`` (an
    Objective, a lineage object or None: the DiT diffusion) places it."""
    return as_objective(objective).guidance_time(t)


def noise_level(objective, t: torch.Tensor) -> float:
    """The noise level sigma of a model call on the axis of ``--cfg_interval_sigma``, in the model's own schedule."""
    return as_objective(objective).noise_level(t)


@dataclass(frozen=True)
class GuidanceInterval:
    """Where guidance acts: model calls whose time t (``axis="t"``: 0 = noise, 1 = data) or noise level sigma
    (``axis="sigma"``, the guidance-interval paper's convention) lies in [lo, hi], ends included up to the float32
    rounding of the time the model is called with."""

    lo: float
    hi: float
    axis: str = "t"

    def contains(self, objective: Objective, t: torch.Tensor) -> bool:
        if self.axis == "t":
            return self.lo - 1e-6 <= objective.guidance_time(t) <= self.hi + 1e-6
        s = objective.noise_level(t)
        return self.lo * (1 - 1e-6) <= s <= self.hi * (1 + 1e-6)

    def describe(self) -> str:
        return f"in [{self.lo:g}, {self.hi:g}]" if self.axis == "t" else f"for sigma in [{self.lo:g}, {self.hi:g}]"


class GuidedModel:
    """The model a sampler calls with the doubled batch [x; x] and labels [y; null]: classifier-free guidance on the
    first ``guidance_channels`` output channels (``DiT.forward_with_cfg``) at the calls inside ``interval`` (a
    GuidanceInterval, or (lo, hi) on the t axis; None: everywhere); outside it the conditional prediction alone, for
    both halves, from one forward of the conditional half (half the compute of a guided step)."""

    def __init__(self, model: DiT, objective, cfg_scale: float, guidance_channels: int | None,
                 interval: GuidanceInterval | tuple[float, float] | None):
        self.model, self.objective, self.cfg_scale = model, as_objective(objective), cfg_scale
        self.guidance_channels, self.interval = guidance_channels, guidance_interval(interval)

    def guided_at(self, t: torch.Tensor) -> bool:
        return self.interval is None or self.interval.contains(self.objective, t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """``kwargs``: per-sample model inputs of the doubled batch besides t (a MeanFlow model's r)."""
        if self.guided_at(t):
            return self.model.forward_with_cfg(x, t, y, self.cfg_scale, guidance_channels=self.guidance_channels,
                                               **kwargs)
        n = len(x) // 2
        cond = self.model.forward(x[:n], t[:n], y[:n], **{k: v[:n] for k, v in kwargs.items()})
        return torch.cat([cond, cond], dim=0)


def check_interval(interval) -> tuple[float, float] | None:
    """``--cfg_interval LO HI`` checked: 0 <= LO <= HI <= 1."""
    if interval is None:
        return None
    lo, hi = (float(v) for v in interval)
    if not (0.0 <= lo <= hi <= 1.0):
        raise UserError(f"--cfg_interval {lo:g} {hi:g}: need 0 <= LO <= HI <= 1 (0 = noise, 1 = data)")
    return lo, hi


def check_sigma_interval(interval) -> tuple[float, float] | None:
    """``--cfg_interval_sigma LO HI`` checked: 0 <= LO <= HI (HI may be inf)."""
    if interval is None:
        return None
    lo, hi = (float(v) for v in interval)
    if not (0.0 <= lo <= hi) or math.isnan(hi) or math.isinf(lo):
        raise UserError(f"--cfg_interval_sigma {lo:g} {hi:g}: need 0 <= LO <= HI (noise levels; HI may be inf)")
    return lo, hi


def guidance_interval(cfg_interval=None, cfg_interval_sigma=None) -> GuidanceInterval | None:
    """The interval of ``--cfg_interval`` (or a GuidanceInterval as is) or ``--cfg_interval_sigma`` (one of them at
    most), checked."""
    if cfg_interval is not None and cfg_interval_sigma is not None:
        raise UserError("--cfg_interval and --cfg_interval_sigma both give the guidance interval; pass one")
    if isinstance(cfg_interval, GuidanceInterval):
        return cfg_interval
    if (t := check_interval(cfg_interval)) is not None:
        return GuidanceInterval(*t)
    if (s := check_sigma_interval(cfg_interval_sigma)) is not None:
        return GuidanceInterval(*s, axis="sigma")
    return None


@torch.no_grad()
def generate(model: DiT, labels: torch.Tensor, noise: torch.Tensor, *, sampler: str = "ddpm", steps: int = 250,
             cfg_scale: float = 4.0, guidance_channels: int | None = None, cfg_interval=None,
             cfg_interval_sigma=None, clip_denoised: bool = False, progress: bool = False, objective=None,
             cache: CacheSettings | FeatureCache | None = None, **options) -> torch.Tensor:
    """Sample from ``noise`` (N, C, H, W) for ``labels`` (N,). ``objective``: the Objective the model was trained with
    (opendit.objectives; a ``GaussianDiffusion`` or ``Transport`` of the lineages' interfaces is wrapped; None: the DiT
    diffusion); ``sampler`` one of its ``samplers`` (diffusion: ddpm, ddim, dpm-solver++; flow: ode, sde) and
    ``options`` its sampler options (a flow's: sampling_method, timestep_shift, atol, rtol, diffusion_form,
    diffusion_norm, last_step, last_step_size). Guidance doubles the batch with null labels, as published; randomness
    beyond ``noise`` comes from the global torch RNG (the ddpm/ddim loops' and the SDE's per-step noise).
    ``cfg_interval`` (lo, hi): guidance only at the calls whose time t (0 = noise) lies in [lo, hi];
    ``cfg_interval_sigma`` (lo, hi): at those whose noise level sigma does; a GuidanceInterval may be passed as
    ``cfg_interval``. ``cache``: cached steps (``opendit.sampling.cache``; a FeatureCache to read its counts
    afterwards), None: every model call runs whole."""
    objective = as_objective(objective)
    interval = guidance_interval(cfg_interval, cfg_interval_sigma)
    objective.check_call(sampler, {k: v for k, v in options.items() if v is not None})
    if objective.guidance_trained_in and cfg_scale != 1.0:
        raise UserError(f"cfg_scale {cfg_scale:g}: guidance is trained into this {objective.name} model; sample at "
                        f"cfg_scale 1 (another scale would guide twice)")
    if cache is not None:
        cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    with cache.attach(model) if cache is not None else contextlib.nullcontext():  # first: it replaces model.forward
        if cfg_scale != 1.0:
            z = torch.cat([noise, noise])
            fn = GuidedModel(model, objective, cfg_scale, guidance_channels, interval)
            kwargs = dict(y=torch.cat([labels, torch.full_like(labels, model.num_classes)]))
        else:
            z, kwargs, fn = noise, dict(y=labels), model.forward
        out = objective.sample(fn, z, kwargs, sampler=sampler, steps=steps, clip_denoised=clip_denoised,
                               progress=progress, **{k: v for k, v in options.items() if v is not None})
    return out[:len(labels)]


def quick_sampler(objective) -> dict:
    """The 20-model-evaluation sampler of training-time grids and FID (``generate``'s keyword arguments):
    DPM-Solver++ 20 steps for the diffusion; for a flow, Heun on an 11-point grid (10 steps of 2 evaluations)."""
    objective = as_objective(objective)
    return dict(objective=objective, **objective.quick_sampler)


def describe_settings(settings: dict) -> str:
    """A sampling call's settings (``generate``'s keyword arguments) in words."""
    known = ("sampler", "steps", "cfg_scale", "guidance_channels", "cfg_interval", "cfg_interval_sigma", "cache",
             "objective", "clip_denoised", "progress")
    objective = as_objective(settings.get("objective"))
    options = {k: v for k, v in settings.items() if k not in known}
    text = objective.describe_sampler(settings["sampler"], settings["steps"], options) + f", cfg {settings['cfg_scale']:g}"
    if settings["cfg_scale"] != 1.0:
        if (interval := guidance_interval(settings.get("cfg_interval"), settings.get("cfg_interval_sigma"))):
            text += " " + interval.describe()
    if settings.get("cache") is not None:
        text += ", " + settings["cache"].describe()
    return text
