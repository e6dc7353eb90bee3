"""Exponential moving average of the model weights, kept in fp32: ema <- decay * ema + (1 - decay) * param.

The decay is a constant (``--ema_decay``, as DiT) or EDM2's power-function profile (``--ema_std``, Karras et al. 2024,
"Analyzing and Improving the Training Dynamics of Diffusion Models", eq. 127): after step k (1-based) the decay is
(1 - 1/k)^(gamma + 1), so the average after k steps weights step i's weights by (i^(gamma+1) - (i-1)^(gamma+1)) /
k^(gamma+1): a profile proportional to i^gamma whose width is a fixed fraction of the run (the relative std
sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))), eq. 123; 0.05 and 0.10 in EDM2), however long the run is.

The averages are clones of the trainable parameters, so under a sharded plugin they are sharded the same way (each rank
keeps only its shard: no full fp32 copy per rank). ``state_dict`` gathers the whole EMA model (collective).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..distributed import DistEnv, full_model_state, local
from ..models import TRAINING_ONLY

# the model's training-only parts (REPA's projectors) are not part of the sampled model: not averaged, not in the EMA
NOT_AVERAGED = TRAINING_ONLY


# the widest power-function profile: gamma = 0 (a uniform average of every step so far)
MAX_EMA_STD = 12 ** -0.5


@functools.lru_cache(maxsize=8)
def power_ema_exponent(std: float) -> float:
    """gamma of the power-function EMA with relative std ``std`` (EDM2 eq. 126): the largest real root of
    gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + 12 - std^-2 = 0 (the profile's std as a fraction of its length)."""
    if not 0.0 < std <= MAX_EMA_STD:
        raise ValueError(f"the power-function EMA's relative std must be in (0, {MAX_EMA_STD:.4f}], got {std}")
    c = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def ema_decay_at(step: int, decay: float, std: float | None = None) -> float:
    """The EMA decay of the update after optimizer step ``step`` (1-based): ``decay`` (constant), or with ``std`` the
    power-function profile's (1 - 1/step)^(gamma + 1) (0 at step 1: the average starts at the first step's weights)."""
    if std is None:
        return decay
    return (1.0 - 1.0 / step) ** (power_ema_exponent(std) + 1.0)


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
