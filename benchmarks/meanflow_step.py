"""The cost of a MeanFlow training step against a flow step (same model size, batch and draws): the JVP pass (the
plain module, forward-mode AD, SDPA's math path), the guidance passes (two forwards without autograd when kappa > 0,
one when only omega is set, none without trained-in guidance), then the ordinary forward and backward.

    python benchmarks/meanflow_step.py --model DiT-N/2 --image_size 8 --channels 1 --batch 128      # the digits demo
    python benchmarks/meanflow_step.py --model DiT-XL/2 --image_size 32 --channels 4 --batch 64 --device cuda

Rows: flow (SiT, velocity), MeanFlow without trained-in guidance (omega 1, kappa 0), MeanFlow with the released
defaults (omega 1, kappa 0.5); seconds per step (best of --repeats interleaved rounds) and the ratio to the flow step.
"""

from __future__ import annotations

import argparse
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

ROWS = {"flow": {"objective": "flow"},
        "meanflow, no guidance trained in": {"objective": "meanflow", "omega": 1.0, "kappa": 0.0},
        "meanflow, released defaults (omega 1, kappa 0.5)": {"objective": "meanflow"}}


def setup(name: str, args, device):
    objective = build_objective(ROWS[name])
    torch.manual_seed(0)
    cfg = DiTConfig.from_name(args.model, input_size=args.image_size, in_channels=args.channels, num_classes=10,
                              **objective.model_fields)
    model = DiT(cfg).to(device)
    cuda = device.type == "cuda"
    train_model = parallelize_dit(model, ModelOptions(attention="flash" if cuda else "sdpa"), DistEnv(device=device))
    opt = build_optimizer(model, 1e-4, device)
    g = torch.Generator().manual_seed(0)
    n = args.batch
    batch = StepBatch(torch.randn(n, args.channels, args.image_size, args.image_size, generator=g).to(device),
                      torch.randint(0, 10, (n,), generator=g).to(device),
                      objective.sample_timesteps(n, generator=g).to(device), torch.rand(n, generator=g).to(device) < 0.1,
                      torch.randn(n, args.channels, args.image_size, args.image_size, generator=g).to(device))
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="DiT-N/2")
    ap.add_argument("--image_size", type=int, default=8)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    setups = {name: setup(name, args, device) for name in ROWS}
    for s in setups.values():
        seconds_per_step(s, 2, device)  # warm-up
    best = {name: float("inf") for name in ROWS}
    for _ in range(args.repeats):  # interleaved rounds: a slow spell of a shared host hits every row alike
        for name in ROWS:
            best[name] = min(best[name], seconds_per_step(setups[name], args.steps, device))
    print(f"{args.model}, {args.channels}x{args.image_size}x{args.image_size}, batch {args.batch}, {device}")
    print("| objective | s / step | x flow |\n|---|---|---|")
    for name, sec in best.items():
        print(f"| {name} | {sec:.4f} | {sec / best['flow']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
