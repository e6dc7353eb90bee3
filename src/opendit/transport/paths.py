"""Interpolation paths between noise x0 ~ N(0, I) (t = 0) and data x1 (t = 1): x_t = alpha_t * x1 + sigma_t * x0.

Each path gives alpha_t, sigma_t and their time derivatives; everything else (the velocity target, the score of a
velocity, the drift and diffusion of the probability-flow ODE and SDE) follows from them in ``Path``:

    Linear   alpha_t = t,               sigma_t = 1 - t                      (rectified flow / SiT's default)
    GVP      alpha_t = sin(pi t / 2),   sigma_t = cos(pi t / 2)              (variance preserving, trigonometric)
    VP       alpha_t = exp(m(t)),       sigma_t = sqrt(1 - alpha_t^2)        (DDPM's schedule in continuous time,
             m(t) = -(1 - t)^2 (b_max - b_min) / 4 - (1 - t) b_min / 2        b_min 0.1, b_max 20)

All functions take t as a tensor broadcastable against x (``expand_t_like``).
"""

from __future__ import annotations

import math

import torch


def expand_t_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) with x's number of dimensions."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class Path:
    """A path's coefficients and what follows from them. Subclasses give ``alpha(t) -> (alpha_t, d alpha_t / dt)``
    and ``sigma(t) -> (sigma_t, d sigma_t / dt)``."""

    name = "?"

    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def alpha_ratio(self, t):
        """(d alpha_t / dt) / alpha_t."""
        a, da = self.alpha(t)
        return da / a

    def plan(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor):
        """(x_t, u_t): the point on the path and its velocity, for (N,) times."""
        te = expand_t_like(t, x1)
        a, da = self.alpha(te)
        s, ds = self.sigma(te)
        return a * x1 + s * x0, da * x1 + ds * x0

    def drift_var(self, t):
        """D_t = alpha_t'/alpha_t * sigma_t^2 - sigma_t * sigma_t': the probability-flow velocity is
        v(x, t) = alpha_t'/alpha_t * x + D_t * score(x, t)."""
        s, ds = self.sigma(t)
        return self.alpha_ratio(t) * s ** 2 - s * ds

    def score_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score grad log p_t(x) of the velocity v (the form that stays finite at t = 0 on Linear and GVP)."""
        te = expand_t_like(t, x)
        a, da = self.alpha(te)
        s, ds = self.sigma(te)
        r = a / da
        return (r * v - x) / (s ** 2 - r * ds * s)

    def velocity_from_score(self, score: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        te = expand_t_like(t, x)
        return self.alpha_ratio(te) * x + self.drift_var(te) * score

    def diffusion(self, t: torch.Tensor, form: str = "SBDM", norm: float = 1.0) -> torch.Tensor:
        """w(t) of the SDE dx = [v + w score] dt + sqrt(2 w) dW, which has the same marginals as the ODE."""
        if form == "constant":
            return torch.full_like(t, norm)
        if form == "SBDM":
            return norm * self.drift_var(t)
        if form == "sigma":
            return norm * self.sigma(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * torch.sin(math.pi * t) ** 2
        raise ValueError(f"unknown diffusion form {form!r}; choose from {', '.join(DIFFUSION_FORMS)}")


DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


class LinearPath(Path):
    name = "Linear"

    def alpha(self, t):
        return t, torch.ones_like(t)

    def sigma(self, t):
        return 1 - t, -torch.ones_like(t)


class GVPPath(Path):
    name = "GVP"

    def alpha(self, t):
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t):
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)


class VPPath(Path):
    name = "VP"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def _log_alpha(self, t):
        return -0.25 * (1 - t) ** 2 * (self.beta_max - self.beta_min) - 0.5 * (1 - t) * self.beta_min

    def _d_log_alpha(self, t):  # = beta(t) / 2, beta(t) = b_min + (1 - t)(b_max - b_min)
        return 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min

    def alpha(self, t):
        a = torch.exp(self._log_alpha(t))
        return a, a * self._d_log_alpha(t)

    def sigma(self, t):
        a2 = torch.exp(2 * self._log_alpha(t))
        s = torch.sqrt(1 - a2)
        return s, -a2 * self._d_log_alpha(t) / s

    def alpha_ratio(self, t):
        return self._d_log_alpha(t)


PATHS = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}
