"""Training objectives: one interface (``Objective``) that training and sampling both use, with two
implementations, the DiT diffusion, flow matching (SiT) and MeanFlow; ``build_objective`` makes one from a run's settings (its
config.json), ``resolve_objective`` decides which one a checkpoint was trained with."""

from __future__ import annotations

import functools

from ..diffusion import GaussianDiffusion
from ..errors import UserError
from ..transport import MeanFlow, Transport, create_meanflow, create_transport
from .base import Objective
from .diffusion import DIFFUSION_SAMPLERS, DiffusionObjective
from .flow import DEFAULT_METHOD, FLOW_OPTIONS, FLOW_SAMPLERS, ODE_ONLY, SDE_ONLY, FlowObjective
from .meanflow import MEANFLOW_SETTINGS, MeanFlowObjective

OBJECTIVES = ("diffusion", "flow", "meanflow")
SAMPLERS = DIFFUSION_SAMPLERS + FLOW_SAMPLERS + MeanFlowObjective.samplers
# the flow settings a run records (config.json) and their defaults
FLOW_SETTINGS = {"path_type": "Linear", "prediction": "velocity", "loss_weight": None, "train_eps": None,
                 "sample_eps": None, "time_sampling": "uniform", "time_mean": 0.0, "time_std": 1.0, "cosine_loss": 0.0}


def build_objective(settings: dict) -> Objective:
    """The objective of a run's settings: the diffusion (``objective`` "diffusion" or absent: runs older than flow
    training) or a flow with the recorded flow settings."""
    kind = settings.get("objective") or "diffusion"
    if kind == "diffusion":
        return DiffusionObjective()
    if kind == "meanflow":
        m = {k: v if settings.get(k) is None else settings[k] for k, v in MEANFLOW_SETTINGS.items()}
        try:
            return MeanFlowObjective(create_meanflow(**{k: float(v) for k, v in m.items()}))
        except ValueError as e:
            raise UserError(str(e)) from None
    if kind != "flow":
        raise UserError(f"unknown objective {kind!r}; choose from {', '.join(OBJECTIVES)}")
    s = {k: v if settings.get(k) is None else settings[k] for k, v in FLOW_SETTINGS.items()}
    try:
        return FlowObjective(create_transport(
            s["path_type"], s["prediction"], s["loss_weight"], s["train_eps"], s["sample_eps"],
            time_sampling=s["time_sampling"], time_mean=float(s["time_mean"]), time_std=float(s["time_std"]),
            cosine_loss=float(s["cosine_loss"])))
    except ValueError as e:
        raise UserError(str(e)) from None


@functools.cache
def _dit_diffusion() -> DiffusionObjective:
    """The DiT diffusion, built once (its schedule tables) for every call that names no objective."""
    return DiffusionObjective()


def as_objective(obj) -> Objective:
    """An Objective as is; the lineages' own objects wrapped (a ``GaussianDiffusion`` of ``create_diffusion``, a
    ``Transport`` of ``create_transport``, a ``MeanFlow`` of ``create_meanflow``); None: the DiT diffusion."""
    if isinstance(obj, Objective):
        return obj
    if obj is None:
        return _dit_diffusion()
    if isinstance(obj, Transport):
        return FlowObjective(obj)
    if isinstance(obj, GaussianDiffusion):
        return DiffusionObjective(obj)
    if isinstance(obj, MeanFlow):
        return MeanFlowObjective(obj)
    raise TypeError(f"not an objective: {type(obj).__name__}")


from .resolve import resolve_objective, trained_kind  # noqa: E402

__all__ = ["DEFAULT_METHOD", "DIFFUSION_SAMPLERS", "FLOW_OPTIONS", "FLOW_SAMPLERS", "FLOW_SETTINGS", "MEANFLOW_SETTINGS",
           "ODE_ONLY", "OBJECTIVES", "SAMPLERS", "SDE_ONLY", "DiffusionObjective", "FlowObjective", "MeanFlowObjective",
           "Objective", "as_objective",
           "build_objective", "resolve_objective", "trained_kind"]
