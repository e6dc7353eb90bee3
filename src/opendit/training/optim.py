"""The optimizer (AdamW, no weight decay, as published; or Muon for the blocks' matrices, opendit.training.muon) and
the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from .muon import MuonAdamW, muon_parameter


OPTIMIZERS = ("adamw", "muon")


def build_optimizer(model: torch.nn.Module, lr: float, device: torch.device, beta2: float = 0.999,
                    impl: str = "auto", name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, betas (0.9, beta2): 0.999 as DiT, 0.95 as LightningDiT. ``impl``: fused
    (one kernel; skips a bad step on a device flag, see training.step), foreach, or auto (fused on GPUs). ``name``
    "muon": Muon on the blocks' 2-D weights and this AdamW on the rest (``impl`` does not apply). Build it after the
    model is sharded."""
    if name == "muon":
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return MuonAdamW([p for n, p in named if muon_parameter(n, p)],
                         [p for n, p in named if not muon_parameter(n, p)], lr=lr, betas=(0.9, beta2))
    fused = device.type == "cuda" if impl == "auto" else impl == "fused"
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, beta2),
                             weight_decay=0, fused=fused)


def learning_rate(step: int, *, lr: float, schedule: str, warmup: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup, then constant or cosine to 0."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr
