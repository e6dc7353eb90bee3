"""MeanFlow as an Objective: a network of two times trained to predict the average velocity over [t, r]
(opendit.transport.meanflow), sampled in 1 or a few network calls, with guidance trained into the weights."""

from __future__ import annotations

import math

import torch

from ..transport.meanflow import MeanFlow
from .base import Objective

# the settings a run records (config.json) and their defaults: the released code's names and values
MEANFLOW_SETTINGS = {"p_mean": -0.4, "p_std": 1.0, "data_proportion": 0.75, "omega": 1.0, "kappa": 0.5,
                     "t_start": 0.0, "t_end": 1.0, "norm_p": 1.0, "norm_eps": 0.01}


class MeanFlowObjective(Objective):
    name = "meanflow"
    samplers = ("meanflow",)
    default_sampler = "meanflow"
    default_steps = 1  # one network call per sample; 2 for two
    model_fields = {"learn_sigma": False, "mean_flow": True}  # the DiT it trains: u(x, t, r), no variance half
    logged_terms = ("mse",)  # the adaptive-weighted loss stays near 1; the error to the target is logged as mse_loss

    def __init__(self, mf: MeanFlow):
        self.mf = mf

    @property
    def guidance_trained_in(self) -> bool:
        return self.mf.guided

    # -- training
    def sample_timesteps(self, n, generator=None, device=None):
        return self.mf.sample_timesteps(n, generator=generator, device=device)

    def training_losses(self, model, x, t=None, model_kwargs=None, noise=None):
        return self.mf.training_losses(model, x, model_kwargs=model_kwargs, t=t, noise=noise)

    # -- sampling
    def sample(self, fn, z, model_kwargs, *, sampler, steps, clip_denoised=False, progress=False, **options):
        self.check_call(sampler, options)
        return self.mf.sample(fn, z, model_kwargs, steps=steps)

    @property
    def quick_sampler(self) -> dict:
        return dict(sampler="meanflow", steps=1)

    def guidance_time(self, t: torch.Tensor) -> float:
        return float(t.reshape(-1)[0])

    def noise_level(self, t: torch.Tensor) -> float:
        t0 = float(t.reshape(-1)[0])
        return math.inf if t0 == 0.0 else (1.0 - t0) / t0

    def describe_sampler(self, sampler, steps, options):
        return f"MeanFlow {steps} step{'s' if steps != 1 else ''}"

    # -- what a run records
    def record(self) -> dict:
        return {"objective": "meanflow", **{k: getattr(self.mf, k) for k in MEANFLOW_SETTINGS}}

    def describe(self) -> str:
        mf = self.mf
        guidance = (f"guidance trained in: omega {mf.omega:g}, kappa {mf.kappa:g}" if mf.guided
                    else "no guidance trained in")
        return (f"meanflow (average velocity u(x, t, r); t, r logit-normal({mf.p_mean:g}, {mf.p_std:g}) on the released "
                f"axis, r = t for {mf.data_proportion:g} of the batch; {guidance}; adaptive weight p {mf.norm_p:g}, eps "
                f"{mf.norm_eps:g})")
