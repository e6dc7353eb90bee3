"""The project's digits classifier: a quality check for DiTs trained on scikit-learn's 8x8 digits.

A small CNN trained by the project on the real digits (weights kept in opendit/assets/digits_cnn.safetensors, retrained
deterministically when absent) scores generated samples:
  - accuracy: does the classifier read the label the sample was generated for;
  - pixel FD: Fréchet distance to all 1,797 real digits in raw pixel space (64 values on the 0..16 scale);
  - feature FD: the same in the classifier's 128-d penultimate feature space.

    python scripts/dit/score_digits.py samples/demo.npz
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .frechet import frechet_distance_of

ASSET = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "digits_cnn.safetensors")
HELD_OUT = 297  # real digits kept out of the classifier's training, to report its accuracy


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 8, 8) on the 0..16 scale -> (N, 64, 4, 4): the convolutional features (REPA's ``digits`` encoder)."""
        x = F.relu(self.conv1(x / 16.0))
        return F.max_pool2d(F.relu(self.conv2(x)), 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 8, 8) on the 0..16 scale -> (N, 128)."""
        return F.relu(self.fc1(self.feature_map(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float64 on 0..16 and (1797,) labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise UserError("the digits score needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    return d.images.astype(np.float64), d.target.astype(np.int64)


def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(0).permutation(n)
    return perm[HELD_OUT:], perm[:HELD_OUT]


def train_classifier(epochs: int = 40) -> tuple[DigitsCNN, float]:
    """Deterministic: fixed seeds, fp32 on the CPU, one thread. Returns the model and its held-out accuracy."""
    images, labels = real_digits()
    tr, te = _split(len(images))
    x = torch.from_numpy(images).float()[:, None]
    y = torch.from_numpy(labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(epochs):
            order = torch.from_numpy(tr)[torch.randperm(len(tr), generator=g)]
            for i in range(0, len(order), 64):
                idx = order[i:i + 64]
                xb = x[idx]
                # augmentation: shift by up to one pixel, so that slightly off-centre samples are still read
                dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    return model, acc


def load_classifier() -> DigitsCNN:
    from safetensors.torch import load_file, save_file

    model = DigitsCNN()
    if os.path.exists(ASSET):
        model.load_state_dict(load_file(ASSET))
        return model.eval()
    model, _ = train_classifier()
    try:
        os.makedirs(os.path.dirname(ASSET), exist_ok=True)
        save_file(model.state_dict(), ASSET)
    except OSError:
        pass  # a read-only install: keep the retrained model in memory
    return model.eval()


def score(images_u8: np.ndarray, labels: np.ndarray, classifier: DigitsCNN | None = None) -> dict:
    """images: (N, 8, 8) or (N, 8, 8, 1) uint8 (0..255, as in the .npz), labels (N,)."""
    imgs = np.asarray(images_u8)
    if imgs.ndim == 4:
        if imgs.shape[-1] != 1:
            imgs = imgs.mean(axis=-1)
        else:
            imgs = imgs[..., 0]
    if imgs.shape[1:] != (8, 8):
        raise UserError(f"the digits score needs 8x8 images, got {imgs.shape[1:]}")
    samples = imgs.astype(np.float64) * 16.0 / 255.0  # back to the 0..16 scale of the real digits
    real, _ = real_digits()
    clf = classifier or load_classifier()
    with torch.no_grad():
        s = torch.from_numpy(samples).float()[:, None]
        r = torch.from_numpy(real).float()[:, None]
        pred = clf(s).argmax(1).numpy()
        fs, fr = clf.features(s).double().numpy(), clf.features(r).double().numpy()
    return {
        "n": int(len(samples)),
        "accuracy": float((pred == np.asarray(labels)).mean()),
        "pixel_fd": frechet_distance_of(samples.reshape(len(samples), 64), real.reshape(len(real), 64)),
        "feature_fd": frechet_distance_of(fs, fr),
    }


def score_npz(path: str) -> dict:
    """``score`` of an ADM-format .npz (arr_0 images, arr_1 labels)."""
    try:
        with np.load(path) as d:
            images, labels = d["arr_0"], d["arr_1"]
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"cannot read {path} as an ADM .npz (arr_0 images, arr_1 labels): {e}") from None
    return score(images, labels)
