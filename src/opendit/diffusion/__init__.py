"""Gaussian diffusion (training losses, DDPM / DDIM / DPM-Solver++ samplers) with the conventional
``create_diffusion`` entry point of the DiT lineage."""

from __future__ import annotations

import torch

from .dpm_solver import SKIP_TYPES, dpm_solver_sample_loop, dpm_solver_timesteps
from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .schedule import cosine_betas, linear_betas, named_betas, space_timesteps


def respaced_diffusion(use_timesteps, *, betas, **kwargs) -> GaussianDiffusion:
    """A process over the kept original steps ``use_timesteps``: betas recomputed from alphas_cumprod
    (beta_i = 1 - abar_i / abar_prev over kept steps), the model called with original-scale indices."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    keep = sorted(set(int(i) for i in use_timesteps))
    if not keep or keep[0] < 0 or keep[-1] >= betas.shape[0]:
        raise ValueError(f"kept steps must lie in [0, {betas.shape[0]})")
    abar = torch.cumprod(1.0 - betas, dim=0)[keep]
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return GaussianDiffusion(betas=1.0 - abar / abar_prev, timestep_map=keep, **kwargs)


def create_diffusion(
    timestep_respacing="",
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """The diffusion DiT trains and samples with. ``timestep_respacing``: "" or None (all T steps),
    "250" (250 evenly spaced steps), "ddim50", "10,20,30" (per-section counts), or a list of counts."""
    betas = named_betas(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return respaced_diffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )


__all__ = [
    "SKIP_TYPES",
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "approx_standard_normal_cdf",
    "cosine_betas",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "dpm_solver_sample_loop",
    "dpm_solver_timesteps",
    "linear_betas",
    "mean_flat",
    "named_betas",
    "normal_kl",
    "respaced_diffusion",
    "space_timesteps",
]
