"""Exponential moving average of the model weights, kept in fp32: ema <- decay * ema + (1 - decay) * param."""

from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module):
        """Track ``model`` (an unwrapped nn.Module, whose parameters the optimizer updates in place). The EMA model
        starts as an fp32 copy of it, frozen and in eval mode."""
        self.model = copy.deepcopy(model).float().requires_grad_(False).eval()
        ema_params = dict(self.model.named_parameters())
        pairs = [(ema_params[n], p) for n, p in model.named_parameters() if p.requires_grad]
        self._ema = [e for e, _ in pairs]
        self._src = [p for _, p in pairs]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        src = [p.detach().float() for p in self._src]
        torch._foreach_lerp_(self._ema, src, 1.0 - decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd, strict=True)
