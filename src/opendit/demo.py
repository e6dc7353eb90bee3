"""Offline smoke demo: train a nano DiT on scikit-learn's bundled 8x8 digits for a short while
(pixel space, the published recipe's loss, EMA), then draw one sample per class with
DPM-Solver++ and classifier-free guidance and write them as a PNG grid.

    python -m opendit.demo [--seconds 90] [--out outputs/demo]

The full trainer (scripts/dit/train.py) supersedes this once it lands; this stays a quick check
that the model and diffusion learn together.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from opendit.diffusion import create_diffusion
from opendit.models import DiT_models


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """(1797, 1, 8, 8) in [-1, 1] and (1797,) labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("error: the digits demo needs scikit-learn (pip install 'opendit[dev]')")
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return x, torch.from_numpy(digits.target.astype(np.int64))


def save_grid(x: torch.Tensor, path: str, scale: int = 8) -> None:
    """(N, 1, 8, 8) in [-1, 1] -> one row PNG, each digit scaled up ``scale`` times."""
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]  # (N, 8, 8)
    row = torch.cat(list(img), dim=1).numpy()  # (8, N*8)
    Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=90.0, help="training time budget")
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--out", default="outputs/demo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    x_all, y_all = load_digits_tensor()
    model = DiT_models["DiT-N/2"](input_size=8, in_channels=1, num_classes=10)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    diffusion = create_diffusion("")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"DiT-N/2 on digits: {n_params / 1e6:.2f}M parameters, {len(x_all)} images, {args.seconds:.0f} s budget")

    step, t0, losses = 0, time.time(), []
    while time.time() - t0 < args.seconds:
        idx = torch.randint(0, len(x_all), (args.batch_size,))
        t = torch.randint(0, diffusion.num_timesteps, (args.batch_size,))
        loss = diffusion.training_losses(model, x_all[idx], t, dict(y=y_all[idx]))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - 0.995)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            print(f"step {step:5d}  loss {np.mean(losses[-100:]):.4f}  ({time.time() - t0:.0f} s)")

    ema.eval()
    labels = torch.arange(10)
    z = torch.randn(10, 1, 8, 8)
    samples = diffusion.dpm_solver_sample_loop(
        ema.forward_with_cfg,
        (20, 1, 8, 8),
        noise=torch.cat([z, z]),
        model_kwargs=dict(y=torch.cat([labels, torch.full_like(labels, 10)]), cfg_scale=1.5),
        num_steps=20,
    )[:10]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "samples.png")
    save_grid(samples, path)
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    print(f"{step} steps; loss {first:.3f} -> {last:.3f}; samples of classes 0..9 written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
