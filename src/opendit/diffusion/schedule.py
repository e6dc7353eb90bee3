"""Noise schedules (betas) and timestep respacing, in float64."""

from __future__ import annotations

import math

import torch


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """The DDPM linear schedule, rescaled so that any T gives the same total noise as T=1000."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The improved-DDPM cosine schedule: alpha_bar(t) = cos^2(((t/T) + 0.008) / 1.008 * pi/2)."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def named_betas(name: str, num_timesteps: int) -> torch.Tensor:
    if name == "linear":
        return linear_betas(num_timesteps)
    if name in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {name!r}; choose 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """Which of the original steps 0..T-1 a respaced process keeps.

    ``section_counts`` is "N" or "a,b,c" (a list of ints works too): [0, T) is split into
    len(counts) sections of equal size (the remainder goes one each to the first sections),
    and from a section of ``size`` steps ``count`` evenly strided steps are kept, the first and
    last included. "ddimN" instead keeps range(0, T, s) for the integer stride s that gives N steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot make {wanted} equally strided steps out of {num_timesteps}")
        section_counts = [int(c) for c in section_counts.split(",")]
    counts = [int(c) for c in section_counts]
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # The offset is accumulated in float64, step by step, as the published sampler does: the
        # closed form start + round(i * stride) agrees except at exact .5 ties, which the
        # accumulation rounding error breaks one way or the other (e.g. T=1000, 21 steps).
        pos = 0.0
        for _ in range(count):
            kept.add(start + round(pos))
            pos += stride
        start += size
    return kept
