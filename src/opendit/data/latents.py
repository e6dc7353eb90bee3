"""Precomputed VAE latents (``--dataset latents``), written by scripts/dit/extract_features.py.

For every image the extractor stores the VAE posterior q(z | x) of the image *and* of its horizontal flip, as mean and
standard deviation (unscaled). Training then draws a fresh posterior sample every time (mean + std * eps, with eps from
the step's generator, exactly as with the VAE in the loop) and takes the flipped or unflipped posterior as the batch plan
says, so an epoch over latents is statistically the same as an epoch over images, without the VAE's cost.

    DIR/index.json                         format, VAE, scaling factor, image size, latent shape, classes, shards,
                                           latent_stats: per-channel mean and std of the latents (for --latent_norm)
    DIR/<shard>.mean.npy, <shard>.std.npy  (n, 2, C, h, w) float16/float32: [unflipped, flipped]
    DIR/<shard>.label.npy, <shard>.index.npy   (n,) int64: class, position in the source data set
    DIR/<shard>.repa-<k>.npy               optional (n, 2, T, d): encoder k's features of the image and of its flip
                                           (``extract_features.py --repa_encoder``; REPA then runs no encoder)

Shards are memory-mapped (several processes on a node share the page cache) and ordered by source position, so the data
set does not depend on how many processes extracted it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..errors import UserError

FORMAT = "opendit-latents-v1"
INDEX = "index.json"
PARTS = ("mean", "std", "label", "index")


def feature_parts(num_encoders: int) -> tuple[str, ...]:
    return tuple(f"repa-{k}" for k in range(num_encoders))


def shard_paths(root: str, shard: str, parts: tuple[str, ...] = PARTS) -> dict[str, str]:
    return {p: os.path.join(root, f"{shard}.{p}.npy") for p in parts}


class LatentDataset:
    """Posterior means and stds of a data set; ``batch(indices, flips)`` gives (B, 2C, h, w) float32 = [mean, std]."""

    def __init__(self, root: str):
        self.root = root
        path = os.path.join(root, INDEX)
        if not os.path.isfile(path):
            raise UserError(f"--dataset latents: {path} not found (write it with scripts/dit/extract_features.py)")
        try:
            with open(path) as f:
                self.meta = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is unreadable ({e})") from None
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{path}: not an opendit latents index (format {self.meta.get('format')!r})")
        encoders = self.meta.get("encoders") or []
        extra = feature_parts(len(encoders))
        means, stds, labels, order, feats = [], [], [], [], []
        for shard in self.meta["shards"]:
            files = shard_paths(root, shard["name"], PARTS + extra)
            try:
                arrays = {p: np.load(files[p], mmap_mode="r") for p in PARTS + extra}
            except (OSError, ValueError) as e:
                raise UserError(f"latents shard {shard['name']} in {root} is missing or unreadable ({e})") from None
            n = shard["count"]
            if any(len(a) != n for a in arrays.values()) or arrays["mean"].shape != arrays["std"].shape:
                raise UserError(f"latents shard {shard['name']} in {root} is truncated (index.json says {n} items)")
            if any(arrays[p].shape[1:] != (2, e["tokens"], e["dim"]) for p, e in zip(extra, encoders)):
                raise UserError(f"latents shard {shard['name']} in {root}: encoder features of the wrong shape")
            means.append(arrays["mean"]); stds.append(arrays["std"]); feats.append([arrays[p] for p in extra])
            labels.append(np.asarray(arrays["label"])); order.append(np.asarray(arrays["index"]))
        if not means:
            raise UserError(f"{path} lists no shards")
        self._means, self._stds, self._features = means, stds, feats
        # REPA: the encoders whose features are stored (None: none), and their widths
        self.encoder_names = [e["name"] for e in encoders] or None
        self.encoder_dims = [int(e["dim"]) for e in encoders]
        src = np.concatenate(order)
        # item i of the data set = (shard, row) of the i-th smallest source position
        shard_of = np.concatenate([np.full(len(o), k) for k, o in enumerate(order)])
        row_of = np.concatenate([np.arange(len(o)) for o in order])
        perm = np.argsort(src, kind="stable")
        if len(np.unique(src)) != len(src):
            raise UserError(f"{root}: the shards overlap (an image appears twice); re-extract into an empty folder")
        self._shard, self._row = shard_of[perm], row_of[perm]
        self.labels = torch.from_numpy(np.concatenate(labels)[perm]).long()
        self.class_names = list(self.meta["class_names"])
        self.num_classes = len(self.class_names)
        c, h, w = self.meta["latent_shape"]
        self.latent_channels, self.latent_size = c, h
        self.channels = 2 * c  # what batch() returns: mean and std
        self.image_size = self.meta["image_size"]
        self.scale = float(self.meta["scaling_factor"])
        self.vae = self.meta["vae"]
        self.stats = self.meta.get("latent_stats")  # {"mean": [C], "std": [C]} (unscaled) or None (older extractions)
        self.flip, self.name = True, "latents"

    def __len__(self) -> int:
        return len(self._shard)

    def batch(self, indices: torch.Tensor, flips: torch.Tensor):
        idx = indices.numpy()
        shard, row, side = self._shard[idx], self._row[idx], flips.numpy().astype(np.int64)
        c = self.latent_channels
        x = np.empty((len(idx), 2 * c, self.latent_size, self.latent_size), dtype=np.float32)
        for k in np.unique(shard):  # one fancy-indexed read per shard touched
            sel = shard == k
            x[sel, :c] = self._means[k][row[sel], side[sel]]
            x[sel, c:] = self._stds[k][row[sel], side[sel]]
        return torch.from_numpy(x), self.labels[indices]

    def batch_features(self, indices: torch.Tensor, flips: torch.Tensor) -> list[torch.Tensor]:
        """The stored encoder features of ``batch``'s images (flipped where it flips): one (B, T, d) float32 each."""
        idx = indices.numpy()
        shard, row, side = self._shard[idx], self._row[idx], flips.numpy().astype(np.int64)
        out = []
        for k, e in enumerate(self.meta["encoders"]):
            z = np.empty((len(idx), e["tokens"], e["dim"]), dtype=np.float32)
            for s in np.unique(shard):
                sel = shard == s
                z[sel] = self._features[s][k][row[sel], side[sel]]
            out.append(torch.from_numpy(z))
        return out


def latent_statistics(means: list[np.ndarray], stds: list[np.ndarray], chunk: int = 4096) -> dict:
    """Per-channel mean and std of the latents z = mean + std * eps of every stored image (unflipped), exactly (the
    mixture's moments: E z = E mean, E z^2 = E (mean^2 + std^2)), accumulated in float64 over shards of
    (n, 2, C, h, w) arrays."""
    total, s1, s2 = 0, 0.0, 0.0
    for m, sd in zip(means, stds):
        for lo in range(0, len(m), chunk):
            mu = np.asarray(m[lo:lo + chunk, 0], dtype=np.float64)  # (b, C, h, w)
            sg = np.asarray(sd[lo:lo + chunk, 0], dtype=np.float64)
            s1 = s1 + mu.sum(axis=(0, 2, 3))
            s2 = s2 + (mu * mu + sg * sg).sum(axis=(0, 2, 3))
            total += mu.shape[0] * mu.shape[2] * mu.shape[3]
    mean = s1 / total
    std = np.sqrt(np.maximum(s2 / total - mean * mean, 0.0))
    return {"mean": mean.tolist(), "std": std.tolist()}


class PrecomputedLatents:
    """The codec of a latents data set: ``encode`` turns a [mean, std] batch into a scaled posterior sample (``sample``:
    unscaled); ``decode`` (for sample grids) needs the VAE, loaded on first use."""

    def __init__(self, dataset: LatentDataset, device):
        self.dataset, self.device = dataset, device
        self.scale = dataset.scale
        self.latent_channels = dataset.latent_channels
        self.downsample = dataset.image_size // dataset.latent_size
        self.name = dataset.vae
        self._vae = None

    def sample(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """A posterior sample of a [mean, std] batch (the mean when ``eps`` is None), unscaled."""
        c = self.latent_channels
        mean, std = x[:, :c], x[:, c:]
        return mean if eps is None else mean + std * eps.to(mean.dtype)

    def encode(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        return self.sample(x, eps) * self.scale

    def vae(self):
        if self._vae is None:
            from ..vae import load_vae

            self._vae = load_vae(self.dataset.vae, self.device)
        return self._vae

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae().decode_unscaled(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae().decode(z)
