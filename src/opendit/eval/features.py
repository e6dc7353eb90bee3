"""Images to feature vectors for the metrics: the sources (.npz, image folders, the bundled digits, statistics
files) and the extractors (``inception``: the FID network; ``digits``: the project's digits classifier;
``package.module:factory``: any callable returning an object with ``num_features`` and
``__call__(uint8 (N, C, H, W) tensor) -> (features (N, D), logits (N, K) or None)``)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.datasets import IMAGE_EXTENSIONS
from ..errors import UserError, reason
from ..hub import import_factory


class ImageSource:
    """Images from an .npz (arr_0), a folder or the bundled digits; or precomputed statistics (mu, sigma)."""

    def __init__(self, path: str, role: str):
        self.path, self.role = path, role
        self.array: np.ndarray | None = None
        self.files: list[str] = []
        self.stats: dict | None = None
        if path == "digits" and not os.path.exists(path):  # scikit-learn's bundled real digits
            from .digits import real_digits

            images, _ = real_digits()
            self.array = np.round(images * 255.0 / 16.0).astype(np.uint8)[..., None]
        elif os.path.isdir(path):
            self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path, followlinks=True) for f in fs
                                if f.lower().endswith(IMAGE_EXTENSIONS))
            if not self.files:
                raise UserError(f"{role} {path}: no image files in this folder")
        elif os.path.isfile(path):
            self._load_npz(path)
        else:
            raise UserError(f"{role} {path}: no such file or directory")

    @classmethod
    def from_array(cls, array: np.ndarray, role: str) -> "ImageSource":
        """Images already in memory: uint8 (N, H, W, C)."""
        src = cls.__new__(cls)
        src.path, src.role, src.array, src.files, src.stats = "<memory>", role, array, [], None
        return src

    def _load_npz(self, path: str) -> None:
        try:
            with np.load(path, allow_pickle=False) as d:
                keys = set(d.files)
                if {"mu", "sigma"} <= keys:
                    self.stats = {"mu": d["mu"].astype(np.float64), "sigma": d["sigma"].astype(np.float64),
                                  "n": int(d["n"]) if "n" in keys else None,
                                  "features": str(d["features"]) if "features" in keys else None}
                if "arr_0" in keys:
                    self.array = d["arr_0"]
        except (OSError, ValueError, EOFError) as e:
            raise UserError(f"{self.role} {path}: not a readable .npz ({reason(e)})") from None
        if self.array is None and self.stats is None:
            raise UserError(f"{self.role} {path}: the .npz has neither arr_0 (images) nor mu/sigma (statistics)")
        if self.array is not None:
            a = self.array
            if a.ndim == 3:
                a = a[..., None]
            if a.ndim != 4 or a.shape[-1] not in (1, 3) or a.dtype != np.uint8:
                raise UserError(f"{self.role} {path}: arr_0 must be uint8 N x H x W x C (C = 1 or 3), got "
                                f"{a.dtype} {a.shape}")
            self.array = a

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.files)

    @property
    def has_images(self) -> bool:
        return self.array is not None or bool(self.files)

    def batches(self, batch_size: int):
        """uint8 (B, C, H, W) tensors; a folder's images of different sizes come in separate batches."""
        if self.array is not None:
            for i in range(0, len(self.array), batch_size):
                yield torch.from_numpy(np.ascontiguousarray(self.array[i:i + batch_size])).permute(0, 3, 1, 2)
            return
        for i in range(0, len(self.files), batch_size):
            group: list[np.ndarray] = []
            for f in self.files[i:i + batch_size]:
                try:
                    with Image.open(f) as im:
                        arr = np.asarray(im.convert("RGB"))
                except Exception as e:
                    raise UserError(f"{self.role} image {f} is unreadable ({' '.join(str(e).split())[:120]})") from None
                if group and arr.shape != group[0].shape:
                    yield torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2)
                    group = []
                group.append(arr)
            if group:
                yield torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2)


class InceptionExtractor:
    """pool3 features (2048) and bias-free logits (1008) of the FID Inception network."""

    name = "inception"
    num_features = 2048

    def __init__(self, weights: str | None, device):
        from .inception import load_fid_inception

        self.device = device
        self.net = load_fid_inception(weights, device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor):
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images.to(self.device))


class DigitsExtractor:
    """The 128-d penultimate features and 10 logits of the project's digits classifier (8x8 gray images)."""

    name = "digits"
    num_features = 128

    def __init__(self, device):
        from .digits import load_classifier

        self.device = device
        self.net = load_classifier().to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor):
        if images.shape[-2:] != (8, 8):
            raise UserError(f"--features digits needs 8x8 images, got {tuple(images.shape[-2:])}")
        x = images.float().mean(dim=1, keepdim=True) * (16.0 / 255.0)  # the 0..16 scale of the real digits
        feats = self.net.features(x.to(self.device))
        return feats, self.net.fc2(feats)


def build_extractor(spec: str, inception: str | None, device):
    if spec == "inception":
        return InceptionExtractor(inception, device)
    if spec == "digits":
        return DigitsExtractor(device)
    if ":" in spec:
        ext = import_factory(spec, "--features")()
        if not callable(ext) or not isinstance(getattr(ext, "num_features", None), int):
            raise UserError(f"--features {spec}: the factory must return a callable with an integer num_features")
        return ext
    raise UserError(f"unknown --features {spec!r}; choose inception, digits or package.module:factory")


def extract(source: ImageSource, extractor, batch_size: int, desc: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features (N, D) float64, logits (N, K) or None) on the CPU."""
    feats, logits = [], []
    with tqdm(total=len(source), desc=desc, unit="img", disable=None) as bar:
        for batch in source.batches(batch_size):
            f, lg = extractor(batch)
            feats.append(f.double().cpu())
            if lg is not None:
                logits.append(lg.double().cpu())
            bar.update(len(batch))
    return torch.cat(feats), (torch.cat(logits) if logits else None)
