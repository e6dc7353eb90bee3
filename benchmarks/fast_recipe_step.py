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

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from step_bench import add_flags, best_seconds, setup  # noqa: E402

LIGHTNING = dict(use_rmsnorm=True, use_swiglu=True, use_rope=True)
FLOW = {"objective": "flow", "time_sampling": "logit_normal"}
# name: (objective settings, block options, optimizer, steps of the recipe)
ROWS = {"DiT recipe (diffusion, DiT blocks, AdamW)": ({"objective": "diffusion"}, {}, "adamw", 2000),
        "flow + LightningDiT blocks, AdamW": (FLOW, LIGHTNING, "adamw", 500),
        "flow + LightningDiT blocks, Muon (digits-fast)": (FLOW, LIGHTNING, "muon", 500)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flags(ap, steps=20, repeats=5)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    setups = {name: setup(settings, args, device, blocks, optimizer)
              for name, (settings, blocks, optimizer, _) in ROWS.items()}
    best = best_seconds(setups, args.steps, args.repeats, device)
    ref = next(iter(ROWS))
    print(f"{args.model}, {args.channels}x{args.image_size}x{args.image_size}, batch {args.batch}, {device}")
    print("| recipe | s / step | x DiT recipe's step | steps | training time x the DiT recipe's |")
    print("|---|---|---|---|---|")
    for name, sec in best.items():
        steps = ROWS[name][3]
        print(f"| {name} | {sec:.4f} | {sec / best[ref]:.2f} | {steps} | "
              f"{sec * steps / (best[ref] * ROWS[ref][3]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
