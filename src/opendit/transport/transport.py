"""Flow matching on an interpolation path (the SiT objective): ``create_transport`` and ``Transport``.

Time runs from noise (t = 0) to data (t = 1); the model is called with the float t in [0, 1] (the DiT's sinusoidal
embedding takes it as it is), as in the published SiT code, so its checkpoints sample correctly. A DiT built with
``learn_sigma`` (8 output channels for 4 input channels, the published SiT layout) has its first half used as the
prediction; the other half is never trained (it stays at its zero initialization: ``opendit.sampling.load`` uses
that to tell a flow checkpoint from a diffusion one).

The training loss (per sample, mean over the non-batch dimensions):
    velocity prediction:  |v_theta(x_t, t) - u_t|^2,            u_t = alpha_t' x1 + sigma_t' x0
    noise prediction:     w_t |eps_theta(x_t, t) - x0|^2
    score prediction:     w_t |s_theta(x_t, t) sigma_t + x0|^2
with w_t = 1, (D_t / sigma_t)^2 ("velocity") or D_t / sigma_t^2 ("likelihood"), and optionally LightningDiT's
cosine term 1 - cos(prediction, target) over the channel dimension (averaged over positions), added with a weight.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

from ..diffusion.losses import mean_flat
from .paths import PATHS, Path, expand_t_like


class ModelType(Enum):
    VELOCITY = "velocity"
    NOISE = "noise"
    SCORE = "score"


class WeightType(Enum):
    NONE = None
    VELOCITY = "velocity"
    LIKELIHOOD = "likelihood"


TIME_SAMPLINGS = ("uniform", "logit_normal")
PREDICTIONS = tuple(m.value for m in ModelType)


ONE_CHANNEL_COSINE = ("the cosine loss is taken over channels at each position (LightningDiT's, on 32-channel latents); "
                      "with 1 channel it is +-1 everywhere: no gradient, except near a zero prediction where it "
                      "explodes. Use it on multi-channel data, or leave it off")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def prediction_of(model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The prediction in a model's output: all of it, or the first half of a learn_sigma DiT's 2C channels."""
    c = x.shape[1]
    if model_output.shape[1] == 2 * c:
        return model_output[:, :c]
    if model_output.shape[1] != c:
        raise ValueError(f"the model returns {model_output.shape[1]} channels for {c} input channels")
    return model_output


class Transport:
    """An interpolation path, what the model predicts, and how training draws t. The objective the trainer calls:
    ``sample_timesteps`` and ``training_losses``; the samplers (``opendit.transport.Sampler``) use ``velocity`` and
    ``score``."""

    def __init__(self, *, path: Path, model_type: ModelType, loss_type: WeightType, train_eps: float,
                 sample_eps: float, time_sampling: str = "uniform", time_mean: float = 0.0, time_std: float = 1.0,
                 cosine_loss: float = 0.0):
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {time_sampling!r}; choose from {', '.join(TIME_SAMPLINGS)}")
        if time_std <= 0:
            raise ValueError(f"the logit-normal std must be positive, got {time_std}")
        if cosine_loss < 0:
            raise ValueError(f"the cosine loss weight must be >= 0, got {cosine_loss}")
        self.path, self.model_type, self.loss_type = path, model_type, loss_type
        self.train_eps, self.sample_eps = train_eps, sample_eps
        self.time_sampling, self.time_mean, self.time_std = time_sampling, time_mean, time_std
        self.cosine_loss = cosine_loss

    def __repr__(self) -> str:
        return (f"Transport({self.path.name}, {self.model_type.value} prediction, loss weight {self.loss_type.value}, "
                f"t {self.time_sampling} in {self.train_interval()})")

    # ------------------------------------------------------------------ training

    def train_interval(self) -> tuple[float, float]:
        """Where training draws t: [0, 1] for velocity on Linear/GVP; away from the ends where a prediction is
        singular (VP near data; noise/score predictions at both ends)."""
        eps = self.train_eps
        if isinstance(self.path, PATHS["VP"]):
            return 0.0, 1 - eps
        if self.model_type != ModelType.VELOCITY:
            return eps, 1 - eps
        return 0.0, 1.0

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(n,) float32 times: uniform on the training interval, or logit-normal (sigmoid of N(mean, std)) mapped
        onto it."""
        t0, t1 = self.train_interval()
        if self.time_sampling == "uniform":
            u = torch.rand(n, generator=generator, device=device)
        else:
            u = torch.sigmoid(self.time_mean + self.time_std * torch.randn(n, generator=generator, device=device))
        return u * (t1 - t0) + t0

    def loss_weight(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor | float:
        if self.loss_type == WeightType.NONE:
            return 1.0
        te = expand_t_like(t, x)
        d, s = self.path.drift_var(te), self.path.sigma(te)[0]
        return (d / s) ** 2 if self.loss_type == WeightType.VELOCITY else d / s ** 2

    def training_losses(self, model, x1: torch.Tensor, model_kwargs: dict | None = None, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None) -> dict:
        """Per-sample losses {"loss", "mse", ["cos"], "pred"} of ``model`` on data ``x1``; t and the noise x0 are
        drawn (global RNG) unless given."""
        if t is None:
            t = self.sample_timesteps(x1.shape[0], device=x1.device)
        x0 = torch.randn_like(x1) if noise is None else noise
        tt = t.to(x1.dtype)  # the path's coefficients in the data's precision; the model gets t as it is
        xt, ut = self.path.plan(tt, x0, x1)
        pred = prediction_of(model(xt, t, **(model_kwargs or {})), xt)
        if self.model_type == ModelType.VELOCITY:
            target, err = ut, pred - ut
        elif self.model_type == ModelType.NOISE:
            target, err = x0, pred - x0
        else:  # score: s_theta * sigma_t + x0 = 0 at the optimum
            sigma = self.path.sigma(expand_t_like(tt, xt))[0]
            target, err = -x0 / sigma, pred * sigma + x0
        mse = mean_flat(self.loss_weight(xt, tt) * _at_least_fp32(err) ** 2)
        terms = {"mse": mse, "loss": mse, "pred": pred}
        if self.cosine_loss:
            if pred.shape[1] == 1:
                raise ValueError(ONE_CHANNEL_COSINE)
            cos = F.cosine_similarity(_at_least_fp32(pred), _at_least_fp32(target), dim=1)
            terms["cos"] = mean_flat(1 - cos)
            terms["loss"] = mse + self.cosine_loss * terms["cos"]
        return terms

    # ------------------------------------------------------------------ sampling

    def sample_interval(self, *, sde: bool = False, diffusion_form: str = "SBDM",
                        last_step_size: float = 0.0) -> tuple[float, float]:
        """Where sampling integrates: the published choices (SBDM's SDE starts at sample_eps, where it is finite only
        when sample_eps > 0; an SDE with a last step ends at 1 - last_step_size)."""
        eps, t0, t1 = self.sample_eps, 0.0, 1.0
        if isinstance(self.path, PATHS["VP"]):
            t1 = 1 - eps if not sde or last_step_size == 0 else 1 - last_step_size
        elif self.model_type != ModelType.VELOCITY or sde:
            t0 = eps if (sde and diffusion_form == "SBDM") or self.model_type != ModelType.VELOCITY else 0.0
            t1 = 1 - eps if not sde or last_step_size == 0 else 1 - last_step_size
        return t0, t1

    def _score_of(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score from a model's prediction ``out`` at (x, t)."""
        if self.model_type == ModelType.VELOCITY:
            return self.path.score_from_velocity(out, x, t)
        if self.model_type == ModelType.NOISE:
            return out / -self.path.sigma(expand_t_like(t, x))[0]
        return out

    def _velocity_of(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.model_type == ModelType.VELOCITY:
            return out
        return self.path.velocity_from_score(self._score_of(out, x, t), x, t)

    def score(self, model, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        return self._score_of(prediction_of(model(x, t, **model_kwargs), x), x, t)

    def velocity(self, model, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """The probability-flow ODE's velocity at (x, t) (the ODE drift)."""
        return self._velocity_of(prediction_of(model(x, t, **model_kwargs), x), x, t)

    def velocity_and_score(self, model, x: torch.Tensor, t: torch.Tensor, **model_kwargs):
        """Both from one model evaluation (the SDE's drift needs both; the published code evaluates twice)."""
        out = prediction_of(model(x, t, **model_kwargs), x)
        return self._velocity_of(out, x, t), self._score_of(out, x, t)


def create_transport(path_type: str = "Linear", prediction: str = "velocity", loss_weight: str | None = None,
                     train_eps: float | None = None, sample_eps: float | None = None, *,
                     time_sampling: str = "uniform", time_mean: float = 0.0, time_std: float = 1.0,
                     cosine_loss: float = 0.0) -> Transport:
    """The SiT lineage's entry point. ``path_type`` Linear | GVP | VP; ``prediction`` velocity | noise | score;
    ``loss_weight`` None | "velocity" | "likelihood" (noise and score predictions); ``train_eps`` / ``sample_eps``:
    distances kept from the singular ends (defaults: 0 for velocity on Linear/GVP, 1e-3 for noise/score, VP 1e-5 /
    1e-3). Ours on top: ``time_sampling`` uniform | logit_normal (``time_mean``, ``time_std``), ``cosine_loss``
    (weight of LightningDiT's cosine velocity term; 0 = off)."""
    if path_type not in PATHS:
        raise ValueError(f"unknown path type {path_type!r}; choose from {', '.join(PATHS)}")
    try:
        model_type = ModelType(prediction)
    except ValueError:
        raise ValueError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}") from None
    if loss_weight in ("none", "None"):
        loss_weight = None
    try:
        loss_type = WeightType(loss_weight)
    except ValueError:
        raise ValueError(f"unknown loss weight {loss_weight!r}; choose from None, velocity, likelihood") from None
    if loss_type != WeightType.NONE and model_type == ModelType.VELOCITY:
        raise ValueError(f"loss weight {loss_weight!r} weights the noise and score losses; the velocity loss has none")
    if cosine_loss and model_type != ModelType.VELOCITY:
        raise ValueError("the cosine loss is a velocity loss term: it needs prediction velocity")
    if path_type == "VP":
        default_train, default_sample = 1e-5, 1e-3
    elif model_type != ModelType.VELOCITY:
        default_train, default_sample = 1e-3, 1e-3
    else:  # velocity on Linear / GVP is finite everywhere
        default_train, default_sample = 0.0, 0.0
    train_eps = default_train if train_eps is None else float(train_eps)
    sample_eps = default_sample if sample_eps is None else float(sample_eps)
    for name, v in (("train_eps", train_eps), ("sample_eps", sample_eps)):
        if not 0 <= v < 0.5:
            raise ValueError(f"{name} must be in [0, 0.5), got {v}")
    return Transport(path=PATHS[path_type](), model_type=model_type, loss_type=loss_type, train_eps=train_eps,
                     sample_eps=sample_eps, time_sampling=time_sampling, time_mean=time_mean, time_std=time_std,
                     cosine_loss=cosine_loss)
