"""Exponential moving average of the model weights, kept in fp32: ema <- decay * ema + (1 - decay) * param.

The averages are clones of the trainable parameters, so under a sharded plugin they are sharded the same way (each rank
keeps only its shard: no full fp32 copy per rank). ``state_dict`` gathers the whole EMA model (collective).
"""

from __future__ import annotations

import torch

from ..distributed import DistEnv, full_model_state, local
from ..models import TRAINING_ONLY

# the model's training-only parts (REPA's projectors) are not part of the sampled model: not averaged, not in the EMA
NOT_AVERAGED = TRAINING_ONLY


class EMA:
    def __init__(self, module: torch.nn.Module):
        """Track the trainable parameters of ``module`` (the unwrapped, possibly sharded model the optimizer updates),
        starting from their current values."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad and not n.startswith(NOT_AVERAGED)]
        self.module = module
        self.names = [n for n, _ in named]
        self._src = [p for _, p in named]
        self.shadow = [p.detach().clone().float() for _, p in named]
        # local shards (views sharing storage) taken once: the optimizer updates these tensors in place
        self._src_local = [local(p).detach() for p in self._src]
        self._shadow_local = [local(e) for e in self.shadow]

    @torch.no_grad()
    def update(self, decay: float, keep: torch.Tensor | None = None) -> None:
        """``keep``: a 0/1 device flag (0-d), the update times it (0: the EMA stays as it is) with no host
        sync; the same rounding as without it where it is 1."""
        if keep is None:
            torch._foreach_lerp_(self._shadow_local, self._src_local, 1.0 - decay)
        else:
            torch._foreach_lerp_(self._shadow_local, self._src_local, keep * (1.0 - decay))

    def state_dict(self, env: DistEnv | None = None) -> dict:
        """The whole EMA model as a plain fp32 state dict (the frozen entries, e.g. pos_embed, from the model; without
        the NOT_AVERAGED parts), on rank 0
        ({} elsewhere). Every rank must call it."""
        env = env or DistEnv()
        sd = {k: v for k, v in full_model_state(self.module, env).items() if not k.startswith(NOT_AVERAGED)}
        for name, t in zip(self.names, self.shadow):
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            if env.is_main:
                sd[name] = full.detach().float().cpu()
        return sd
