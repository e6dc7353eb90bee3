"""The two torch-private hooks the sync-free step relies on, in one place (tests/test_sync_free_step.py checks them
against the installed torch and fails loudly when a torch release changes them):

- ``GradScaler._per_optimizer_states[id(opt)]["found_inf_per_device"]``: the inf/nan flags ``unscale_`` recorded; a
  fused optimizer under a scaler skips its update on them, and ``update`` backs the scale off on them;
- ``opt.found_inf``: what the fused Adam/AdamW kernels read (``getattr(self, "found_inf", None)`` in
  ``torch.optim.Adam.step``) to skip the update on the device and undo the step count.
"""

from __future__ import annotations

import contextlib

import torch

CHANGED = ("this torch ({version}) no longer has {what}, which opendit's sync-free step sets; train with "
           "--optimizer_impl foreach (the host-guarded step) and report the torch version")


def set_scaler_found_inf(scaler, opt: torch.optim.Optimizer, flag: torch.Tensor) -> None:
    """Make ``flag`` (0-d, 1 = skip) the inf/nan flag ``scaler`` recorded for ``opt`` on every device, so that
    ``scaler.step`` skips the update and ``scaler.update`` backs off exactly where ``flag`` says. Call after
    ``scaler.unscale_(opt)``."""
    try:
        found = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
    except (AttributeError, KeyError, TypeError) as e:
        raise RuntimeError(CHANGED.format(version=torch.__version__,
                                          what="GradScaler._per_optimizer_states[...]['found_inf_per_device']")) from e
    if not found:
        raise RuntimeError("set_scaler_found_inf: the scaler recorded no flags for this optimizer (call unscale_ first)")
    for t in found.values():
        t.copy_(flag)


@contextlib.contextmanager
def optimizer_found_inf(opt: torch.optim.Optimizer, flag: torch.Tensor):
    """Inside the block, ``opt.step()`` of a fused optimizer skips its update where ``flag`` (0-d, 1 = skip) is set."""
    opt.found_inf = flag
    try:
        yield opt
    finally:
        del opt.found_inf
