"""The randomness of a training step: a function of (global seed, global step) over the whole global batch.

Every step seeds one generator from (seed, step) and draws, in this order, the timesteps, the label drops, the
objective's noise and the VAE posterior noise of the *global* batch; each rank takes its slice. So ranks never share
noise, a run on N processes of batch B matches a 1-process run of batch N*B, and a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def step_seed(global_seed: int, global_step: int) -> int:
    return int(np.random.SeedSequence([global_seed, global_step, 0x0D17]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class StepDraws:
    t: torch.Tensor | None  # timesteps (the objective's), this rank's slice
    drop: torch.Tensor  # which labels become the null class
    noise: torch.Tensor  # the objective's noise, shaped like the model input
    vae_eps: torch.Tensor | None  # standard-normal noise of the VAE posterior sample (latent space only)


def draw_step_randomness(gen: torch.Generator, objective, global_batch: int, sl: slice, shape, vae_shape,
                         class_dropout: float, device) -> StepDraws:
    """This rank's slice ``sl`` of the global batch's draws, from ``gen`` (seeded by the caller with step_seed). An
    objective whose ``sample_timesteps`` returns None draws its timesteps itself (t is None)."""
    t = objective.sample_timesteps(global_batch, generator=gen, device=device)
    t = t[sl] if t is not None else None
    drop = (torch.rand(global_batch, generator=gen, device=device) < class_dropout)[sl]
    noise = torch.randn((global_batch, *shape), generator=gen, device=device)[sl]
    vae_eps = torch.randn((global_batch, *vae_shape), generator=gen, device=device)[sl] if vae_shape else None
    return StepDraws(t, drop, noise, vae_eps)
