"""Gaussian diffusion in the ADM / improved-DDPM formulation that DiT uses, written in torch.

x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. The model predicts epsilon (or x_0) and, with
learned sigmas, a value v in [-1, 1] per element that interpolates the reverse-step log-variance
between the posterior's (clipped) and beta_t's.

A process may be *respaced*: it keeps a subset of the original T steps (betas recomputed from
alphas_cumprod at the kept steps) and calls the model with the original-scale step index through
``timestep_map``. Schedule tables are built once in float64 and cast/moved once per (device, dtype).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from .dpm_solver import dpm_solver_sample_loop
from .kinds import LossType, ModelMeanType, ModelVarType
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl


_TABLE_NAMES = (
    "betas",
    "log_betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "one_minus_alphas_cumprod",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "fixed_large_variance",
    "fixed_large_log_variance",
)


class GaussianDiffusion:
    def __init__(
        self,
        *,
        betas,
        model_mean_type: ModelMeanType = ModelMeanType.EPSILON,
        model_var_type: ModelVarType = ModelVarType.LEARNED_RANGE,
        loss_type: LossType = LossType.MSE,
        timestep_map=None,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D sequence in (0, 1]")
        T = betas.shape[0]
        self.num_timesteps = T
        # Original-scale step index of each of this process's steps (identity unless respaced).
        self.timestep_map = torch.arange(T) if timestep_map is None else torch.as_tensor(timestep_map, dtype=torch.long)
        if self.timestep_map.shape != (T,):
            raise ValueError("timestep_map must have one entry per step")

        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance is 0 at t=0: its log is clipped to the value at t=1.
        first = posterior_variance[1:2] if T > 1 else betas[:1]
        fixed_large = torch.cat([first, betas[1:]])
        t64 = {
            "betas": betas,
            "log_betas": torch.log(betas),
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "alphas_cumprod_next": torch.cat([abar[1:], abar.new_zeros(1)]),
            "one_minus_alphas_cumprod": 1.0 - abar,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "log_one_minus_alphas_cumprod": torch.log(1.0 - abar),
            "sqrt_recip_alphas_cumprod": (1.0 / abar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.log(torch.cat([first, posterior_variance[1:]])),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
            "fixed_large_variance": fixed_large,
            "fixed_large_log_variance": torch.log(fixed_large),
        }
        assert set(t64) == set(_TABLE_NAMES)
        for name, value in t64.items():  # float64 CPU copies, e.g. diffusion.alphas_cumprod
            setattr(self, name, value)
        self._tables: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ tables

    def tables(self, device, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """All schedule tables (and ``timestep_map``) on ``device`` in ``dtype``, made once and cached."""
        key = (torch.device(device), dtype)
        if key not in self._tables:
            tabs = {name: getattr(self, name).to(dtype=dtype).to(device) for name in _TABLE_NAMES}
            tabs["timestep_map"] = self.timestep_map.to(device)
            self._tables[key] = tabs
        return self._tables[key]

    @staticmethod
    def _table_dtype(x: torch.Tensor) -> torch.dtype:
        # Coefficients are float32 (float64 for float64 data): low-precision samples are promoted.
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    @staticmethod
    def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(N,) -> (N, 1, ..., 1) to broadcast against x."""
        return v.view(-1, *([1] * (x.ndim - 1)))

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """tables[name][t] shaped (N, 1, ..., 1) to broadcast against x."""
        return self._bcast(self.tables(x.device, self._table_dtype(x))[name][t], x)

    def _model_t(self, t: torch.Tensor) -> torch.Tensor:
        """This process's step index -> the original-scale step index the model is called with."""
        return self.tables(t.device)["timestep_map"][t]

    def _call_model(self, model: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None):
        """Run the model at this process's step t, passing the original-scale step index."""
        return model(x, self._model_t(t), **(model_kwargs or {}))

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return self._extract("sqrt_alphas_cumprod", t, x_start) * x_start + self._extract(
            "sqrt_one_minus_alphas_cumprod", t, x_start
        ) * noise

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._extract("posterior_mean_coef1", t, x_t) * x_start + self._extract("posterior_mean_coef2", t, x_t) * x_t
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # ------------------------------------------------------------------ reverse process

    def split_model_output(self, model_output: torch.Tensor, x: torch.Tensor):
        """(mean-parameter output, variance output or None) from a model output for input x."""
        C = x.shape[1]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[1] != 2 * C or model_output.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"a learned-variance model must output {2 * C} channels for {C}-channel inputs, "
                    f"got shape {tuple(model_output.shape)}"
                )
            return model_output[:, :C], model_output[:, C:]
        if model_output.shape[1] == 2 * C:  # a learn_sigma model used with a fixed variance
            return model_output[:, :C], None
        return model_output, None

    def p_mean_variance(self, model, x, t, clip_denoised: bool = True, model_kwargs=None) -> dict:
        """Mean, variance, log-variance of p(x_{t-1} | x_t) and the model's x_0 prediction."""
        model_output = self._call_model(model, x, t, model_kwargs)
        out, var_values = self.split_model_output(model_output, x)
        if self.model_var_type == ModelVarType.LEARNED:
            log_variance = var_values
            variance = torch.exp(log_variance)
        elif self.model_var_type == ModelVarType.LEARNED_RANGE:
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = self._extract("log_betas", t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            variance = self._extract("fixed_large_variance", t, x).expand_as(x)
            log_variance = self._extract("fixed_large_log_variance", t, x).expand_as(x)
        else:
            variance = self._extract("posterior_variance", t, x).expand_as(x)
            log_variance = self._extract("posterior_log_variance_clipped", t, x).expand_as(x)

        def process_xstart(x0):
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(out)
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, out))
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(self, model, x, t, clip_denoised=True, model_kwargs=None) -> dict:
        """One ancestral step: x_{t-1} ~ p(x_{t-1} | x_t) (no noise at t == 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        noise = torch.randn_like(x)
        nonzero = self._bcast((t != 0).to(x.dtype), x)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _initial_noise(self, shape, noise, device):
        if noise is not None:
            return noise
        return torch.randn(*shape, device=device if device is not None else "cpu")

    def _steps(self, progress: bool):
        steps = range(self.num_timesteps - 1, -1, -1)
        return tqdm(steps, desc="sampling", leave=False) if progress else steps

    def p_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
        device=None, progress=False,
    ) -> Iterator[dict]:
        """Yield p_sample's output at every step, from t = T-1 down to 0."""
        img = self._initial_noise(shape, noise, device)
        for i in self._steps(progress):
            t = torch.full((img.shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_sample(model, img, t, clip_denoised, model_kwargs)
            yield out
            img = out["sample"]

    def p_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
        device=None, progress=False,
    ) -> torch.Tensor:
        """Ancestral (DDPM) sampling; returns x_0 samples of ``shape``."""
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, model_kwargs, device, progress
        ):
            pass
        return final["sample"]

    def ddim_sample(self, model, x, t, clip_denoised=True, model_kwargs=None, eta=0.0) -> dict:
        """One DDIM step from t to the previous kept step (eta = 0: deterministic)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._extract("alphas_cumprod", t, x)
        abar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        noise = torch.randn_like(x)
        mean_pred = out["pred_xstart"] * abar_prev.sqrt() + torch.sqrt(1 - abar_prev - sigma**2) * eps
        nonzero = self._bcast((t != 0).to(x.dtype), x)
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, model_kwargs=None, eta=0.0) -> dict:
        """One deterministic DDIM step *up* from t to t+1 (inversion)."""
        if eta != 0.0:
            raise ValueError("reverse DDIM is only defined for eta == 0")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar_next = self._extract("alphas_cumprod_next", t, x)
        sample = out["pred_xstart"] * abar_next.sqrt() + (1 - abar_next).sqrt() * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
        device=None, progress=False, eta=0.0,
    ) -> Iterator[dict]:
        img = self._initial_noise(shape, noise, device)
        for i in self._steps(progress):
            t = torch.full((img.shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                out = self.ddim_sample(model, img, t, clip_denoised, model_kwargs, eta)
            yield out
            img = out["sample"]

    def ddim_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
        device=None, progress=False, eta=0.0,
    ) -> torch.Tensor:
        """DDIM sampling over this process's steps (respace with "ddimN" or "N" for fewer steps)."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, model_kwargs, device, progress, eta
        ):
            pass
        return final["sample"]

    def dpm_solver_sample_loop(self, model, shape, noise=None, model_kwargs=None, device=None, progress=False, **kwargs):
        """DPM-Solver++ sampling; see :func:`opendit.diffusion.dpm_solver.dpm_solver_sample_loop`."""
        return dpm_solver_sample_loop(self, model, shape, noise=noise, model_kwargs=model_kwargs, device=device, progress=progress, **kwargs)

    # ------------------------------------------------------------------ training

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None) -> dict:
        """One term of the variational bound, in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0 and the discretized decoder NLL -log p(x_0|x_1) for t == 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        ) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """n training timesteps, uniform over 0..T-1 (what a trainer passes to ``training_losses`` as t)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Per-sample losses for steps t: {"loss", "mse", "vb"} (vb only with learned variance)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = self._call_model(model, x_t, t, model_kwargs)
        out, var_values = self.split_model_output(model_output, x_t)
        if var_values is not None and self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            # The VB term trains only the variance: the mean is taken from the detached output.
            frozen = torch.cat([out.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *_, **__: frozen, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
        terms["mse"] = mean_flat((target - out) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension (not trained; measures the schedule)."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))) / math.log(2.0)
