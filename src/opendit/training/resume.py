"""Resuming a run: which checkpoint (``--load``), the run's settings it brings (before anything is built, since they
decide the model and the data), then the weights, EMA, optimizer and counters (after the model is built and sharded).
Rank 0 reads the files; the others receive the states through collectives."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import distributed
from ..distributed import DistEnv
from .. import checkpoint as ckpt
from ..config import TrainConfig
from ..errors import UserError
from .ema import EMA, NOT_AVERAGED
from .run_settings import apply_run_settings, saved_settings
from .state import TrainState


@dataclass
class ResumePlan:
    load: str | None = None  # a checkpoint or run directory; None: a new run
    run_dir: str | None = None  # the run being resumed
    saved: dict | None = None  # its settings (config.json with the recorded changes)
    changes: dict = field(default_factory=dict)  # changeable settings this session changes: key -> [old, new]
    notes: list = field(default_factory=list)  # lines for the run's log


def plan_resume(cfg: TrainConfig, given: set[str] | None, env: DistEnv) -> ResumePlan:
    """Resolve ``--load`` (``auto``: the newest run of this model under --outputs that has a checkpoint) and apply the
    run's settings to ``cfg`` (see run_settings): the settings of a resumed run are the run's."""
    plan = ResumePlan(load=cfg.schedule.load)
    if plan.load == "auto":
        found = ckpt.find_auto_resume(cfg.schedule.outputs, cfg.model.model) if env.is_main else None
        plan.load = distributed.broadcast_object(found, env)
        if plan.load is None:
            plan.notes.append(f"--load auto: no checkpoint of {cfg.model.model} under {cfg.schedule.outputs}; starting a new run")
    if plan.load:
        plan.run_dir, plan.saved = distributed.broadcast_object(
            distributed.on_rank0(lambda: saved_settings(plan.load), env), env)
        plan.changes = apply_run_settings(cfg, given, plan.saved, env.world_size, plan.run_dir)
    return plan


def _read_checkpoint(load: str, shapes: dict, notes: list) -> dict:
    """Rank 0: the newest intact checkpoint of ``load``, checked against the model's shapes."""
    ckpt_dir, state, skipped = ckpt.find_resumable(load)
    notes.extend(f"warning: {w}; resuming from an older checkpoint" for w in skipped)
    ckpt.check_fits(shapes, state["model"], f"checkpoint {ckpt_dir} (model)")
    averaged = {k: v for k, v in shapes.items() if not k.startswith(NOT_AVERAGED)}
    ckpt.check_fits(averaged, state["ema"], f"checkpoint {ckpt_dir} (ema.pt)")
    state["ema"] = {**state["model"], **state["ema"]}  # what EMA(model) starts from (it skips the projectors)
    state["running_states"]["dir"] = ckpt_dir
    return state


def restore(load: str, model: torch.nn.Module, opt: torch.optim.Optimizer, precision, env: DistEnv, shapes: dict,
            notes: list) -> tuple[TrainState, EMA, str]:
    """Load a checkpoint into the built (possibly sharded) ``model`` and ``opt``: returns (the counters, the EMA, the
    checkpoint directory). ``shapes``: the model's state dict shapes (checked first, for a one-line error). Collective."""
    state = distributed.on_rank0(lambda: _read_checkpoint(load, shapes, notes), env) or \
        {"model": {}, "ema": {}, "optimizer": {}, "running_states": None}
    rs = distributed.broadcast_object(state["running_states"], env)
    ckpt_dir = rs["dir"]
    distributed.load_full_model_state(model, state["ema"], env)  # the EMA starts from ema.pt ...
    ema = EMA(model)
    distributed.load_full_model_state(model, state["model"], env)  # ... and the model from its own weights
    try:
        distributed.load_full_optimizer_state(model, opt, state["optimizer"], env)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {ckpt_dir}: the optimizer state does not fit this model ({e})") from None
    train_state = TrainState.from_state_dict(rs)
    if precision.scaler is not None and train_state.grad_scaler:
        precision.scaler.load_state_dict(train_state.grad_scaler)
    return train_state, ema, ckpt_dir
