"""Guidance interval on the digits: speed and quality of classifier-free guidance applied only in a time interval,
where the steps outside it run one forward of the conditional half (half a guided step's compute).

For the `make demo` (diffusion, DPM-Solver++ 20) and `make demo-flow` (flow, Heun on 11 points) checkpoints: 500
samples (labels i mod 10, fixed noise) with no guidance, guidance 1.5 everywhere, and guidance 1.5 in [0.3, 1] and
[0.5, 1] (0 = noise, 1 = data), and for sigma in [0, 2.333] (the noise-level axis: [0.3, 1]'s region for the flow). Reports model calls, sample-forwards (batch rows through the DiT, relative to
guidance everywhere), sampling seconds in this process (best of --repeats, interleaved; no process start, no PNGs),
and the digits scores (classifier accuracy, pixel and feature Fréchet distance).

    make demo demo-flow && python benchmarks/guidance_interval.py
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))

from opendit.eval.digits import load_classifier, score  # noqa: E402
from opendit.images import to_uint8  # noqa: E402
from opendit.cli.sample import build_parser  # noqa: E402
from opendit.sampling.generate import generate, quick_sampler  # noqa: E402
from opendit.sampling.load import load_for_sampling  # noqa: E402
from sample_throughput import counted_forwards  # noqa: E402

# (row, cfg scale, generate's interval keyword): REPA's published interval (t >= 0.3 in SiT's time) stated on the t
# axis and on the sigma axis (sigma <= 7/3): the same region for a Linear flow, not for DiT's diffusion
SETTINGS = [("no guidance", 1.0, {}), ("cfg 1.5 everywhere", 1.5, {}),
            ("cfg 1.5 in [0.3, 1]", 1.5, {"cfg_interval": (0.3, 1.0)}),
            ("cfg 1.5 for sigma in [0, 2.333]", 1.5, {"cfg_interval_sigma": (0.0, 2.333)}),
            ("cfg 1.5 in [0.5, 1]", 1.5, {"cfg_interval": (0.5, 1.0)})]


def newest_checkpoint(outputs: str) -> str:
    runs = sorted(glob.glob(os.path.join(REPO, outputs, "*-DiT-N-2")))
    if not runs:
        raise SystemExit(f"no run under {outputs}: run `make {os.path.basename(outputs)}` first")
    return runs[-1]


def demo_checkpoint(outputs: str, num_samples: int):
    """The newest run under ``outputs``, loaded for sampling on the CPU, with the benchmark's labels (i mod classes)
    and fixed noise."""
    run = newest_checkpoint(outputs)
    loaded = load_for_sampling(build_parser().parse_args(["--ckpt", run, "--device", "cpu"]), torch.device("cpu"))
    noise = torch.randn(num_samples, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return run, loaded, torch.arange(num_samples) % loaded.num_classes, noise


def digits_parser(doc: str) -> argparse.ArgumentParser:
    """The flags of the digits sampling tables: which demo runs, how many samples, how many interleaved rounds."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--runs", default="outputs/demo,outputs/demo-flow")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest of each row is kept")
    return p


def main() -> int:
    args = digits_parser(__doc__).parse_args()
    torch.set_grad_enabled(False)
    clf = load_classifier()
    print("| checkpoint, sampler | guidance | model calls | sample-forwards | seconds | accuracy | pixel FD | feature FD |")
    print("|---|---|---|---|---|---|---|---|")
    for outputs in args.runs.split(","):
        run, loaded, labels, noise = demo_checkpoint(outputs, args.num_samples)
        model, kind = loaded.model, quick_sampler(loaded.objective)
        rows = {}
        for rep in range(args.repeats):
            for name, cfg, interval in SETTINGS:
                torch.manual_seed(0)
                t0 = time.perf_counter()
                with counted_forwards(model) as calls:
                    x = generate(model, labels, noise, cfg_scale=cfg, clip_denoised=loaded.codec is None, **interval,
                                 **kind)
                dt = time.perf_counter() - t0
                if name not in rows or dt < rows[name]["seconds"]:
                    rows[name] = {"seconds": dt, "calls": len(calls), "forwards": sum(calls), "images": to_uint8(x)}
        base = rows["cfg 1.5 everywhere"]["forwards"]
        what = f"{os.path.basename(run)} ({outputs.split('/')[-1]}), {kind['sampler']} {kind['steps']}"
        for name, _, _ in SETTINGS:
            r = rows[name]
            s = score(r["images"], labels.numpy(), clf)
            print(f"| {what} | {name} | {r['calls']} | {r['forwards'] / base:.1%} | {r['seconds']:.2f} | "
                  f"{s['accuracy']:.1%} | {s['pixel_fd']:.2f} | {s['feature_fd']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
