"""Samplers of a ``Transport``: the probability-flow ODE and the SDE with the same marginals, from noise (t = t0) to
data (t = t1), with the SiT lineage's interface:

    sampler = Sampler(transport)
    sample_fn = sampler.sample_ode(sampling_method="euler", num_steps=250)      # or sample_sde(...)
    samples = sample_fn(z, model_fn, **model_kwargs)[-1]                       # the trajectory's last element

The fixed-step ODE methods (``euler``; ``heun``, also under torchdiffeq's name ``heun2``) step along the published grid
of ``num_steps`` points, linspace(t0, t1, num_steps), so ``num_steps - 1`` steps (Heun: two model evaluations each).
``timestep_shift`` s moves the grid towards noise, t -> s t / (1 + (s - 1) t) (LightningDiT samples with 0.3). Every
other method name (``dopri5``, ``rk4``, ``midpoint``, ...) is torchdiffeq's (an optional dependency); adaptive ones
take ``atol`` / ``rtol`` and report the solution at the grid points.

The SDE is dx = [v(x, t) + w(t) score(x, t)] dt + sqrt(2 w(t)) dW, integrated by Euler-Maruyama (``Euler``) or
stochastic Heun (``Heun``) over the grid, then one ``last_step`` of size ``last_step_size``: ``Mean`` (the drift
without noise), ``Tweedie`` (the posterior mean of the data), ``Euler`` (a plain ODE step) or None. Its noise comes
from the global torch RNG.
"""

from __future__ import annotations

import torch

from .paths import DIFFUSION_FORMS
from .transport import Transport

FIXED_ODE_METHODS = {"euler": "euler", "heun": "heun", "heun2": "heun"}
SDE_METHODS = ("Euler", "Heun")
LAST_STEPS = ("Mean", "Tweedie", "Euler", None)


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """LightningDiT's timestep shift of a grid on [0, 1] (noise at 0): s t / (1 + (s - 1) t); 1 = unchanged."""
    if shift == 1.0:
        return t
    return shift * t / (shift * t + (1 - t))  # = s t / (1 + (s - 1) t), with the ends exact


def time_grid(t0: float, t1: float, num_steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    if num_steps < 2:
        raise ValueError(f"the sampling grid needs at least 2 points (num_steps >= 2), got {num_steps}")
    return shift_times(torch.linspace(t0, t1, num_steps, dtype=torch.float64), shift).to(device)


class SampleFn:
    """``sample_fn(init, model, **model_kwargs)``: the trajectory, a list whose last element is the sample (the
    published convention: the ODE's starts with the initial noise, the SDE's with the state after the first step);
    ``sample_fn.final(...)``: the sample only (nothing else kept)."""

    def __init__(self, steps, include_init: bool):
        self._steps = steps  # steps(init, model, kwargs) yields the states after init
        self.include_init = include_init

    @torch.no_grad()
    def __call__(self, init: torch.Tensor, model, **model_kwargs) -> list[torch.Tensor]:
        return [init] * self.include_init + list(self._steps(init, model, model_kwargs))

    @torch.no_grad()
    def final(self, init: torch.Tensor, model, **model_kwargs) -> torch.Tensor:
        x = init
        for x in self._steps(init, model, model_kwargs):
            pass
        return x


def _times(t, x: torch.Tensor) -> torch.Tensor:
    """A scalar time (a float, or torchdiffeq's 0-d tensor) as the (N,) float32 tensor the model is called with."""
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


class Sampler:
    def __init__(self, transport: Transport):
        self.transport = transport

    # ------------------------------------------------------------------ ODE

    def sample_ode(self, *, sampling_method: str = "dopri5", num_steps: int = 50, atol: float = 1e-6,
                   rtol: float = 1e-3, timestep_shift: float = 1.0, reverse: bool = False) -> SampleFn:
        """``reverse``: from data to noise (t1 -> t0), e.g. to encode images into their noise."""
        tr = self.transport
        t0, t1 = tr.sample_interval()
        grid = time_grid(t0, t1, num_steps, timestep_shift)
        if reverse:
            grid = grid.flip(0)
        method = FIXED_ODE_METHODS.get(sampling_method)

        def drift(x, t, model, kw):
            return tr.velocity(model, x, _times(t, x), **kw)

        if method is None:
            _check_torchdiffeq_method(sampling_method)
            return SampleFn(lambda x, model, kw: _torchdiffeq(drift, x, model, kw, grid, sampling_method, atol, rtol), True)

        def steps(x, model, kw):
            g = grid.tolist()  # python floats: no host sync per step
            for i in range(len(g) - 1):
                t, dt = g[i], g[i + 1] - g[i]
                k1 = drift(x, t, model, kw)
                if method == "euler":
                    x = x + dt * k1
                else:  # Heun: the trapezoid of the slopes at both ends of the step
                    k2 = drift(x + dt * k1, g[i + 1], model, kw)
                    x = x + 0.5 * dt * (k1 + k2)
                yield x

        return SampleFn(steps, include_init=True)

    # ------------------------------------------------------------------ SDE

    def sample_sde(self, *, sampling_method: str = "Euler", diffusion_form: str = "SBDM", diffusion_norm: float = 1.0,
                   last_step: str | None = "Mean", last_step_size: float = 0.04, num_steps: int = 250,
                   timestep_shift: float = 1.0) -> SampleFn:
        """``num_steps`` grid points: num_steps - 1 SDE steps, then the last step (the trajectory holds ``num_steps``
        states, as published)."""
        if sampling_method not in SDE_METHODS:
            raise ValueError(f"unknown SDE sampling method {sampling_method!r}; choose from {', '.join(SDE_METHODS)}")
        if diffusion_form not in DIFFUSION_FORMS:
            raise ValueError(f"unknown diffusion form {diffusion_form!r}; choose from {', '.join(DIFFUSION_FORMS)}")
        if last_step not in LAST_STEPS:
            raise ValueError(f"unknown last step {last_step!r}; choose from Mean, Tweedie, Euler or None")
        tr = self.transport
        if last_step is None:
            last_step_size = 0.0
        t0, t1 = tr.sample_interval(sde=True, diffusion_form=diffusion_form, last_step_size=last_step_size)
        if diffusion_form == "SBDM" and t0 == 0 and tr.path.name != "VP":
            raise ValueError("diffusion form SBDM is infinite at t = 0 (pure noise): give the transport sample_eps > 0 "
                             "(e.g. 0.04) or use another diffusion form (sigma, linear, ...)")
        grid = time_grid(t0, t1, num_steps, timestep_shift)

        def w(t, x):
            return tr.path.diffusion(torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype).reshape(
                -1, *([1] * (x.dim() - 1))), diffusion_form, diffusion_norm)

        def drift(x, t, model, kw):  # one model evaluation
            v, score = tr.velocity_and_score(model, x, _times(t, x), **kw)
            return v + w(t, x) * score

        def steps(x, model, kw):
            g = grid.tolist()
            for i in range(len(g) - 1):
                t, dt = g[i], g[i + 1] - g[i]
                dw = torch.randn_like(x) * dt ** 0.5
                if sampling_method == "Euler":
                    x = x + drift(x, t, model, kw) * dt + torch.sqrt(2 * w(t, x)) * dw
                else:  # stochastic Heun: add this step's noise, then a Heun step of the drift
                    x = x + torch.sqrt(2 * w(t, x)) * dw
                    k1 = drift(x, t, model, kw)
                    k2 = drift(x + dt * k1, t + dt, model, kw)
                    x = x + 0.5 * dt * (k1 + k2)
                yield x
            yield self._last_step(x, g[-1], model, kw, last_step, last_step_size, drift)

        return SampleFn(steps, include_init=False)

    def _last_step(self, x, t, model, kw, last_step, size, sde_drift):
        tr = self.transport
        if last_step is None:
            return x
        if last_step == "Mean":
            return x + sde_drift(x, t, model, kw) * size
        if last_step == "Euler":
            return x + tr.velocity(model, x, _times(t, x), **kw) * size
        tt = torch.tensor(t, dtype=x.dtype, device=x.device)  # Tweedie: E[x1 | x_t]
        a, s = tr.path.alpha(tt)[0], tr.path.sigma(tt)[0]
        return x / a + s ** 2 / a * tr.score(model, x, _times(t, x), **kw)


def _check_torchdiffeq_method(method: str) -> None:
    import importlib

    try:
        import torchdiffeq  # noqa: F401

        solvers = importlib.import_module("torchdiffeq._impl.odeint").SOLVERS  # the package exports the function
    except ImportError:
        raise ImportError(f"ODE method {method!r} needs torchdiffeq (pip install torchdiffeq); euler and heun need "
                          f"nothing") from None
    if method not in solvers:
        raise ValueError(f"unknown ODE sampling method {method!r}; choose from euler, heun (heun2), or torchdiffeq's "
                         f"{', '.join(m for m in solvers if m not in FIXED_ODE_METHODS)}")


def _torchdiffeq(drift, x, model, kw, grid, method, atol, rtol):
    """A torchdiffeq method over ``grid``: yields the solution at each grid point after the first."""
    from torchdiffeq import odeint  # present: sample_ode checked it (_check_torchdiffeq_method)

    g = grid.to(device=x.device, dtype=torch.float32 if x.dtype != torch.float64 else torch.float64)
    out = odeint(lambda t, y: drift(y, t, model, kw), x, g, method=method, atol=atol, rtol=rtol)
    yield from out[1:]
