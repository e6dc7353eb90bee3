"""FID during training (``--eval_every``): rank 0 samples the EMA model and scores the samples."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import UserError
from ..images import labelled_grid, save_image_atomic, to_uint8
from ..sampling.generate import generate, quick_sampler
from .features import ImageSource, build_extractor, extract
from .scores import feature_stats, fid_from, save_stats


class PeriodicFID:
    """FID of EMA samples during training (rank 0): ``num_samples`` samples with labels i mod num_classes from fixed
    noise (the same at every evaluation), 20 model evaluations (DPM-Solver++ 20 steps, or Heun for a flow), against
    a reference computed once (or given). The
    samples are kept as ``run_dir/eval/step{S}.npz`` and the reference statistics as ``eval/reference_stats.npz``; a
    labelled grid of the first ``GRID_PER_CLASS`` samples of each class as ``eval/step{S}.png`` (also the
    ``grid`` attribute after a call, for TensorBoard)."""

    GRID_PER_CLASS = 8

    def __init__(self, *, features: str, inception: str | None, reference: str | None, dataset, run_dir: str,
                 num_samples: int, cfg_scale: float, seed: int, device, reference_images: int = 10_000,
                 batch_size: int = 64, class_names=None):
        self.class_names, self.grid = list(class_names) if class_names else None, None
        self.extractor = build_extractor(features, inception, device)
        self.name = getattr(self.extractor, "name", features)
        self.dir = os.path.join(run_dir, "eval")
        os.makedirs(self.dir, exist_ok=True)
        self.num_samples, self.cfg_scale, self.seed, self.batch_size = num_samples, cfg_scale, seed, batch_size
        cached = os.path.join(self.dir, "reference_stats.npz")
        if reference is not None:
            src = ImageSource(reference, "--eval_reference")
            self.stats = src.stats if src.stats is not None and not src.has_images else \
                feature_stats(extract(src, self.extractor, batch_size, "eval reference")[0], self.name)
        elif os.path.isfile(cached):  # a resumed run
            self.stats = ImageSource(cached, "reference").stats
        else:
            self.stats = feature_stats(self._training_features(dataset, reference_images), self.name)
            save_stats(cached, self.stats)

    def _training_features(self, dataset, limit: int) -> torch.Tensor:
        """Features of ``limit`` training images (a seeded random subset), unflipped, at the training resolution."""
        from ..data.latents import LatentDataset

        if isinstance(dataset, LatentDataset):
            raise UserError("--eval_every on precomputed latents needs --eval_reference (images or statistics)")
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))[:limit]
        feats = []
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            if hasattr(dataset, "batch"):
                x, _ = dataset.batch(idx, torch.zeros(len(idx), dtype=torch.bool))
            else:  # an image folder (an unreadable file gives the next image, as in training)
                x = torch.stack([dataset[(int(j), False)][0] for j in idx])
            feats.append(self.extractor(torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2))[0].double().cpu())
        return torch.cat(feats)

    @torch.no_grad()
    def __call__(self, step: int, model, space, *, num_classes: int, device, precision, objective=None) -> float:
        model.eval()
        g = torch.Generator(device=device).manual_seed(self.seed)
        labels = torch.arange(self.num_samples, device=device) % num_classes
        noise = torch.randn((self.num_samples, space.channels, *space.input_size), generator=g, device=device)
        images = []
        for i in range(0, self.num_samples, self.batch_size):
            with precision.autocast():
                out = generate(model, labels[i:i + self.batch_size], noise[i:i + self.batch_size],
                               cfg_scale=self.cfg_scale, clip_denoised=not space.latent, **quick_sampler(objective))
            images.append(to_uint8(space.to_images(out.float())))
        arr = np.concatenate(images)
        path = os.path.join(self.dir, f"step{step:07d}.npz")
        with atomic_path(path) as tmp:
            np.savez(tmp, arr_0=arr, arr_1=labels.cpu().numpy())
        self.grid = self._grid(arr, labels.cpu().numpy(), num_classes)
        save_image_atomic(self.grid, os.path.join(self.dir, f"step{step:07d}.png"))
        feats, _ = extract(ImageSource.from_array(arr, "samples"), self.extractor, self.batch_size, "eval samples")
        return fid_from(feats, reference_stats=self.stats)

    def _grid(self, arr: np.ndarray, labels: np.ndarray, num_classes: int):
        """The first GRID_PER_CLASS samples of each class (labels i mod classes: the first ones in order), one row
        per class."""
        keep = np.arange(min(len(arr), self.GRID_PER_CLASS * num_classes))
        order = keep[np.argsort(labels[keep], kind="stable")]
        images = torch.from_numpy(arr[order]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # back to [-1, 1], exactly
        return labelled_grid(images, labels[order].tolist(), self.class_names or [str(i) for i in range(num_classes)])
