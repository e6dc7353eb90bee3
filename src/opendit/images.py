"""Image grids: samples laid out one row per class, each row labelled with its class name."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 (C = 1 or 3)."""
    return to_uint8_tensor(x).cpu().numpy()


def to_uint8_tensor(x: torch.Tensor) -> torch.Tensor:
    """``to_uint8`` on the tensor's own device: (N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def labelled_grid(images: torch.Tensor, labels, class_names, *, min_cell: int = 64, pad: int = 2) -> Image.Image:
    """One row per distinct label (in order of appearance), its images left to right, the class name on the left.
    Small images are scaled up (nearest) to at least ``min_cell`` pixels."""
    arr = to_uint8(images)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    labels = [int(v) for v in labels]
    rows: dict[int, list[np.ndarray]] = {}
    for a, lab in zip(arr, labels):
        rows.setdefault(lab, []).append(a)
    h, w = arr.shape[1:3]
    scale = max(1, -(-min_cell // max(h, w)))
    ch, cw = h * scale, w * scale
    font = ImageFont.load_default()
    names = [str(class_names[lab]) if lab < len(class_names) else str(lab) for lab in rows]
    text_w = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font) for n in names) + 8
    ncol = max(len(r) for r in rows.values())
    grid = Image.new("RGB", (int(text_w) + ncol * (cw + pad) + pad, len(rows) * (ch + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (lab, imgs) in enumerate(rows.items()):
        y = pad + i * (ch + pad)
        draw.text((4, y + ch // 2 - 5), names[i], fill=(0, 0, 0), font=font)
        for j, a in enumerate(imgs):
            cell = Image.fromarray(a).resize((cw, ch), Image.NEAREST)
            grid.paste(cell, (int(text_w) + pad + j * (cw + pad), y))
    return grid


def save_image_atomic(img: Image.Image, path: str) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp)
