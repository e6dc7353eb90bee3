"""Frozen encoders whose patch features representation alignment (REPA) aligns a DiT's tokens to.

An encoder maps images in [-1, 1], (N, C, S, S), to features (N, T, D) on a square grid (T = g * g, row-major), and
has ``name`` and ``feature_dim``. The names ``--repa_encoder`` takes (comma-separated for several):

    dinov2-vit-s, dinov2-vit-b, dinov2-vit-l, dinov2-vit-g   DINOv2 (REPA's choice: dinov2-vit-b); "-reg" suffix: the
                                                             variants with 4 register tokens. As in REPA's training
                                                             (train.py preprocess_raw_image, utils.py load_encoders):
                                                             images ImageNet-normalized, then resized bicubically to
                                                             14 g px, g = round(S / 16) (224 for 256 px, 448 for 512);
                                                             the position table resampled once to g x g (timm's
                                                             antialiased bicubic); features: the normalized patch
                                                             tokens (x_norm_patchtokens)
    digits                                                   the project's digits classifier (8x8 gray images): its
                                                             4 x 4 x 64 feature map before the dense layers
    package.module:factory                                   any callable ``factory()`` returning such an encoder

When the encoder's grid differs from the DiT's token grid, features are resized to it (``match_grid``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..hub import import_factory

DINOV2_NAMES = tuple(f"dinov2-vit-{s}{r}" for s in "sblg" for r in ("", "-reg"))
ENCODER_NAMES = (*DINOV2_NAMES, "digits")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_specs(spec: str | None) -> list[str]:
    """``--repa_encoder`` as a list of encoder names ([] for none)."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return []
    names = [s.strip() for s in spec.split(",")]
    for name in names:
        if name not in ENCODER_NAMES and ":" not in name:
            raise UserError(f"unknown --repa_encoder {name!r}; choose from {', '.join(ENCODER_NAMES)} or "
                            f"package.module:factory")
    if len(set(names)) != len(names):
        raise UserError(f"--repa_encoder {spec}: an encoder is named twice")
    return names


def dinov2_variant(name: str) -> tuple[str, int]:
    """(size, register tokens) of a ``dinov2-vit-...`` name."""
    return name[len("dinov2-vit-")], 4 if name.endswith("-reg") else 0


class DINOv2Encoder:
    """A (frozen) ``alignment.dinov2.DINOv2`` network with the preprocessing it expects. Its position table is
    resampled once to the alignment grid of ``image_size`` (or of the first images it sees), as REPA loads it; images
    of another size later go through DINOv2's own run-time interpolation of that table."""

    def __init__(self, name: str, net, device, image_size: int | None = None):
        self.name, self.net, self.feature_dim = name, net, net.dim
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.table_fixed = False
        if image_size is not None:
            self.fix_table(image_size)

    @staticmethod
    def grid(image_size: int) -> int:
        return max(1, round(image_size / 16))

    @classmethod
    def resolution(cls, image_size: int) -> int:
        return 14 * cls.grid(image_size)

    def fix_table(self, image_size: int) -> None:
        self.net.resample_position_table(self.grid(image_size))
        self.table_fixed = True

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.table_fixed:
            self.fix_table(images.shape[-1])
        x = (images.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        r = self.resolution(images.shape[-1])
        return self.net(F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False))


class DigitsEncoder:
    """The digits classifier's convolutional feature map: 16 tokens (4 x 4) of width 64."""

    name, feature_dim = "digits", 64

    def __init__(self, device):
        from ..eval.digits import load_classifier

        self.net = load_classifier().to(device).requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().mean(dim=1, keepdim=True)  # gray
        if x.shape[-2:] != (8, 8):
            x = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
        fmap = self.net.feature_map((x + 1) * 8.0)  # [-1, 1] -> the 0..16 scale of the real digits
        return fmap.flatten(2).transpose(1, 2)  # (N, 64, 4, 4) -> (N, 16, 64)


def load_factory(spec: str, device):
    enc = import_factory(spec, "--repa_encoder")()
    if not callable(enc) or not isinstance(getattr(enc, "feature_dim", None), int):
        raise UserError(f"--repa_encoder {spec}: the factory must return a callable with an integer feature_dim")
    if isinstance(enc, torch.nn.Module):
        enc = enc.to(device).eval().requires_grad_(False)
    return enc


def build_encoders(spec: str | None, weights: str | None, device, image_size: int | None = None) -> list:
    """The encoders of ``--repa_encoder`` (``weights``: ``--repa_encoder_weights``, one file per encoder in order,
    comma-separated; an empty entry: the default place) for images of ``image_size`` (None: the first batch's)."""
    names = parse_specs(spec)
    files = [w.strip() or None for w in weights.split(",")] if weights else []
    if len(files) > len(names):
        raise UserError(f"--repa_encoder_weights names {len(files)} files for {len(names)} encoder(s)")
    files += [None] * (len(names) - len(files))
    encoders = []
    for name, file in zip(names, files):
        if name in DINOV2_NAMES:
            from .dinov2 import load_dinov2

            net = load_dinov2(*dinov2_variant(name), file, device=device)
            encoders.append(DINOv2Encoder(name, net, device, image_size))
            continue
        if file is not None:
            raise UserError(f"--repa_encoder_weights: the encoder {name} takes no weights file")
        encoders.append(DigitsEncoder(device) if name == "digits" else load_factory(name, device))
    return encoders


def encode(encoders: list, images: torch.Tensor) -> list[torch.Tensor]:
    """Each encoder's features of ``images`` (fp32, no gradient), checked to lie on a square grid."""
    out = []
    for enc in encoders:
        with torch.no_grad():
            z = enc(images).float()
        if z.ndim != 3 or z.shape[0] != len(images) or math.isqrt(z.shape[1]) ** 2 != z.shape[1] \
                or z.shape[2] != enc.feature_dim:
            raise UserError(f"encoder {getattr(enc, 'name', enc)} returned features of shape {tuple(z.shape)}; "
                            f"expected (N, T, {enc.feature_dim}) with T a square number")
        out.append(z)
    return out


def match_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, T, D) features on a square grid -> (N, h * w, D) on the DiT's (h, w) token grid: bilinear when growing,
    the average over each token's area when shrinking. Unchanged when the grids agree."""
    n, t, d = features.shape
    h, w = grid
    if t == h * w and math.isqrt(t) == h:
        return features
    g = math.isqrt(t)
    fmap = features.transpose(1, 2).reshape(n, d, g, g)
    if h <= g and w <= g:  # shrinking: each token the average of the features it covers
        fmap = F.adaptive_avg_pool2d(fmap, (h, w))
    else:
        fmap = F.interpolate(fmap, size=(h, w), mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)
