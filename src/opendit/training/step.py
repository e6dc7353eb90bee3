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
the same bad steps and stop after the same step. Two ways to act on it, with the same result:

- on the host (any optimizer): the flags are read back (one host sync per step), then the update runs or not;
- on the device (a fused optimizer, the default on GPUs): no host sync. The flag goes to the optimizer as ``found_inf``
  (the fused kernels skip the update and undo the step count, as under a gradient scaler), the EMA moves by
  (1 - decay) * (1 - flag), and the flags are copied to the host without waiting; the loop reads them one step later
  (``StepResult`` resolves them when first asked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import faults
from ..distributed import DistEnv, all_reduce_
from ..precision import Precision
from .torch_private import optimizer_found_inf, set_scaler_found_inf


@dataclass
class StepBatch:
    """This rank's slice of a step: model-space inputs, labels, and the step's draws."""

    x: torch.Tensor  # (N, C, H, W): pixels, or latents already encoded
    y: torch.Tensor  # (N,) labels
    t: torch.Tensor | None  # (N,) the objective's timesteps
    drop: torch.Tensor | None  # (N,) labels to replace by the null class (None: no class dropout)
    noise: torch.Tensor  # the objective's noise, like x
    features: list | None = None  # REPA: each encoder's (N, T, d) features of the clean images


class StepFlags:
    """The all-reduced [loss non-finite, grad norm non-finite, stop requested] of a step, read on the host: at once
    (``wait``), or when first asked, from a copy to pinned memory started without waiting (on a CPU the tensor is
    already on the host)."""

    def __init__(self, flags: torch.Tensor, wait: bool):
        self._host, self._event, self._values = flags, None, None
        if wait:
            self._values = (flags > 0).tolist()
        elif flags.device.type == "cuda":
            self._host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self._host.copy_(flags, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    @property
    def on_host(self) -> bool:
        return self._values is not None

    @property
    def values(self) -> list[bool]:
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()  # this copy only: later work already queued keeps running
            self._values = (self._host > 0).tolist()
        return self._values


@dataclass
class StepResult:
    loss: torch.Tensor  # the (local) total loss, detached
    grad_norm: torch.Tensor  # the global gradient norm before clipping, detached
    flags: StepFlags
    scaled: bool = False  # fp16: a gradient scaler took part (a non-finite gradient is then an overflow)
    aux: dict = field(default_factory=dict)  # name -> detached auxiliary loss (already weighted)
    step: int = 0  # the 1-based global step

    @property
    def nonfinite_loss(self) -> bool:  # on any rank
        return self.flags.values[0]

    @property
    def nonfinite_grad(self) -> bool:  # on any rank
        return self.flags.values[1]

    @property
    def stop(self) -> bool:  # a stop was requested on some rank
        return self.flags.values[2]

    @property
    def updated(self) -> bool:
        """Parameters, optimizer state and EMA were updated."""
        return not (self.nonfinite_loss or self.nonfinite_grad)

    @property
    def overflow(self) -> bool:
        """fp16: the loss scaler found inf/nan gradients (with a finite loss) and lowered its scale."""
        return self.scaled and self.nonfinite_grad and not self.nonfinite_loss

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

    @property
    def module(self):
        """The plain module (an objective's extra passes without autograd, e.g. MeanFlow's JVP, bypass the capture)."""
        return getattr(self.model, "module", self.model)


def compute_loss(model, objective, batch: StepBatch, aux_losses=()) -> tuple[torch.Tensor, dict]:
    """The step's scalar loss: the mean of the objective's per-sample losses plus each weighted auxiliary loss."""
    kwargs = dict(y=batch.y) if batch.drop is None else dict(y=batch.y, force_drop_ids=batch.drop)
    capture = HiddenCapture(model, tuple(sorted({d for a in aux_losses for d in a.depths}))) if aux_losses else None
    losses = objective.training_losses(capture or model, batch.x, t=batch.t, model_kwargs=kwargs, noise=batch.noise)
    loss, aux = losses["loss"].mean(), {}
    logged = {name: losses[name].mean() for name in getattr(objective, "logged_terms", ())}  # logged, not added
    for a in aux_losses:
        aux[a.name] = a.weight * a(capture.hidden, batch)
        loss = loss + aux[a.name]
    return loss, {k: v.detach() for k, v in {**aux, **logged}.items()}


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (0 = off: only measured); the norm before clipping, a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded gradients: a replicated DTensor


def updates_on_device(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` can skip a step on a device flag (``found_inf``) without the host: the fused AdamW kernels."""
    return bool(opt.defaults.get("fused"))


def train_step(train_model, model, opt: torch.optim.Optimizer, objective, batch: StepBatch, *, lr: float,
               grad_clip: float, precision: Precision, ema, ema_decay: float, env: DistEnv, stop=None,
               aux_losses=(), step_number: int = 0, on_device: bool | None = None) -> StepResult:
    """One step. ``train_model`` is what the forward goes through (the DDP wrapper or the model itself), ``model`` the
    plain (possibly sharded) module the optimizer and EMA hold; ``stop``: an object whose ``signum`` is nonzero once a
    stop was requested; ``step_number``: the 1-based global step being computed (fault injection in tests);
    ``on_device``: skip bad steps without a host sync (default: when the optimizer is fused; False: the host guard,
    the reference the device path is tested against)."""
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
    all_reduce_(flags, env, op="max")
    on_device = updates_on_device(opt) if on_device is None else on_device
    if on_device and not updates_on_device(opt):
        raise ValueError("on_device needs a fused optimizer (found_inf)")
    result = StepResult(loss.detach(), grad_norm.detach(), StepFlags(flags, wait=not on_device),
                        scaled=scaler is not None, aux=aux, step=step_number)
    if on_device:
        update_on_device(opt, scaler, ema, ema_decay, bad=flags[:2].amax())
    elif result.updated:
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        ema.update(ema_decay)
    elif scaler is not None:  # the loss scaler found inf/nan while unscaling (an overflow, or a NaN loss): lower the scale
        scaler.update()
    return result


def update_on_device(opt, scaler, ema, ema_decay: float, bad: torch.Tensor) -> None:
    """The update, or none where ``bad`` (a 0-d float flag, the same on every rank) is 1, without reading it."""
    if scaler is not None:
        # the scaler's own found_inf covers this rank's gradients only (a shard, under FSDP); make it the all-reduced
        # flag, so that every rank skips alike and the scale backs off alike
        set_scaler_found_inf(scaler, opt, bad)
        scaler.step(opt)  # a fused optimizer takes found_inf from the scaler: no host sync
        scaler.update()
    else:
        with optimizer_found_inf(opt, bad):
            opt.step()
    ema.update(ema_decay, keep=1.0 - bad)
