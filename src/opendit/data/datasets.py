"""The labelled image datasets: scikit-learn's digits, CIFAR-10 (python release), and class-per-folder images.

Every dataset yields float32 images in [-1, 1], shape (C, image_size, image_size), and int64 labels. Random
horizontal flips are decided by the batch plan (see sampler.py), not here, so that a resumed or re-sharded run
sees exactly the same images.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_path
from ..errors import UserError
from .transforms import adm_center_crop, flip_where, resize_batch, to_unit_range

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class InMemoryImages:
    """Images held as one tensor (N, C, H, W): uint8 in [0, 255] or float in [-1, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, image_size: int, class_names, flip: bool, name: str):
        self.images, self.labels = images, labels.long()
        self.image_size, self.flip, self.name = image_size, flip, name
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.channels = images.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices: torch.Tensor, flips: torch.Tensor):
        x = self.images[indices]
        x = to_unit_range(x) if x.dtype == torch.uint8 else x.float()
        x = resize_batch(x, self.image_size)
        return flip_where(x, flips), self.labels[indices]


# ----------------------------------------------------------------------------- digits

def load_digits_dataset(image_size: int | None = None) -> InMemoryImages:
    """scikit-learn's bundled 8x8 digits: 1,797 images, 10 classes, 17 gray levels (0..16) mapped to [-1, 1].
    Digits are not mirrored (a flipped digit is another glyph)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise UserError("--dataset digits needs scikit-learn (pip install scikit-learn, or the 'dev' extra)") from e
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # (1797, 1, 8, 8)
    return InMemoryImages(x, torch.from_numpy(d.target), image_size=image_size or 8,
                          class_names=[str(i) for i in range(10)], flip=False, name="digits")


# ----------------------------------------------------------------------------- CIFAR-10

CIFAR10_URL = os.environ.get("OPENDIT_CIFAR10_URL", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """The CIFAR python release is a pickle of dicts of bytes, lists and numpy arrays. Allow exactly the
    globals needed to rebuild numpy arrays, so a tampered file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _load_cifar_batch(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"cannot read CIFAR-10 file {path}: {e}") from e


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar10(data_path: str, timeout: float = 20.0) -> None:
    """Download the python release into data_path, verify its MD5 and extract it (atomically)."""
    where = (f"get cifar-10-python.tar.gz from {CIFAR10_URL} and extract it into {data_path} "
             f"(it must hold {CIFAR10_DIR}/data_batch_1..5)")
    if os.environ.get("OPENDIT_OFFLINE"):
        raise UserError(f"CIFAR-10 is not in {os.path.join(data_path, CIFAR10_DIR)} and OPENDIT_OFFLINE is set; {where}")
    created = not os.path.isdir(data_path)
    os.makedirs(data_path, exist_ok=True)
    tar_path = os.path.join(data_path, "cifar-10-python.tar.gz")
    try:
        with atomic_path(tar_path, tmp=tar_path + ".part") as tmp:
            try:
                with urllib.request.urlopen(CIFAR10_URL, timeout=timeout) as r, open(tmp, "wb") as f:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
            except OSError as e:
                raise UserError(f"CIFAR-10 is not in {os.path.join(data_path, CIFAR10_DIR)} and could not be "
                                f"downloaded ({e}); {where}") from None
            if _md5(tmp) != CIFAR10_MD5:
                raise UserError(f"the downloaded CIFAR-10 archive fails its MD5 check ({CIFAR10_MD5}); try again")
    except UserError:
        if created and not os.listdir(data_path):  # leave no empty folder behind
            os.rmdir(data_path)
        raise
    with tarfile.open(tar_path, "r:gz") as tar:
        tar.extractall(data_path, filter="data")


def load_cifar10(data_path: str, image_size: int | None = None, train: bool = True, download: bool = True) -> InMemoryImages:
    """CIFAR-10 from ``data_path/cifar-10-batches-py`` (the python-pickle release): 50,000 training images
    (or the 10,000 test images), 32x32 RGB, 10 classes; randomly flipped in training."""
    root = os.path.join(data_path, CIFAR10_DIR)
    files = CIFAR10_TRAIN if train else ["test_batch"]
    if not all(os.path.exists(os.path.join(root, f)) for f in files):
        if not download:
            raise UserError(f"CIFAR-10 not found in {root}")
        download_cifar10(data_path)
    data, labels = [], []
    for name in files:
        b = _load_cifar_batch(os.path.join(root, name))
        try:
            arr = np.asarray(b[b"data"], dtype=np.uint8)
            labels.extend(int(v) for v in b[b"labels"])
        except (KeyError, TypeError) as e:
            raise UserError(f"{os.path.join(root, name)} is not a CIFAR-10 batch (missing {e})") from e
        if arr.ndim != 2 or arr.shape[1] != 3072:
            raise UserError(f"{os.path.join(root, name)}: expected rows of 3072 bytes, got shape {arr.shape}")
        data.append(arr)
    x = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))  # rows are R(1024) G(1024) B(1024)
    names = [f"class{i}" for i in range(10)]
    meta = os.path.join(root, "batches.meta")
    if os.path.exists(meta):
        m = _load_cifar_batch(meta)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in m.get(b"label_names", names)]
    y = torch.tensor(labels, dtype=torch.long)
    if len(y) != len(x) or (len(y) and (y.min() < 0 or y.max() >= len(names))):
        raise UserError(f"CIFAR-10 in {root}: labels do not match the images or the 10 classes")
    return InMemoryImages(x, y, image_size=image_size or 32, class_names=names, flip=train, name="cifar10")


# ----------------------------------------------------------------------------- image folders

class ImageFolder(torch.utils.data.Dataset):
    """Class-per-folder images (the ImageNet layout): ``root/<class>/<image>``; classes in sorted order.
    Each image is converted to RGB (grayscale, palette and RGBA alike) and ADM-center-cropped."""

    def __init__(self, root: str, image_size: int):
        if not os.path.isdir(root):
            raise UserError(f"image folder {root} does not exist")
        self.class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        if not self.class_names:
            raise UserError(f"{root} has no class sub-folders (expected root/<class>/<image files>)")
        self.samples = []
        for label, cls in enumerate(self.class_names):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), label))
        if not self.samples:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        self.labels = torch.tensor([s[1] for s in self.samples], dtype=torch.long)
        self.image_size, self.flip, self.name = image_size, True, "imagefolder"
        self.num_classes = len(self.class_names)
        self.channels = 3

    def __len__(self) -> int:
        return len(self.samples)

    # an unreadable file is replaced by the next readable image (so batches keep their size and a resumed run sees
    # the same data); after this many unreadable files in a row the slot is reported as fatal (label -1)
    MAX_SUBSTITUTES = 16

    def load(self, path: str) -> torch.Tensor:
        """One image file as (3, S, S) float32 in [-1, 1]; raises whatever PIL raises for a bad file."""
        with Image.open(path) as img:
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL's advice for palette images with transparency
            img = img.convert("RGB")
        img = adm_center_crop(img, self.image_size)
        return to_unit_range(torch.from_numpy(np.array(img)).permute(2, 0, 1))

    def __getitem__(self, key):
        """(image, label, problems): ``problems`` is "" or one "path: reason" line per unreadable file met for this
        slot (each replaced by the next file in the list)."""
        index, flip = key
        problems = []
        for attempt in range(self.MAX_SUBSTITUTES + 1):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                x = self.load(path)
                break
            except Exception as e:  # UnidentifiedImageError, truncated data (OSError), broken PNG (SyntaxError), ...
                reason = " ".join(str(e).split())[:200] or type(e).__name__
                problems.append(f"{path}: {reason}")
        else:
            x, label = torch.zeros(3, self.image_size, self.image_size), -1
        if flip:
            x = x.flip(-1)
        return x, label, "\n".join(problems)


def build_dataset(name: str, data_path: str, image_size: int | None):
    if name == "digits":
        return load_digits_dataset(image_size)
    if name == "cifar10":
        return load_cifar10(data_path, image_size)
    if name == "imagefolder":
        return ImageFolder(data_path, image_size or default_image_size(name))
    raise UserError(f"unknown dataset {name!r}; choose digits, cifar10 or imagefolder")


def default_image_size(name: str) -> int:
    """The --image_size used when none is given: the native size of the small sets, the spec's 256 otherwise."""
    return {"digits": 8}.get(name, 256)


__all__ = ["ImageFolder", "InMemoryImages", "build_dataset", "default_image_size", "load_cifar10", "load_digits_dataset"]
