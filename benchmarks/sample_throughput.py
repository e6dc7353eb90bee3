"""Sampling throughput of a DiT: images/s, model evaluations (sample-forwards) per second, achieved TFLOP/s and MFU
against the device's dense bf16 peak, and peak memory, for the samplers people use, with guidance everywhere or only
in an interval (whose unguided steps run the conditional half alone), and with cached steps (TaylorSeer, the whole
model every 2nd call; eager only). ``--compile`` / ``--cuda_graphs``: the fast sampling path (opendit.sampling.compiled).

    python benchmarks/sample_throughput.py --model DiT-XL/2 --image_size 256 --batch 64 --device cuda
    python benchmarks/sample_throughput.py --model DiT-S/2 --image_size 256 --batch 8 --device cpu --steps_scale 0.1

Random weights (the cost does not depend on them; the final layer is perturbed off its zero init so that nothing
short-circuits); latents only (the VAE decode is not timed). FLOPs: 2 x the model's multiply-adds per sample-forward
(opendit.flops, the paper's counting); TFLOP/s and MFU count the whole forwards only (a cached call's cheap parts are
left out). Each row is timed after a 2-step warm-up of the same sampler (which also compiles its shapes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from opendit.flops import dit_forward_macs  # noqa: E402
from opendit.models import DiT_models  # noqa: E402
from opendit.sampling.cache import CacheSettings, FeatureCache  # noqa: E402
from opendit.sampling.compiled import compiled_forward  # noqa: E402
from opendit.sampling.generate import generate  # noqa: E402
from opendit.sampling.routing import forwards_replaced  # noqa: E402
from opendit.transport import create_transport  # noqa: E402
from train_throughput import device_name, peak_tflops, sync  # noqa: E402

# (label, objective, sampler, steps at --steps_scale 1, flow options)
SAMPLERS = [
    ("DDPM 250", "diffusion", "ddpm", 250, {}),
    ("DPM-Solver++ 20", "diffusion", "dpm-solver++", 20, {}),
    ("flow Euler 250", "flow", "ode", 251, {"sampling_method": "euler"}),
    ("flow Heun 21 (40 NFE)", "flow", "ode", 21, {"sampling_method": "heun"}),
]


@contextlib.contextmanager
def counted_forwards(model):
    """Yields a list that gets the batch size of every ``model.forward`` call made inside the block (samplers call
    ``forward`` directly, so a forward hook would not see them)."""
    calls, forward = [], model.forward
    with forwards_replaced([(model, lambda x, t, y, **kw: (calls.append(len(x)), forward(x, t, y, **kw))[1])]):
        yield calls


def run(model, objective, sampler, steps, options, labels, noise, cfg, interval, autocast, cache=None):
    """The batch rows of every model call, and of those the rows through the whole model."""
    cache = FeatureCache(cache) if cache is not None else None
    with counted_forwards(model) as calls, torch.no_grad(), autocast:
        torch.manual_seed(0)
        generate(model, labels, noise, sampler=sampler, steps=steps, cfg_scale=cfg, cfg_interval=interval,
                 objective=objective, cache=cache, **options)
    return calls, (cache.whole_rows if cache is not None else sum(calls))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--image_size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cfg_scale", type=float, default=4.0)
    ap.add_argument("--interval", type=float, nargs=2, default=(0.3, 1.0), metavar=("LO", "HI"))
    ap.add_argument("--steps_scale", type=float, default=1.0, help="scale every sampler's step count (quick CPU rows)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="the compiled forward (no cache rows: the cache is eager)")
    ap.add_argument("--cuda_graphs", action="store_true", help="with --compile: replayed as CUDA graphs")
    ap.add_argument("--samplers", default=None,
                    help="comma-separated starts of the sampler labels to keep (e.g. 'DPM-Solver++,flow Heun')")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    latent = args.image_size // 8
    torch.manual_seed(0)
    model = DiT_models[args.model](input_size=latent, in_channels=4, num_classes=1000,
                                   attention_impl="flash" if device.type == "cuda" else "sdpa").to(device).eval()
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(std=0.02)
    flops = 2 * dit_forward_macs(model.config)
    peak = peak_tflops(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.batch, 4, latent, latent, generator=g).to(device)
    labels = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    print(f"{args.model} @{args.image_size} (latents {latent}x{latent}x4), batch {args.batch}, cfg {args.cfg_scale}, "
          f"{flops / 1e9:.1f} GFLOP per sample-forward, {device_name(device)}, torch {torch.__version__}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}"
          + (f", compiled{' + CUDA graphs' if args.cuda_graphs else ''}" if args.compile else ", eager"))
    print("| sampler | guidance | model calls | whole sample-forwards / image | s | img/s | sample-forwards/s | TFLOP/s | "
          "MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    interval = tuple(args.interval)
    settings = [("everywhere", None, None), ("in [{:g}, {:g}]".format(*interval), interval, None)]
    if not args.compile:
        settings.append(("everywhere, TaylorSeer cache (whole every 2nd call)", None, CacheSettings("taylorseer", 2, 2)))
    wanted = args.samplers.split(",") if args.samplers else None
    for label, kind, sampler, steps, options in SAMPLERS:
        if wanted and not any(label.startswith(w) for w in wanted):
            continue
        objective = create_transport() if kind == "flow" else None
        steps = max(2, round(steps * args.steps_scale))
        for guidance, interval, cache in settings:
            with compiled_forward(model, cuda_graphs=args.cuda_graphs, enabled=args.compile):
                run(model, objective, sampler, 2, options, labels, noise, args.cfg_scale, interval, autocast, cache)
                sync(device)  # warmed up (and compiled)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                calls, rows = run(model, objective, sampler, steps, options, labels, noise, args.cfg_scale, interval,
                                  autocast, cache)
                sync(device)
            dt = time.perf_counter() - t0
            tflops = rows * flops / dt / 1e12
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            name = label if args.steps_scale == 1 else f"{label} (x{args.steps_scale:g}: {steps} points/steps)"
            mfu = f"{tflops / peak:.1%}" if peak else "n/a"
            print(f"| {name} | {guidance} | {len(calls)} | {rows / args.batch:.1f} | {dt:.2f} | {args.batch / dt:.2f} | "
                  f"{rows / dt:.1f} | {tflops:.3f} | {mfu} | {mem:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
