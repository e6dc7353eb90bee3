"""The training objective of a run, from its settings: the DiT diffusion (the spec's recipe) or a flow (SiT).

One place turns the recorded settings (``--objective`` and the flow flags, kept in a run's config.json) into the
object the training step and the samplers use, so training, resuming and every sampling entry point agree.
"""

from __future__ import annotations

from .diffusion import create_diffusion
from .errors import NONNEG_FLOAT, POSITIVE_FLOAT, UNIT_FLOAT, UserError, float_flag
from .transport import PATHS, PREDICTIONS, TIME_SAMPLINGS, Transport, create_transport

OBJECTIVES = ("diffusion", "flow")
# the flow settings a run records (config.json) and their defaults
FLOW_SETTINGS = {"path_type": "Linear", "prediction": "velocity", "loss_weight": None, "train_eps": None,
                 "sample_eps": None, "time_sampling": "uniform", "time_mean": 0.0, "time_std": 1.0, "cosine_loss": 0.0}


def build_objective(settings: dict):
    """A GaussianDiffusion (``objective`` "diffusion" or absent: runs older than flow training) or a Transport."""
    kind = settings.get("objective") or "diffusion"
    if kind == "diffusion":
        return create_diffusion(timestep_respacing="")
    if kind != "flow":
        raise UserError(f"unknown objective {kind!r}; choose from {', '.join(OBJECTIVES)}")
    s = {k: v if settings.get(k) is None else settings[k] for k, v in FLOW_SETTINGS.items()}
    try:
        return create_transport(s["path_type"], s["prediction"], s["loss_weight"], s["train_eps"], s["sample_eps"],
                                time_sampling=s["time_sampling"], time_mean=float(s["time_mean"]),
                                time_std=float(s["time_std"]), cosine_loss=float(s["cosine_loss"]))
    except ValueError as e:
        raise UserError(str(e)) from None


def objective_name(objective) -> str:
    return "flow" if isinstance(objective, Transport) else "diffusion"


def objective_settings(objective) -> dict:
    """What a run records about its objective (resolved: the eps values the transport chose)."""
    if not isinstance(objective, Transport):
        return {"objective": "diffusion"}
    return {"objective": "flow", "path_type": objective.path.name, "prediction": objective.model_type.value,
            "loss_weight": objective.loss_type.value, "train_eps": objective.train_eps,
            "sample_eps": objective.sample_eps, "time_sampling": objective.time_sampling,
            "time_mean": objective.time_mean, "time_std": objective.time_std, "cosine_loss": objective.cosine_loss}


def describe_objective(objective) -> str:
    if not isinstance(objective, Transport):
        return "diffusion (DDPM, 1000 steps, epsilon + learned variance)"
    t = objective.time_sampling + (f"({objective.time_mean:g}, {objective.time_std:g})"
                                   if objective.time_sampling == "logit_normal" else "")
    return (f"flow ({objective.path.name} path, {objective.model_type.value} prediction, t {t}"
            + (f", cosine loss x{objective.cosine_loss:g}" if objective.cosine_loss else "") + ")")


def add_objective_flags(p) -> None:
    """--objective and the flow's settings (opendit.transport; recorded in the run's config)."""
    a = p.add_argument
    a("--objective", default="diffusion", choices=list(OBJECTIVES),
      help="diffusion: the DiT recipe (DDPM, epsilon + learned variance); flow: flow matching on an interpolation "
           "path (SiT), time from noise (0) to data (1)")
    a("--path_type", default="Linear", choices=list(PATHS), help="flow: the interpolation path")
    a("--prediction", default="velocity", choices=list(PREDICTIONS), help="flow: what the model predicts")
    a("--loss_weight", default=None, choices=["velocity", "likelihood"], help="flow: weighting of noise/score losses")
    a("--train_eps", type=UNIT_FLOAT, default=None, help="flow: keep training t this far from singular ends "
                                                        "(default: 0 for velocity on Linear/GVP, else 1e-3; VP 1e-5)")
    a("--sample_eps", type=UNIT_FLOAT, default=None, help="flow: the same for sampling (default 0, 1e-3)")
    a("--time_sampling", default="uniform", choices=list(TIME_SAMPLINGS),
      help="flow: how training draws t: uniform, or logit_normal (sigmoid of N(--time_mean, --time_std))")
    a("--time_mean", type=float_flag(), default=0.0, help="flow: mean of the logit-normal t")
    a("--time_std", type=POSITIVE_FLOAT, default=1.0, help="flow: std of the logit-normal t")
    a("--cosine_loss", type=NONNEG_FLOAT, nargs="?", const=1.0, default=0.0,
      help="flow: add LightningDiT's cosine velocity loss 1 - cos(v_pred, u_t) with this weight (alone: 1.0)")
