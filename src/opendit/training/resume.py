"""Resuming a run: which checkpoint (``--load``), the run's settings it brings (before anything is built, since they
decide the model and the data), then the weights, EMA, optimizer and counters (after the model is built and sharded).
Rank 0 reads the files; the others receive the states through collectives.

Fine-tuning: ``--load`` of weights that carry no training state (an ``opendit export`` folder, ``hf://OWNER/NAME``, a
.safetensors / .pt file, a published checkpoint's name) starts a new run from them: model and EMA start from the
weights, the optimizer and the step count from scratch. The architecture (model and block options) and the objective
come from the weights' config.json when it has one and the flags do not say; an architecture flag that contradicts
it is an error (the weights would not fit), an objective flag is applied."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..distributed import DistEnv
from .. import checkpoint as ckpt
from ..config import TrainConfig
from ..config.train import ModelSettings, ObjectiveSettings
from ..errors import UserError
from .ema import EMA, NOT_AVERAGED
from .run_settings import apply_run_settings, saved_settings
from .state import TrainState


@dataclass
class ResumePlan:
    load: str | None = None  # a checkpoint or run directory; None: a new run
    init: str | None = None  # fine-tuning: the weights a new run starts from (as given)
    init_source: str | None = None  # ... the file they were read from
    init_state: dict | None = None  # ... the state dict (rank 0 only)
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
    if plan.load and is_weights_only(plan.load):
        plan.init, plan.load = plan.load, None
        loaded = distributed.on_rank0(lambda: ckpt.load_weights(plan.init, flag="--load"), env)
        plan.init_state = loaded[0] if loaded else None
        plan.init_source, source_cfg = distributed.broadcast_object(loaded[1:] if loaded else None, env)
        plan.notes.extend(apply_weights_settings(cfg, given, source_cfg, plan.init))
        return plan
    if plan.load:
        plan.run_dir, plan.saved = distributed.broadcast_object(
            distributed.on_rank0(lambda: saved_settings(plan.load), env), env)
        plan.changes = apply_run_settings(cfg, given, plan.saved, env.world_size, plan.run_dir)
    return plan


def is_weights_only(path: str) -> bool:
    """``--load PATH`` names weights without a training state (fine-tuning) rather than a run or checkpoint to resume:
    a Hub address, a published checkpoint's name, a file, or a folder with model.safetensors and no checkpoints (an
    ``opendit export``)."""
    from ..hf_hub import is_hf_uri
    from ..published import PUBLISHED

    if is_hf_uri(path) or (path in PUBLISHED and not os.path.exists(path)) or os.path.isfile(path):
        return True
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "model.safetensors"))
            and not ckpt.is_checkpoint_dir(path) and not ckpt.list_checkpoints(path))


# what the weights decide, taken from their config.json unless the command line says: the architecture (a different
# value is an error) and the objective (a different value is applied)
ARCHITECTURE = tuple(f.name for f in dataclasses.fields(ModelSettings))
OBJECTIVE = tuple(f.name for f in dataclasses.fields(ObjectiveSettings))


def apply_weights_settings(cfg: TrainConfig, given: set[str] | None, source_cfg: dict | None, load: str) -> list[str]:
    """Fine-tuning: the architecture and objective of the weights' config.json for the settings not given; returns
    lines for the run's log."""
    notes = [f"fine-tuning from {load}: a new run starting from these weights (model and EMA); a fresh optimizer and "
             f"step count"]
    if not source_cfg:
        return notes + ["the weights have no config.json: the flags give the architecture (the shapes are checked)"]
    given = set(cfg.names()) if given is None else given
    for key in (*ARCHITECTURE, *OBJECTIVE):
        if key not in source_cfg:
            continue
        theirs = source_cfg[key]
        if key not in given:
            cfg.set(key, theirs)
        elif key in ARCHITECTURE and cfg.get(key) != theirs:
            raise UserError(f"--{key} {cfg.get(key)}: the weights of --load {load} are --{key} {theirs} (their "
                            f"config.json); drop the flag (their value is used)")
        elif cfg.get(key) != theirs:
            notes.append(f"--{key} {cfg.get(key)}: the weights were trained with --{key} {theirs}")
    return notes


def check_initial_weights(model: torch.nn.Module, plan: ResumePlan, env: DistEnv) -> None:
    """Fine-tuning, on the plain model before it is sharded: rank 0 checks the weights against its shapes and adds
    REPA's projectors, which the weights do not have, at their fresh initialization. Collective (errors on every
    rank)."""
    def merged() -> dict:
        own = model.state_dict()
        shapes = {k: tuple(v.shape) for k, v in own.items() if not k.startswith(NOT_AVERAGED)}
        ckpt.check_fits(shapes, plan.init_state, f"--load {plan.init} ({plan.init_source})")
        return {**{k: v.detach().clone() for k, v in own.items() if k.startswith(NOT_AVERAGED)}, **plan.init_state}

    plan.init_state = distributed.on_rank0(merged, env)


def load_initial_weights(model: torch.nn.Module, plan: ResumePlan, env: DistEnv) -> None:
    """Fine-tuning: the checked weights into the built (possibly sharded) model. Collective."""
    distributed.load_full_model_state(model, plan.init_state or {}, env)
    plan.init_state = None


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
