"""Timing training steps of several configurations on the same shapes, interleaved in one process (a slow spell of a
shared host hits every row alike): the parts benchmarks/meanflow_step.py and benchmarks/fast_recipe_step.py share."""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from opendit.distributed import DistEnv  # noqa: E402
from opendit.models import DiT, DiTConfig  # noqa: E402
from opendit.objectives import build_objective  # noqa: E402
from opendit.parallelize import ModelOptions, parallelize_dit  # noqa: E402
from opendit.precision import Precision  # noqa: E402
from opendit.training.ema import EMA  # noqa: E402
from opendit.training.optim import build_optimizer  # noqa: E402
from opendit.training.step import StepBatch, train_step  # noqa: E402


def add_flags(ap, *, steps: int, repeats: int) -> None:
    """The shapes (the digits demo's by default), the device, and the timing: steps per round, rounds."""
    ap.add_argument("--model", default="DiT-N/2")
    ap.add_argument("--image_size", type=int, default=8)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--repeats", type=int, default=repeats)


def setup(settings: dict, args, device, blocks: dict | None = None, optimizer: str = "adamw") -> dict:
    """A model (``args.model`` with ``blocks``), its optimizer and EMA, the objective of ``settings`` and one fixed
    batch of random images (bf16 on CUDA, fp32 elsewhere)."""
    objective = build_objective(settings)
    torch.manual_seed(0)
    cfg = DiTConfig.from_name(args.model, input_size=args.image_size, in_channels=args.channels, num_classes=10,
                              **objective.model_fields, **(blocks or {}))
    model = DiT(cfg).to(device)
    cuda = device.type == "cuda"
    train_model = parallelize_dit(model, ModelOptions(attention="flash" if cuda else "sdpa"), DistEnv(device=device))
    opt = build_optimizer(model, 1e-4, device, name=optimizer)
    g = torch.Generator().manual_seed(0)
    n = args.batch
    shape = (n, args.channels, args.image_size, args.image_size)
    batch = StepBatch(torch.randn(shape, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device),
                      objective.sample_timesteps(n, generator=g).to(device),
                      torch.rand(n, generator=g).to(device) < 0.1, torch.randn(shape, generator=g).to(device))
    precision = Precision("bf16" if cuda else "fp32", device)
    return dict(train_model=train_model, model=model, opt=opt, objective=objective, batch=batch, ema=EMA(model),
                precision=precision)


def seconds_per_step(s: dict, steps: int, device) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(s["train_model"], s["model"], s["opt"], s["objective"], s["batch"], lr=1e-4, grad_clip=1.0,
                   precision=s["precision"], ema=s["ema"], ema_decay=0.999, env=DistEnv(device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def best_seconds(setups: dict, steps: int, repeats: int, device) -> dict:
    """Seconds per step of each setup: a 2-step warm-up each, then the best of ``repeats`` interleaved rounds."""
    for s in setups.values():
        seconds_per_step(s, 2, device)
    best = {name: float("inf") for name in setups}
    for _ in range(repeats):
        for name, s in setups.items():
            best[name] = min(best[name], seconds_per_step(s, steps, device))
    return best
