"""What REPA costs per training step: the step without REPA, with REPA on precomputed encoder features (the projector
only), and with the encoder in the loop, interleaved in one run (best of --repeats rounds).

    python benchmarks/repa_cost.py                                   # the digits budget: DiT-N/2, batch 128, CPU fp32
    python benchmarks/repa_cost.py --model DiT-XL/2 --image_size 256 --batch_size 64 --encoder dinov2-vit-b \\
        --device cuda --precision bf16                               # published setting (random DINOv2 weights:
                                                                     # the timing needs no download)

The step is opendit.training.step.train_step (forward, loss, backward, clip, AdamW, EMA) on random latents / pixels
of the model's input shape; the encoder gets images of the data's size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from opendit.alignment import RepaLoss, attach_projectors, encode  # noqa: E402
from opendit.alignment import dinov2  # noqa: E402
from opendit.alignment.encoders import DigitsEncoder, DINOv2Encoder, dinov2_variant  # noqa: E402
from opendit.diffusion import create_diffusion  # noqa: E402
from opendit.distributed import DistEnv  # noqa: E402
from opendit.models import DiT_models  # noqa: E402
from opendit.precision import Precision  # noqa: E402
from opendit.training.ema import EMA  # noqa: E402
from opendit.training.optim import build_optimizer  # noqa: E402
from opendit.training.step import StepBatch, train_step  # noqa: E402


def random_dinov2(name: str, device):
    """A DINOv2 encoder of the released shape with random weights (timing only)."""
    net = dinov2.DINOv2(*dinov2_variant(name)).eval().requires_grad_(False).to(device)
    return DINOv2Encoder(name, net, device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="DiT-N/2")
    ap.add_argument("--image_size", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--encoder", default="digits", help="digits or dinov2-vit-s/b/l/g")
    ap.add_argument("--repa_depth", type=int, default=2)
    ap.add_argument("--projector_dim", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    latent = args.image_size > 64
    channels, side = (4, args.image_size // 8) if latent else ((1 if args.encoder == "digits" else 3), args.image_size)
    precision = Precision(args.precision, device)
    encoder = DigitsEncoder(device) if args.encoder == "digits" else random_dinov2(args.encoder, device)
    g = torch.Generator(device=device).manual_seed(0)
    n = args.batch_size
    x = torch.randn(n, channels, side, side, generator=g, device=device)
    images = torch.rand(n, 1 if args.encoder == "digits" else 3, args.image_size, args.image_size, generator=g,
                        device=device) * 2 - 1
    y = torch.randint(0, 10, (n,), generator=g, device=device)
    diffusion = create_diffusion("")

    def setup(repa: bool):
        torch.manual_seed(0)
        model = DiT_models[args.model](input_size=side, in_channels=channels, num_classes=10).to(device)
        aux = ()
        if repa:
            proj = attach_projectors(model, [encoder.feature_dim], args.projector_dim, seed=1)
            aux = (RepaLoss(proj, args.repa_depth, 0.5, model.x_embedder.grid_size),)
        opt = build_optimizer(model, 1e-4, device)
        return model, opt, EMA(model), aux

    configs = {"no REPA": (False, False), "REPA, stored features": (True, False), "REPA, encoder in the loop": (True, True)}
    states = {k: setup(repa) for k, (repa, _) in configs.items()}
    stored = encode([encoder], images)

    def step(name: str) -> None:
        model, opt, ema, aux = states[name]
        in_loop = configs[name][1]
        feats = None
        if configs[name][0]:
            if in_loop:
                with precision.autocast():
                    feats = encode([encoder], images)
            else:
                feats = stored
        t = torch.randint(0, 1000, (n,), generator=g, device=device)
        batch = StepBatch(x, y, t, None, torch.randn(x.shape, generator=g, device=device), feats)
        train_step(model, model, opt, diffusion, batch, lr=1e-4, grad_clip=1.0, precision=precision, ema=ema,
                   ema_decay=0.999, env=DistEnv(), aux_losses=aux)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    best = {k: float("inf") for k in configs}
    for name in configs:  # warm-up
        for _ in range(3):
            step(name)
    for _ in range(args.repeats):
        for name in configs:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            sync()
            best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} @{args.image_size}, batch {n}, {args.precision}, encoder {args.encoder}, depth "
          f"{args.repa_depth}, projector {args.projector_dim}, {dev}, torch {torch.__version__}")
    base = best["no REPA"]
    for name, s in best.items():
        print(f"| {name} | {s * 1e3:.1f} ms | {s / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
