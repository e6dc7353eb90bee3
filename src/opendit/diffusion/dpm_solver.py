"""DPM-Solver++ (Lu et al., 2022): a few-step solver of the diffusion ODE in data-prediction form.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) and the
model's x_0 prediction D(x, t), one step from s to t (h = lambda_t - lambda_s > 0) is

    first order (== DDIM):  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_s
    second order (2M):      same with D = D_s + (D_s - D_prev) / (2 r),  r = h_prev / h

re-using the previous step's prediction, so each step costs one model evaluation. The solver
runs on the discrete steps of the diffusion it is given (respaced or not), calls the model with
the original-scale step index, and works with any model callable (e.g. ``forward_with_cfg``):
a learned-sigma output's variance half is ignored.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .kinds import ModelMeanType

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")


def dpm_solver_timesteps(alphas_cumprod: torch.Tensor, num_steps: int, skip_type: str = "logSNR") -> list[int]:
    """``num_steps`` distinct discrete steps from T-1 down to 0 (both included), descending."""
    T = alphas_cumprod.shape[0]
    if not 1 <= num_steps <= T:
        raise ValueError(f"DPM-Solver needs 1..{T} steps, got {num_steps}")
    if num_steps == 1:
        return [T - 1]
    u = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)  # 0 -> T-1, 1 -> 0
    if skip_type == "time_uniform":
        pos = (T - 1) * (1 - u)
    elif skip_type == "time_quadratic":
        pos = (T - 1) * (1 - u) ** 2
    elif skip_type == "logSNR":
        lam = 0.5 * torch.log(alphas_cumprod / (1 - alphas_cumprod))  # increasing as t decreases
        target = lam[T - 1] + u * (lam[0] - lam[T - 1])
        # lambda is monotone in t: interpolate the fractional step index
        idx = torch.searchsorted(-lam, -target).clamp(1, T - 1)
        lo, hi = lam[idx - 1], lam[idx]
        pos = (idx - 1) + (target - lo) / (hi - lo)
    else:
        raise ValueError(f"unknown skip_type {skip_type!r}; choose from {SKIP_TYPES}")
    steps: list[int] = []
    for p in pos.round().long().tolist():
        if not steps or p < steps[-1]:
            steps.append(int(p))
    if steps[-1] != 0:
        steps.append(0)
    return steps


@torch.no_grad()
def dpm_solver_sample_loop(
    diffusion,
    model,
    shape,
    noise: torch.Tensor | None = None,
    model_kwargs: dict | None = None,
    device=None,
    progress: bool = False,
    num_steps: int = 20,
    order: int = 2,
    skip_type: str = "logSNR",
    lower_order_final: bool = True,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Sample with DPM-Solver++ using ``num_steps`` model evaluations (the last at t=0, whose x_0
    prediction is returned). ``order`` 1 is DDIM; 2 is DPM-Solver++(2M). With ``lower_order_final``
    the last solver step (into t=0, by far the longest in log-SNR: lambda_0 = 4.6) is first order:
    extrapolating the x_0 trend over it overshoots (on a 1-D Gaussian toy with the exact model,
    20 time-uniform steps gave std 0.627 for 0.504 without, 0.481 with it).

    ``skip_type``: "logSNR" (default; steps uniform in log-SNR, the most accurate on that toy at
    10-25 steps: std 0.512 at 20), "time_uniform" or "time_quadratic"."""
    if order not in (1, 2):
        raise ValueError(f"DPM-Solver++ order must be 1 or 2, got {order}")
    x = noise if noise is not None else torch.randn(*shape, device=device if device is not None else "cpu")
    abar = diffusion.alphas_cumprod  # float64 on the CPU: the step coefficients are Python floats
    ts = dpm_solver_timesteps(abar, num_steps, skip_type)
    alpha = abar.sqrt().tolist()
    sigma = (1 - abar).sqrt().tolist()
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]

    def predict_x0(x, i):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out, _ = diffusion.split_model_output(diffusion._call_model(model, x, t, model_kwargs), x)
        x0 = out if diffusion.model_mean_type == ModelMeanType.START_X else (x - sigma[i] * out) / alpha[i]
        return x0.clamp(-1, 1) if clip_denoised else x0

    x0_prev = h_prev = None
    steps = tqdm(range(len(ts)), desc="dpm-solver++", leave=False) if progress else range(len(ts))
    for k in steps:
        s = ts[k]
        x0 = predict_x0(x, s)
        if k == len(ts) - 1:
            return x0
        t = ts[k + 1]
        h = lam[t] - lam[s]
        if order == 1 or x0_prev is None or (lower_order_final and k == len(ts) - 2):
            d = x0
        else:
            d = x0 + (x0 - x0_prev) * (h / (2.0 * h_prev))
        x = (sigma[t] / sigma[s]) * x - (alpha[t] * math.expm1(-h)) * d
        x0_prev, h_prev = x0, h
    raise AssertionError("unreachable")
