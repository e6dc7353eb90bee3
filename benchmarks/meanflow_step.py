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

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from step_bench import add_flags, best_seconds, setup  # noqa: E402

ROWS = {"flow": {"objective": "flow"},
        "meanflow, no guidance trained in": {"objective": "meanflow", "omega": 1.0, "kappa": 0.0},
        "meanflow, released defaults (omega 1, kappa 0.5)": {"objective": "meanflow"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flags(ap, steps=10, repeats=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    best = best_seconds({name: setup(ROWS[name], args, device) for name in ROWS}, args.steps, args.repeats, device)
    print(f"{args.model}, {args.channels}x{args.image_size}x{args.image_size}, batch {args.batch}, {device}")
    print("| objective | s / step | x flow |\n|---|---|---|")
    for name, sec in best.items():
        print(f"| {name} | {sec:.4f} | {sec / best['flow']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
