"""The training step with and without its per-step host sync: opendit.training.step.train_step with the fused AdamW,
the bad-step guard read on the host (the flags copied back and read every step) against the sync-free guard (the skip
on the device, the flags read one step later), in one process, interleaved.

Each configuration runs --steps steps back to back with nothing else in between (no data loading: the same batch),
then waits for the device once; time per step = the total / steps. On a CPU every op already runs to completion
before the next starts, so the two should tie; on a GPU the host-guarded loop stalls the queue once per step.

    python benchmarks/step_sync.py --model DiT-XL/2 --image_size 256 --batch 128 --device cuda
    python benchmarks/step_sync.py --model DiT-S/2 --image_size 64 --batch 8 --device cpu
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from opendit.diffusion import create_diffusion  # noqa: E402
from opendit.distributed import DistEnv  # noqa: E402
from opendit.flops import dit_train_flops_per_image  # noqa: E402
from opendit.models import DiT_models  # noqa: E402
from opendit.parallelize import ModelOptions, parallelize_dit  # noqa: E402
from opendit.precision import Precision  # noqa: E402
from opendit.training.ema import EMA  # noqa: E402
from opendit.training.optim import build_optimizer  # noqa: E402
from opendit.training.step import StepBatch, train_step  # noqa: E402
from train_throughput import device_name, peak_tflops, sync  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--image_size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best of each is kept")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    latent = args.image_size // 8
    torch.manual_seed(0)
    model = DiT_models[args.model](input_size=latent, in_channels=4, num_classes=1000).to(device)
    env = DistEnv(device=device)
    train_model = parallelize_dit(model, ModelOptions(attention="flash" if cuda else "sdpa", compile=args.compile), env)
    opt = build_optimizer(model, 1e-4, device, impl="fused")
    ema = EMA(model)
    precision = Precision("bf16" if cuda else "fp32", device)
    diffusion = create_diffusion("")
    g = torch.Generator().manual_seed(0)
    n = args.batch
    batch = StepBatch(torch.randn(n, 4, latent, latent, generator=g).to(device),
                      torch.randint(0, 1000, (n,), generator=g).to(device),
                      torch.randint(0, 1000, (n,), generator=g).to(device), torch.zeros(n, dtype=torch.bool).to(device),
                      torch.randn(n, 4, latent, latent, generator=g).to(device))

    def run(on_device: bool, steps: int) -> float:
        results = []
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            r = train_step(train_model, model, opt, diffusion, batch, lr=1e-4, grad_clip=1.0, precision=precision,
                           ema=ema, ema_decay=0.9999, env=env, on_device=on_device)
            if results:  # the loop reads the previous step's flags (the host guard has read its own already)
                results[-1].updated
            results.append(r)
        results[-1].updated
        sync(device)
        return (time.perf_counter() - t0) / steps

    best = {}
    run(False, args.warmup)
    run(True, args.warmup)
    for _ in range(args.repeats):
        for name, on_device in (("host guard (sync per step)", False), ("device guard (sync-free)", True)):
            best[name] = min(best.get(name, float("inf")), run(on_device, args.steps))
    flops = dit_train_flops_per_image(model.config) * n
    peak = peak_tflops(device)
    print(f"{args.model} @{args.image_size}, batch {n}, {'bf16' if cuda else 'fp32'}, fused AdamW, "
          f"{'compiled blocks, ' if args.compile else ''}{device_name(device)}, torch {torch.__version__}; "
          f"{args.steps} steps x best of {args.repeats}")
    print("| step guard | s/step | img/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    for name, s in best.items():
        tf = flops / s / 1e12
        print(f"| {name} | {s:.4f} | {n / s:.1f} | {tf:.2f} | {f'{tf / peak:.1%}' if peak else 'n/a'} |")
    host, dev = best.values()
    print(f"sync-free / host guard step time: {dev / host:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
