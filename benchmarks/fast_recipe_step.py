"""The cost of a training step of recipes/digits-fast.toml against the DiT recipe's (`make demo`), interleaved in one
process so that a slow spell of a shared host hits both alike; and what that makes of the two recipes' training time
(500 steps against 2,000).

    python benchmarks/fast_recipe_step.py                 # the digits shapes: DiT-N/2, 1x8x8, batch 128, CPU fp32
    python benchmarks/fast_recipe_step.py --model DiT-XL/2 --image_size 32 --channels 4 --batch 64 --device cuda

Rows: the DiT recipe (diffusion, DiT blocks, AdamW), the fast recipe's parts added one at a time (flow with
logit-normal t and LightningDiT's blocks, then Muon); seconds per step, best of --repeats interleaved rounds. The EMA
update is the same arithmetic for the constant and the power-function decay (one lerp), so it is not a row.
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

LIGHTNING = dict(use_rmsnorm=True, use_swiglu=True, use_rope=True)
FLOW = {"objective": "flow", "time_sampling": "logit_normal"}
# name: (objective settings, block options, optimizer, steps of the recipe)
ROWS = {"DiT recipe (diffusion, DiT blocks, AdamW)": ({"objective": "diffusion"}, {}, "adamw", 2000),
        "flow + LightningDiT blocks, AdamW": (FLOW, LIGHTNING, "adamw", 500),
        "flow + LightningDiT blocks, Muon (digits-fast)": (FLOW, LIGHTNING, "muon", 500)}


def setup(name: str, args, device):
    settings, blocks, optimizer, _ = ROWS[name]
    objective = build_objective(settings)
    torch.manual_seed(0)
    cfg = DiTConfig.from_name(args.model, input_size=args.image_size, in_channels=args.channels, num_classes=10,
                              **objective.model_fields, **blocks)
    model = DiT(cfg).to(device)
    cuda = device.type == "cuda"
    train_model = parallelize_dit(model, ModelOptions(attention="flash" if cuda else "sdpa"), DistEnv(device=device))
    opt = build_optimizer(model, 1e-4, device, name=optimizer)
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
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    setups = {name: setup(name, args, device) for name in ROWS}
    for s in setups.values():
        seconds_per_step(s, 2, device)  # warm-up
    best = {name: float("inf") for name in ROWS}
    for _ in range(args.repeats):
        for name in ROWS:
            best[name] = min(best[name], seconds_per_step(setups[name], args.steps, device))
    ref = next(iter(ROWS))
    print(f"{args.model}, {args.channels}x{args.image_size}x{args.image_size}, batch {args.batch}, {device}")
    print("| recipe | s / step | x DiT recipe's step | steps | training time x the DiT recipe's |\n|---|---|---|---|---|")
    for name, sec in best.items():
        steps = ROWS[name][3]
        print(f"| {name} | {sec:.4f} | {sec / best[ref]:.2f} | {steps} | "
              f"{sec * steps / (best[ref] * ROWS[ref][3]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
