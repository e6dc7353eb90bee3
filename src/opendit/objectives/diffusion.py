"""The DiT diffusion as an Objective: DDPM with 1000 linear-schedule steps, epsilon + learned variance (the spec's
recipe), sampled with DDPM, DDIM or DPM-Solver++ (the ADM-lineage ``GaussianDiffusion`` underneath)."""

from __future__ import annotations

import functools

import torch

from ..diffusion import GaussianDiffusion, create_diffusion
from .base import Objective

DIFFUSION_SAMPLERS = ("ddpm", "ddim", "dpm-solver++")


class DiffusionObjective(Objective):
    name = "diffusion"
    samplers = DIFFUSION_SAMPLERS
    default_sampler = "ddpm"
    predicts_x0 = True

    def __init__(self, diffusion: GaussianDiffusion | None = None):
        self.diffusion = diffusion if diffusion is not None else create_diffusion(timestep_respacing="")

    # -- training
    def sample_timesteps(self, n, generator=None, device=None):
        return self.diffusion.sample_timesteps(n, generator=generator, device=device)

    def training_losses(self, model, x, t=None, model_kwargs=None, noise=None):
        return self.diffusion.training_losses(model, x, t, model_kwargs=model_kwargs, noise=noise)

    # -- sampling
    def sample(self, fn, z, model_kwargs, *, sampler, steps, clip_denoised=False, progress=False, **options):
        self.check_call(sampler, options)
        common = dict(noise=z, clip_denoised=clip_denoised, model_kwargs=model_kwargs, progress=progress)
        if sampler == "ddpm":
            return create_diffusion(str(steps)).p_sample_loop(fn, z.shape, **common)
        if sampler == "ddim":
            return create_diffusion(str(steps)).ddim_sample_loop(fn, z.shape, **common)
        return create_diffusion("").dpm_solver_sample_loop(fn, z.shape, num_steps=steps, **common)

    @property
    def quick_sampler(self) -> dict:
        return dict(sampler="dpm-solver++", steps=20)

    def guidance_time(self, t: torch.Tensor) -> float:
        """A model call at timestep k (0..T-1, T-1 the noisiest; a respaced sampler calls the model with the original
        timesteps) is at time 1 - k / T."""
        return 1.0 - float(t.reshape(-1)[0]) / self.diffusion.num_timesteps

    def noise_level(self, t: torch.Tensor) -> float:
        """sqrt(1 / abar_k - 1) of the schedule at timestep k (what EDM calls the sigma of a VP model)."""
        sigmas = self._sigmas()
        return sigmas[min(max(int(round(float(t.reshape(-1)[0]))), 0), len(sigmas) - 1)]

    @functools.cache
    def _sigmas(self) -> list[float]:
        abar = self.diffusion.alphas_cumprod.double() if torch.is_tensor(self.diffusion.alphas_cumprod) else \
            torch.as_tensor(self.diffusion.alphas_cumprod, dtype=torch.float64)
        return torch.sqrt(1.0 / abar - 1.0).tolist()

    def describe_sampler(self, sampler, steps, options):
        return {"dpm-solver++": "DPM-Solver++", "ddpm": "DDPM", "ddim": "DDIM"}[sampler] + f" {steps} steps"

    # -- what a run records
    def record(self) -> dict:
        return {"objective": "diffusion"}

    def describe(self) -> str:
        return f"diffusion (DDPM, {self.diffusion.num_timesteps} steps, epsilon + learned variance)"
