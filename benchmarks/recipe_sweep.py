"""One point of a recipe sweep on the digits: train the demo's budget (benchmarks/time_to_quality.py's COMMON flags)
plus the given flags for --steps steps on their own schedule (the cosine ends there), then score the final EMA like
`make demo` (500 samples, 20 model evaluations, guidance 1.0 and 1.5). Prints one line; appends it to --log.

    python benchmarks/recipe_sweep.py fast-lr1e-2 --steps 500 -- --use_rmsnorm --use_swiglu --use_rope \\
        --objective flow --time_sampling logit_normal --optimizer muon --lr 1e-2 --warmup_steps 50 --ema_std 0.1

The issue-28 exploration (BENCHMARKS.md, "Reaching the demo's quality in 500 steps") is a list of such lines.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import time_to_quality as ttq  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--work", default=os.path.join(ttq.REPO, "outputs", "recipe_sweep"))
    p.add_argument("--log", default=os.path.join(ttq.REPO, "outputs", "recipe_sweep", "results.txt"))
    p.add_argument("flags", nargs=argparse.REMAINDER, help="training flags after --")
    args = p.parse_args()
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    run = ttq.train(args.name, flags, args.steps, args.steps, args.work)
    seconds = ttq.training_seconds(run)[args.steps]
    ckpt = ttq.list_checkpoints(run)[-1]
    s10, s15 = ttq.evaluate(ckpt, 1.0), ttq.evaluate(ckpt, 1.5)
    line = (f"{args.name}: {args.steps} steps, {seconds:.0f} s; cfg 1.5: acc {s15['accuracy']:.1%}, pixel FD "
            f"{s15['pixel_fd']:.2f}; cfg 1.0: acc {s10['accuracy']:.1%}, pixel FD {s10['pixel_fd']:.2f}, feature FD "
            f"{s10['feature_fd']:.2f}; flags {' '.join(flags)}")
    print(line)
    os.makedirs(os.path.dirname(args.log), exist_ok=True)
    with open(args.log, "a") as f:
        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
