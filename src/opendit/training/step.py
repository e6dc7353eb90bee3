"""One optimizer step: loss (the objective's, plus auxiliary losses), backward, clip, the agreement of all ranks on
whether the step is usable, then the update and the EMA, or a skip.

The objective is any object with

    sample_timesteps(n, generator=, device=)           the timesteps a step draws (None when it draws them itself)
    training_losses(model, x, t=, model_kwargs=, noise=)   per-sample {"loss": (N,), ...}

(``opendit.diffusion.GaussianDiffusion`` is one). An auxiliary loss is an object with ``name``, ``weight``, ``depths``
(the block numbers whose output tokens it reads; 1 = after the first block) and ``__call__(hidden, batch) -> scalar``,
where ``hidden`` maps each depth to the (N, T, D) tokens of this step's forward pass (opendit.alignment's RepaLoss is
one).

Every step ends with one small all-reduce of [loss non-finite, grad norm non-finite, stop requested], so all ranks skip
the same bad steps and stop after the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import faults
from ..distributed import DistEnv, all_reduce_
from ..precision import Precision


@dataclass
class StepBatch:
    """This rank's slice of a step: model-space inputs, labels, and the step's draws."""

    x: torch.Tensor  # (N, C, H, W): pixels, or latents already encoded
    y: torch.Tensor  # (N,) labels
    t: torch.Tensor | None  # (N,) the objective's timesteps
    drop: torch.Tensor | None  # (N,) labels to replace by the null class (None: no class dropout)
    noise: torch.Tensor  # the objective's noise, like x
    features: list | None = None  # REPA: each encoder's (N, T, d) features of the clean images


@dataclass
class StepResult:
    loss: torch.Tensor  # the (local) total loss, detached
    grad_norm: torch.Tensor  # the global gradient norm before clipping, detached
    nonfinite_loss: bool  # on any rank
    nonfinite_grad: bool  # on any rank
    stop: bool  # a stop was requested on some rank
    updated: bool  # parameters, optimizer state and EMA were updated
    overflow: bool = False  # fp16: the loss scaler found inf/nan gradients and lowered its scale
    aux: dict = field(default_factory=dict)  # name -> detached auxiliary loss (already weighted)

    @property
    def skipped(self) -> bool:
        """Skipped as a bad step (counted; --max_bad_steps in a row stop the run); an fp16 overflow is not one."""
        return not self.updated and not self.overflow


class HiddenCapture:
    """The model as the objective calls it, returning the output only while keeping the hidden tokens that the
    auxiliary losses asked for (``return_hidden`` of the DiT forward)."""

    def __init__(self, model, depths: tuple[int, ...]):
        self.model, self.depths, self.hidden = model, depths, {}

    def __call__(self, x, t, **kwargs):
        out, self.hidden = self.model(x, t, return_hidden=self.depths, **kwargs)
        return out


def compute_loss(model, objective, batch: StepBatch, aux_losses=()) -> tuple[torch.Tensor, dict]:
    """The step's scalar loss: the mean of the objective's per-sample losses plus each weighted auxiliary loss."""
    kwargs = dict(y=batch.y) if batch.drop is None else dict(y=batch.y, force_drop_ids=batch.drop)
    capture = HiddenCapture(model, tuple(sorted({d for a in aux_losses for d in a.depths}))) if aux_losses else None
    losses = objective.training_losses(capture or model, batch.x, t=batch.t, model_kwargs=kwargs, noise=batch.noise)
    loss, aux = losses["loss"].mean(), {}
    for a in aux_losses:
        aux[a.name] = a.weight * a(capture.hidden, batch)
        loss = loss + aux[a.name]
    return loss, {k: v.detach() for k, v in aux.items()}


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (0 = off: only measured); the norm before clipping, a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded gradients: a replicated DTensor


def train_step(train_model, model, opt: torch.optim.Optimizer, objective, batch: StepBatch, *, lr: float,
               grad_clip: float, precision: Precision, ema, ema_decay: float, env: DistEnv, stop=None,
               aux_losses=(), step_number: int = 0) -> StepResult:
    """One step. ``train_model`` is what the forward goes through (the DDP wrapper or the model itself), ``model`` the
    plain (possibly sharded) module the optimizer and EMA hold; ``stop``: an object whose ``signum`` is nonzero once a
    stop was requested; ``step_number``: the 1-based global step being computed (fault injection in tests)."""
    with precision.autocast():
        loss, aux = compute_loss(train_model, objective, batch, aux_losses)
    if faults.armed("nan_loss", step_number, env.rank):
        loss = loss * float("nan")
    opt.zero_grad(set_to_none=True)
    scaler = precision.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    for group in opt.param_groups:
        group["lr"] = lr
    grad_norm = clip_grad_norm(model, grad_clip)
    faults.maybe_signal(step_number)
    faults.maybe_crash(step_number)
    stop_requested = float(stop is not None and stop.signum != 0)  # a host value: filled on the device, not copied
    flags = torch.cat([torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(grad_norm.detach())]).float(),
                       loss.new_full((1,), stop_requested, dtype=torch.float32)])
    nonfinite_loss, nonfinite_grad, stop_now = (all_reduce_(flags, env, op="max") > 0).tolist()
    result = StepResult(loss.detach(), grad_norm.detach(), nonfinite_loss, nonfinite_grad, stop_now, updated=False,
                        aux=aux)
    if nonfinite_loss or (nonfinite_grad and scaler is None):
        # skip the update everywhere: parameters, optimizer state and EMA stay as they were
        if scaler is not None:
            scaler.update()  # found inf/nan while unscaling: lowers the loss scale
    elif nonfinite_grad:  # fp16 overflow: the loss scaler skips the step and lowers its scale
        scaler.update()
        result.overflow = True
    else:
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        ema.update(ema_decay)
        result.updated = True
    return result
