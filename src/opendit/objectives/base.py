"""The objective interface: what training and sampling ask of a training objective.

An objective is the one object that knows its kind of model. Training calls ``sample_timesteps`` and
``training_losses``; sampling calls ``sample`` (with the samplers it names in ``samplers``), ``guidance_time`` and
``noise_level`` (where a guidance interval acts), ``check_call`` / ``check_sampler`` (its samplers and options); a run's config.json and a
sample folder keep ``record()``. The diffusion (opendit.objectives.diffusion) and the flow
(opendit.objectives.flow) implement it; a new objective is a third implementation and a name in ``build_objective``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..errors import UserError


class Objective(ABC):
    name: str  # what a run records as its "objective"
    samplers: tuple[str, ...]  # the sampler names it offers
    default_sampler: str  # --sampler auto
    options: dict = {}  # its samplers' keyword options and their defaults (None: the sampler's own default)
    predicts_x0: bool = False  # has an x0 prediction that --clip_denoised can clamp
    min_steps: int = 1  # the fewest --num_sampling_steps its samplers take
    default_steps: int | None = None  # --num_sampling_steps when not given (None: the program's, 250)
    model_fields: dict = {}  # DiTConfig fields the model it trains must have (e.g. MeanFlow's second time)
    guidance_trained_in: bool = False  # sample at guidance 1 (a scale other than 1 would guide twice)
    logged_terms: tuple[str, ...] = ()  # per-sample terms of training_losses logged beside the loss (as NAME_loss)

    # -- training
    @abstractmethod
    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor | None:
        """The timesteps of n training samples (None: ``training_losses`` draws them itself)."""

    @abstractmethod
    def training_losses(self, model, x: torch.Tensor, t=None, model_kwargs=None, noise=None) -> dict:
        """Per-sample losses {"loss": (N,), ...} of ``model`` on clean inputs ``x``."""

    # -- sampling
    @abstractmethod
    def sample(self, fn, z: torch.Tensor, model_kwargs: dict, *, sampler: str, steps: int, clip_denoised: bool = False,
               progress: bool = False, **options) -> torch.Tensor:
        """Samples from noise ``z`` with ``fn(x, t, **model_kwargs)`` (the model, or its guided version)."""

    @abstractmethod
    def guidance_time(self, t: torch.Tensor) -> float:
        """The time of a model call on the axis of ``--cfg_interval``: 0 = pure noise, 1 = data."""

    @abstractmethod
    def noise_level(self, t: torch.Tensor) -> float:
        """The noise level sigma of a model call (noise-to-signal ratio of x_t = a (data + sigma noise))."""

    @property
    @abstractmethod
    def quick_sampler(self) -> dict:
        """The 20-model-evaluation sampler of training-time grids and FID: ``sample``'s sampler, steps and options."""

    def check_call(self, sampler: str, options: dict) -> None:
        """What ``sample`` accepts: one of its samplers, and options it knows (one that does not apply to this sampler
        is ignored, as the lineages' samplers do; ``check_sampler`` is the programs' stricter check)."""
        if sampler not in self.samplers:
            raise UserError(f"sampler {sampler!r} does not sample a {self.name} model; choose from "
                            f"{', '.join(self.samplers)}")
        if unknown := sorted(set(options) - set(self.options)):
            raise TypeError(f"the {self.name} model's samplers have no options {unknown}")

    def check_sampler(self, sampler: str, options: dict | None = None) -> None:
        """A UserError for a known option (given, not None) that does not apply to ``sampler`` (one of its samplers;
        the programs check the sampler and the option names first, opendit.sampling.load). None here."""

    def sampler_settings(self, sampler: str, options: dict) -> dict:
        """Every option of ``sampler`` with its value (given, or the default): what decides the samples."""
        return {}

    def describe_sampler(self, sampler: str, steps: int, options: dict) -> str:
        return f"{sampler} {steps} steps"

    # -- what a run records
    @abstractmethod
    def record(self) -> dict:
        """The objective's settings as a run's config.json keeps them (``build_objective`` reads them back)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the training log."""
