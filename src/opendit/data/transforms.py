"""Image preprocessing shared by the datasets."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """The ADM / DiT center crop: halve with a box filter while the short side is >= 2x the target,
    resize so that the short side equals ``size`` (bicubic), then crop the center square."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])


def to_unit_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return x_uint8.float() / 127.5 - 1.0


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size), bicubic (antialiased when shrinking), clamped to [-1, 1]."""
    if x.shape[-2:] == (size, size):
        return x
    if x.shape[-2] != x.shape[-1]:
        raise ValueError("resize_batch expects square images")
    y = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=size < x.shape[-1])
    return y.clamp(-1, 1)


def flip_where(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror (left-right) the images of a batch where ``flips`` is True."""
    if not bool(flips.any()):
        return x
    return torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
