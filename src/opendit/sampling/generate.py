"""Samples from noise: the DDPM, DDIM and DPM-Solver++ loops of the diffusion, with classifier-free guidance."""

from __future__ import annotations

import torch

from ..diffusion import create_diffusion
from ..errors import UserError
from ..models import DiT

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")


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


