"""Cached steps on the digits: speed and quality of reusing (FORA) or forecasting (TaylorSeer, first order) the blocks'
attention and MLP outputs between whole model calls, against the plain sampler at equal budgets of whole calls.

For the `make demo` (diffusion, DPM-Solver++) and `make demo-flow` (flow, Heun) checkpoints, 500 samples (labels i mod
10, fixed noise, guidance 1.5): the plain sampler at 20, 14, 11 (Heun: 10) and 8 model calls (a flow also with Euler at 11 and
8), and the 20-call sampler with a cache refreshed every 2 and every 3 calls (first 2 calls whole), which runs 11 and 8
whole calls. A cache pays only if it beats the best plain sampler with as many whole calls. Seconds: sampling in this
process, best of --repeats, interleaved; then the digits scores (classifier accuracy, pixel and feature Fréchet
distance).

    make demo demo-flow && python benchmarks/feature_cache.py
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from guidance_interval import demo_checkpoint, digits_parser  # noqa: E402
from sample_throughput import counted_forwards  # noqa: E402
from opendit.eval.digits import load_classifier, score  # noqa: E402
from opendit.images import to_uint8  # noqa: E402
from opendit.sampling.cache import CacheSettings, FeatureCache  # noqa: E402
from opendit.sampling.generate import generate  # noqa: E402
from opendit.transport import Transport  # noqa: E402


def settings(flow: bool):
    """(row name, sampler keyword arguments, cache settings or None)."""
    def sampler(calls: int, euler: bool = False) -> dict:
        if not flow:
            return dict(sampler="dpm-solver++", steps=calls)
        if euler:  # one call per step: calls + 1 points
            return dict(sampler="ode", steps=calls + 1, sampling_method="euler")
        return dict(sampler="ode", steps=calls // 2 + 1, sampling_method="heun")  # 2 calls per step

    name = "Heun" if flow else "DPM-Solver++"
    rows = [(f"plain {name}, {c} calls", sampler(c), None) for c in ((20, 14, 10, 8) if flow else (20, 14, 11, 8))]
    if flow:  # at the cached rows' budgets of whole calls, the plain first-order sampler too
        rows += [(f"plain Euler, {c} calls", sampler(c, euler=True), None) for c in (11, 8)]
    for interval in (2, 3):
        for method in ("fora", "taylorseer"):
            rows.append((f"{method}, {name} 20 calls, whole every {interval}", sampler(20),
                         CacheSettings(method, interval, 2)))
    return rows


def main() -> int:
    p = digits_parser(__doc__)
    p.add_argument("--cfg_scale", type=float, default=1.5)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    clf = load_classifier()
    print("| checkpoint | sampler | model calls | whole calls | seconds | accuracy | pixel FD | feature FD |")
    print("|---|---|---|---|---|---|---|---|")
    for outputs in args.runs.split(","):
        run, loaded, labels, noise = demo_checkpoint(outputs, args.num_samples)
        flow = isinstance(loaded.objective, Transport)
        results = {}
        for _ in range(args.repeats):
            for name, kind, cache_settings in settings(flow):
                cache = FeatureCache(cache_settings) if cache_settings else None
                torch.manual_seed(0)
                t0 = time.perf_counter()
                with counted_forwards(loaded.model) as calls:
                    x = generate(loaded.model, labels, noise, cfg_scale=args.cfg_scale, clip_denoised=not flow,
                                 objective=loaded.objective if flow else None, cache=cache, **kind)
                dt = time.perf_counter() - t0
                whole = cache.whole if cache else len(calls)
                if name not in results or dt < results[name]["seconds"]:
                    results[name] = {"seconds": dt, "calls": len(calls), "whole": whole, "images": to_uint8(x)}
        what = f"{os.path.basename(run)} ({outputs.split('/')[-1]})"
        for name, _, _ in settings(flow):
            r = results[name]
            s = score(r["images"], labels.numpy(), clf)
            print(f"| {what} | {name} | {r['calls']} | {r['whole']} | {r['seconds']:.2f} | {s['accuracy']:.1%} | "
                  f"{s['pixel_fd']:.2f} | {s['feature_fd']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
