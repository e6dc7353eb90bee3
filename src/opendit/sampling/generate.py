"""Samples from noise: the DDPM, DDIM and DPM-Solver++ loops of the diffusion, the ODE and SDE samplers of a flow
(``opendit.transport``), with classifier-free guidance, optionally only inside a time interval."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch

from ..diffusion import create_diffusion
from ..errors import UserError
from ..models import DiT
from ..transport import Sampler, Transport
from .cache import CacheSettings, FeatureCache

DIFFUSION_SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
FLOW_SAMPLERS = ("ode", "sde")
SAMPLERS = DIFFUSION_SAMPLERS + FLOW_SAMPLERS
FLOW_OPTIONS = {"sampling_method": None, "timestep_shift": 1.0, "atol": 1e-6, "rtol": 1e-3, "diffusion_form": "sigma",
                "diffusion_norm": 1.0, "last_step": "Mean", "last_step_size": 0.04}
DEFAULT_METHOD = {"ode": "euler", "sde": "Euler"}
ODE_ONLY = ("atol", "rtol")
SDE_ONLY = ("diffusion_form", "diffusion_norm", "last_step", "last_step_size")


def guidance_time(objective, t: torch.Tensor) -> float:
    """The time of a model call on the axis of ``--cfg_interval``: 0 = pure noise, 1 = data. A flow's t is that
    already; a diffusion's timestep k (0..999, 999 the noisiest) is 1 - k / 1000."""
    t0 = float(t.reshape(-1)[0])
    return t0 if isinstance(objective, Transport) else 1.0 - t0 / 1000.0


@functools.cache
def _diffusion_sigmas() -> list[float]:
    """sqrt(1 / abar_k - 1) for k = 0..999 of DiT's schedule (float64)."""
    abar = create_diffusion("").alphas_cumprod.double()
    return torch.sqrt(1.0 / abar - 1.0).tolist()


def noise_level(objective, t: torch.Tensor) -> float:
    """The noise level sigma of a model call on the axis of ``--cfg_interval_sigma``, in the model's own schedule: the
    noise-to-signal ratio of x_t = a (data + sigma noise). A flow at t: sigma_t / alpha_t of its path ((1 - t) / t on
    the Linear path; inf at t = 0); a diffusion at timestep k: sqrt(1 / abar_k - 1) of DiT's 1000-step schedule (what
    EDM calls the sigma of a VP model)."""
    t0 = float(t.reshape(-1)[0])
    if isinstance(objective, Transport):
        tt = torch.tensor(t0, dtype=torch.float64)
        alpha, sigma = float(objective.path.alpha(tt)[0]), float(objective.path.sigma(tt)[0])
        return math.inf if alpha == 0.0 else sigma / alpha
    sigmas = _diffusion_sigmas()
    return sigmas[min(max(int(round(t0)), 0), len(sigmas) - 1)]


@dataclass(frozen=True)
class GuidanceInterval:
    """Where guidance acts: model calls whose time t (``axis="t"``: 0 = noise, 1 = data) or noise level sigma
    (``axis="sigma"``, the guidance-interval paper's convention) lies in [lo, hi], ends included up to the float32
    rounding of the time the model is called with."""

    lo: float
    hi: float
    axis: str = "t"

    def contains(self, objective, t: torch.Tensor) -> bool:
        if self.axis == "t":
            return self.lo - 1e-6 <= guidance_time(objective, t) <= self.hi + 1e-6
        s = noise_level(objective, t)
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
        self.model, self.objective, self.cfg_scale = model, objective, cfg_scale
        self.guidance_channels, self.interval = guidance_channels, guidance_interval(interval)

    def guided_at(self, t: torch.Tensor) -> bool:
        return self.interval is None or self.interval.contains(self.objective, t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.guided_at(t):
            return self.model.forward_with_cfg(x, t, y, self.cfg_scale, guidance_channels=self.guidance_channels)
        n = len(x) // 2
        cond = self.model.forward(x[:n], t[:n], y[:n])
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
             cache: CacheSettings | FeatureCache | None = None, **flow_options) -> torch.Tensor:
    """Sample from ``noise`` (N, C, H, W) for ``labels`` (N,). ``objective``: None or a GaussianDiffusion (the DiT
    diffusion; samplers ddpm, ddim, dpm-solver++) or a Transport (a flow; samplers ode, sde with ``flow_options``:
    sampling_method, timestep_shift, atol, rtol, diffusion_form, diffusion_norm, last_step, last_step_size).
    Guidance doubles the batch with null labels, as published; randomness beyond ``noise`` comes from the global
    torch RNG (the ddpm/ddim loops' and the SDE's per-step noise). ``cfg_interval`` (lo, hi): guidance only at the
    calls whose time t (0 = noise) lies in [lo, hi]; ``cfg_interval_sigma`` (lo, hi): at those whose noise level sigma
    does (see ``noise_level``); a GuidanceInterval may be passed as ``cfg_interval``. ``cache``: cached steps
    (``opendit.sampling.cache``; a FeatureCache to read its counts afterwards), None: every model call runs whole."""
    interval = guidance_interval(cfg_interval, cfg_interval_sigma)
    if cache is not None:
        cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    with cache.attach(model) if cache is not None else contextlib.nullcontext():
        return _generate(model, labels, noise, sampler, steps, cfg_scale, guidance_channels, interval,
                         clip_denoised, progress, objective, flow_options)


def _generate(model, labels, noise, sampler, steps, cfg_scale, guidance_channels, cfg_interval, clip_denoised,
              progress, objective, flow_options) -> torch.Tensor:
    n = len(labels)
    flow = isinstance(objective, Transport)
    if sampler not in (FLOW_SAMPLERS if flow else DIFFUSION_SAMPLERS):
        kind = "a flow" if flow else "a diffusion"
        raise UserError(f"sampler {sampler!r} does not sample {kind} model; choose from "
                        f"{', '.join(FLOW_SAMPLERS if flow else DIFFUSION_SAMPLERS)}")
    if unknown := set(flow_options) - set(FLOW_OPTIONS):
        raise TypeError(f"generate: unknown options {sorted(unknown)}")
    if cfg_scale != 1.0:
        z = torch.cat([noise, noise])
        fn = GuidedModel(model, objective, cfg_scale, guidance_channels, cfg_interval)
        kwargs = dict(y=torch.cat([labels, torch.full_like(labels, model.num_classes)]))
    else:
        z, kwargs, fn = noise, dict(y=labels), model.forward
    if flow:
        out = sample_flow(objective, fn, z, kwargs, sampler, steps, {**FLOW_OPTIONS, **flow_options})
    elif sampler == "ddpm":
        out = create_diffusion(str(steps)).p_sample_loop(fn, z.shape, noise=z, clip_denoised=clip_denoised,
                                                         model_kwargs=kwargs, progress=progress)
    elif sampler == "ddim":
        out = create_diffusion(str(steps)).ddim_sample_loop(fn, z.shape, noise=z, clip_denoised=clip_denoised,
                                                            model_kwargs=kwargs, progress=progress)
    else:
        out = create_diffusion("").dpm_solver_sample_loop(fn, z.shape, noise=z, model_kwargs=kwargs, num_steps=steps,
                                                          clip_denoised=clip_denoised, progress=progress)
    return out[:n]


def sample_flow(transport: Transport, fn, z: torch.Tensor, kwargs: dict, sampler: str, steps: int, o: dict):
    method = o["sampling_method"] or DEFAULT_METHOD[sampler]
    try:  # the sampler's own checks (method names, SBDM at t = 0, torchdiffeq present) are the user's to fix
        if sampler == "ode":
            sample_fn = Sampler(transport).sample_ode(sampling_method=method, num_steps=steps, atol=o["atol"],
                                                      rtol=o["rtol"], timestep_shift=o["timestep_shift"])
        else:
            sample_fn = Sampler(transport).sample_sde(
                sampling_method=method, diffusion_form=o["diffusion_form"], diffusion_norm=o["diffusion_norm"],
                last_step=o["last_step"], last_step_size=o["last_step_size"], num_steps=steps,
                timestep_shift=o["timestep_shift"])
    except (ValueError, ImportError) as e:
        raise UserError(str(e)) from None
    return sample_fn.final(z, fn, **kwargs)


def quick_sampler(objective) -> dict:
    """The 20-model-evaluation sampler of training-time grids and FID: DPM-Solver++ 20 steps for the diffusion; for a
    flow, Heun on an 11-point grid (10 steps of 2 evaluations)."""
    if isinstance(objective, Transport):
        return dict(objective=objective, sampler="ode", steps=11, sampling_method="heun")
    return dict(sampler="dpm-solver++", steps=20)


def describe_sampler(sampler: str, steps: int, **flow_options) -> str:
    if sampler == "ode":
        return f"flow ODE {flow_options.get('sampling_method') or DEFAULT_METHOD['ode']}, {steps}-point grid"
    if sampler == "sde":
        return f"flow SDE {flow_options.get('sampling_method') or DEFAULT_METHOD['sde']}, {steps}-point grid"
    return {"dpm-solver++": "DPM-Solver++", "ddpm": "DDPM", "ddim": "DDIM"}[sampler] + f" {steps} steps"


def describe_settings(settings: dict) -> str:
    """A sampling call's settings (``generate``'s keyword arguments) in words."""
    flow = {k: v for k, v in settings.items() if k in FLOW_OPTIONS}
    text = describe_sampler(settings["sampler"], settings["steps"], **flow) + f", cfg {settings['cfg_scale']:g}"
    if settings["cfg_scale"] != 1.0:
        if (interval := guidance_interval(settings.get("cfg_interval"), settings.get("cfg_interval_sigma"))):
            text += " " + interval.describe()
    if settings.get("cache") is not None:
        text += ", " + settings["cache"].describe()
    if flow.get("timestep_shift") not in (None, 1.0):
        text += f", timestep shift {flow['timestep_shift']:g}"
    return text
