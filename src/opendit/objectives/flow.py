"""Flow matching (SiT) as an Objective: an interpolation path from noise (t = 0) to data (t = 1), trained on the
velocity (or noise / score), sampled by the ODE or SDE samplers of the SiT lineage (``opendit.transport``)."""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..transport import Sampler, Transport
from .base import Objective

FLOW_SAMPLERS = ("ode", "sde")
# the samplers' options and their defaults (sampling_method None: DEFAULT_METHOD of the sampler)
FLOW_OPTIONS = {"sampling_method": None, "timestep_shift": 1.0, "atol": 1e-6, "rtol": 1e-3, "diffusion_form": "sigma",
                "diffusion_norm": 1.0, "last_step": "Mean", "last_step_size": 0.04}
DEFAULT_METHOD = {"ode": "euler", "sde": "Euler"}
ODE_ONLY = ("atol", "rtol")
SDE_ONLY = ("diffusion_form", "diffusion_norm", "last_step", "last_step_size")


class FlowObjective(Objective):
    name = "flow"
    samplers = FLOW_SAMPLERS
    default_sampler = "ode"
    options = FLOW_OPTIONS
    predicts_x0 = False  # a flow predicts no x0 to clamp
    min_steps = 2  # a time grid has two points at least

    def __init__(self, transport: Transport):
        self.transport = transport

    # -- training
    def sample_timesteps(self, n, generator=None, device=None):
        return self.transport.sample_timesteps(n, generator=generator, device=device)

    def training_losses(self, model, x, t=None, model_kwargs=None, noise=None):
        return self.transport.training_losses(model, x, t=t, model_kwargs=model_kwargs, noise=noise)

    # -- sampling
    def check_sampler(self, sampler, options=None):
        unused = {"ode": SDE_ONLY, "sde": ODE_ONLY}[sampler]
        if ignored := [k for k, v in (options or {}).items() if v is not None and k in unused]:
            raise UserError(f"--{ignored[0]} does not apply to the flow's {sampler} sampler")

    def sampler_settings(self, sampler, options):
        settings = {k: options.get(k) if options.get(k) is not None else v for k, v in FLOW_OPTIONS.items()}
        settings["sampling_method"] = settings["sampling_method"] or DEFAULT_METHOD[sampler]
        if settings["last_step"] == "none":  # --last_step none: the SDE ends without a last step
            settings["last_step"] = None
        return settings

    def sample(self, fn, z, model_kwargs, *, sampler, steps, clip_denoised=False, progress=False, **options):
        self.check_call(sampler, options)
        o = self.sampler_settings(sampler, options)
        try:  # the sampler's own checks (method names, SBDM at t = 0, torchdiffeq present) are the user's to fix
            if sampler == "ode":
                sample_fn = Sampler(self.transport).sample_ode(
                    sampling_method=o["sampling_method"], num_steps=steps, atol=o["atol"], rtol=o["rtol"],
                    timestep_shift=o["timestep_shift"])
            else:
                sample_fn = Sampler(self.transport).sample_sde(
                    sampling_method=o["sampling_method"], diffusion_form=o["diffusion_form"],
                    diffusion_norm=o["diffusion_norm"], last_step=o["last_step"], last_step_size=o["last_step_size"],
                    num_steps=steps, timestep_shift=o["timestep_shift"])
        except (ValueError, ImportError) as e:
            raise UserError(str(e)) from None
        return sample_fn.final(z, fn, **model_kwargs)

    @property
    def quick_sampler(self) -> dict:
        """Heun on an 11-point grid: 10 steps of 2 evaluations."""
        return dict(sampler="ode", steps=11, sampling_method="heun")

    def guidance_time(self, t: torch.Tensor) -> float:
        return float(t.reshape(-1)[0])

    def noise_level(self, t: torch.Tensor) -> float:
        """sigma_t / alpha_t of the path ((1 - t) / t on the Linear path; inf at t = 0)."""
        tt = torch.tensor(float(t.reshape(-1)[0]), dtype=torch.float64)
        alpha, sigma = float(self.transport.path.alpha(tt)[0]), float(self.transport.path.sigma(tt)[0])
        return math.inf if alpha == 0.0 else sigma / alpha

    def describe_sampler(self, sampler, steps, options):
        method = options.get("sampling_method") or DEFAULT_METHOD[sampler]
        text = f"flow {sampler.upper()} {method}, {steps}-point grid"
        if options.get("timestep_shift") not in (None, 1.0):
            text += f", timestep shift {options['timestep_shift']:g}"
        return text

    # -- what a run records
    def record(self) -> dict:
        """The resolved settings (the eps values the transport chose)."""
        tr = self.transport
        return {"objective": "flow", "path_type": tr.path.name, "prediction": tr.model_type.value,
                "loss_weight": tr.loss_type.value, "train_eps": tr.train_eps, "sample_eps": tr.sample_eps,
                "time_sampling": tr.time_sampling, "time_mean": tr.time_mean, "time_std": tr.time_std,
                "cosine_loss": tr.cosine_loss}

    def describe(self) -> str:
        tr = self.transport
        t = tr.time_sampling + (f"({tr.time_mean:g}, {tr.time_std:g})" if tr.time_sampling == "logit_normal" else "")
        return (f"flow ({tr.path.name} path, {tr.model_type.value} prediction, t {t}"
                + (f", cosine loss x{tr.cosine_loss:g}" if tr.cosine_loss else "") + ")")
