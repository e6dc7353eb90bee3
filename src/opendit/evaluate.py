"""FID, Inception Score, KID and precision / recall of generated images against a reference.

    opendit eval samples/xl2.npz VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth
    opendit eval samples/demo.npz digits --features digits        # the bundled digits, the project's digits classifier
    python scripts/dit/evaluate.py samples/ folder_of_real_images/ --save_stats real_stats.npz

SAMPLES and REFERENCE are each an ``.npz`` (``arr_0``: N x H x W x C uint8, as sample_ddp.py and the ADM evaluation
suite write), a folder of images (searched recursively), or for the reference also a statistics file (``mu``,
``sigma``: an ADM reference batch or ``--save_stats`` output; used as is when the features match) or ``digits``.

Features come from a pluggable extractor: ``inception`` (the FID network, opendit.inception), ``digits`` (the
classifier of opendit.digits_eval), or ``package.module:factory`` (a callable returning an extractor: an object with
``num_features`` and ``__call__(uint8 (N, C, H, W) tensor) -> (features (N, D), logits (N, K) or None)``).
The metric math is torchmetrics' (FrechetInceptionDistance, InceptionScore, KernelInceptionDistance) fed with those
features. The last line printed is one JSON object with the metrics.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data.datasets import IMAGE_EXTENSIONS
from .errors import POSITIVE_INT, ArgumentParser, UserError, print_or_stop
from .images import to_uint8
from .metrics import mean_cov
from .sample import generate


# ----------------------------------------------------------------------------- inputs

class ImageSource:
    """Images from an .npz (arr_0), a folder or the bundled digits; or precomputed statistics (mu, sigma)."""

    def __init__(self, path: str, role: str):
        self.path, self.role = path, role
        self.array: np.ndarray | None = None
        self.files: list[str] = []
        self.stats: dict | None = None
        if path == "digits" and not os.path.exists(path):  # scikit-learn's bundled real digits
            from .digits_eval import real_digits

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
            raise UserError(f"{self.role} {path}: not a readable .npz ({str(e).splitlines()[0][:120]})") from None
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


# ----------------------------------------------------------------------------- feature extractors

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
        from .digits_eval import load_classifier

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
        module, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"--features {spec}: cannot import it ({e})") from None
        ext = factory()
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


# ----------------------------------------------------------------------------- metrics (torchmetrics)

class _Given(torch.nn.Module):
    """A 'feature extractor' for torchmetrics that passes precomputed features through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def _torchmetrics():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError:
        raise UserError("opendit eval needs torchmetrics: pip install 'opendit[eval]' (or pip install torchmetrics)") from None
    return FrechetInceptionDistance, InceptionScore, KernelInceptionDistance


def fid_from(samples: torch.Tensor, reference: torch.Tensor | None = None, reference_stats: dict | None = None) -> float:
    """FID between sample features and reference features or statistics (mu, sigma), by torchmetrics."""
    FID, _, _ = _torchmetrics()
    m = FID(feature=_Given(samples.shape[1]), reset_real_features=False).double()
    if reference is not None:
        m.update(reference, real=True)
    else:  # statistics: set the metric's running sums so that its mean and covariance are exactly mu and sigma
        mu = torch.as_tensor(reference_stats["mu"], dtype=torch.float64)
        sigma = torch.as_tensor(reference_stats["sigma"], dtype=torch.float64)
        if mu.shape != (samples.shape[1],) or sigma.shape != (samples.shape[1],) * 2:
            raise UserError(f"the reference statistics have {mu.shape[0]} features; the samples' extractor gives "
                            f"{samples.shape[1]}")
        n = int(reference_stats.get("n") or 2)
        m.real_features_sum = mu * n
        m.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
        m.real_features_num_samples = torch.tensor(n)
    m.update(samples, real=False)
    return float(m.compute())


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` of exp(E_x KL(p(y|x) || p(y))), by torchmetrics (its split order is seeded)."""
    _, IS, _ = _torchmetrics()
    with warnings.catch_warnings():  # "features kept in memory", and std() of one split
        warnings.simplefilter("ignore", UserWarning)
        m = IS(feature=_Given(logits.shape[1]), splits=splits)
        m.update(logits.double())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mean, std = m.compute()
    return float(mean), float(std) if splits > 1 else 0.0


def kid(samples: torch.Tensor, reference: torch.Tensor, subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
    _, _, KID = _torchmetrics()
    size = min(subset_size, len(samples), len(reference))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m = KID(feature=_Given(samples.shape[1]), subsets=subsets, subset_size=size)
        m.update(reference.double(), real=True)
        m.update(samples.double(), real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mean, std = m.compute()
    return float(mean), float(std)


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # column 0 is the point itself
    return torch.cat(out)


def _covered(a: torch.Tensor, b: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of rows of a inside at least one ball (b_j, radii_j)."""
    hits = 0
    for i in range(0, len(a), chunk):
        hits += int((torch.cdist(a[i:i + chunk], b) <= radii[None]).any(dim=1).sum())
    return hits / len(a)


def precision_recall(samples: torch.Tensor, reference: torch.Tensor, k: int = 3, chunk: int = 1024,
                     device="cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019): each set's manifold is the union of balls reaching
    every feature's k-th nearest neighbour; precision = share of samples on the reference manifold, recall = share of
    reference features on the samples' manifold."""
    s, r = samples.to(device, torch.float64), reference.to(device, torch.float64)
    return _covered(s, r, _knn_radii(r, k, chunk), chunk), _covered(r, s, _knn_radii(s, k, chunk), chunk)


def feature_stats(features: torch.Tensor, extractor_name: str) -> dict:
    """What FID needs of a reference (and what --save_stats writes): mean, covariance, count, extractor name."""
    mu, sigma = mean_cov(features.numpy())
    return {"mu": mu, "sigma": sigma, "n": len(features), "features": extractor_name}


def save_stats(path: str, stats: dict) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **stats)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- command line

def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="FID / IS / KID of generated images against a reference.")
    p.add_argument("samples", help=".npz (arr_0) or a folder of images")
    p.add_argument("reference", help=".npz of images or of statistics (mu, sigma), a folder of images, or 'digits'")
    p.add_argument("--features", default="inception", help="inception, digits, or package.module:factory")
    p.add_argument("--inception", default=None,
                   help="the FID Inception weights file (default: the torch hub cache, downloaded when online)")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=64)
    p.add_argument("--splits", type=POSITIVE_INT, default=10, help="Inception Score splits")
    p.add_argument("--kid", action="store_true", help="also the Kernel Inception Distance (needs reference images)")
    p.add_argument("--precision_recall", action="store_true",
                   help="also improved precision / recall with k=3 (needs reference images; O(N^2) distances)")
    p.add_argument("--save_stats", default=None, help="write the reference's feature statistics to this .npz")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def run_eval(args) -> dict:
    if args.save_stats and os.path.isdir(args.save_stats):
        raise UserError(f"--save_stats {args.save_stats} is a directory")
    if args.save_stats and args.reference.endswith(".npz") and os.path.isfile(args.reference):
        with np.load(args.reference, allow_pickle=False) as d:
            if "arr_0" not in d.files:
                raise UserError(f"--save_stats: the reference {args.reference} holds statistics already, not images")
    _torchmetrics()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible")
    samples = ImageSource(args.samples, "samples")
    if not samples.has_images:
        raise UserError(f"samples {args.samples}: holds statistics, not images")
    reference = ImageSource(args.reference, "reference")
    extractor = build_extractor(args.features, args.inception, device)
    name = getattr(extractor, "name", args.features)
    need_images = args.kid or args.precision_recall
    use_stats = reference.stats is not None and not args.save_stats and not need_images
    if use_stats and reference.stats.get("features") not in (None, name):
        raise UserError(f"reference {args.reference} holds {reference.stats['features']} statistics, not {name}")
    if len(samples) < 2:
        raise UserError("FID needs at least 2 samples")
    s_feat, s_logits = extract(samples, extractor, args.batch_size, "samples")
    r_feat = None
    if not use_stats:
        r_feat, _ = extract(reference, extractor, args.batch_size, "reference")
        if args.save_stats:
            save_stats(args.save_stats, feature_stats(r_feat, name))
    out = {"fid": fid_from(s_feat, r_feat, reference.stats if use_stats else None)}
    if s_logits is not None:
        if len(s_logits) < args.splits:
            raise UserError(f"--splits {args.splits} exceeds the {len(s_logits)} samples")
        out["is"], out["is_std"] = inception_score(s_logits, args.splits)
    if need_images and r_feat is None:
        raise UserError("--kid and --precision_recall need reference images, not only statistics")
    if args.kid:
        out["kid"], out["kid_std"] = kid(s_feat, r_feat)
    if args.precision_recall:
        out["precision"], out["recall"] = precision_recall(s_feat, r_feat, device=device)
    out.update(num_samples=len(samples), num_reference=len(reference) if r_feat is not None else reference.stats.get("n"),
               features=name)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        m = run_eval(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ref = f"{m['num_reference']} images" if m["num_reference"] else "precomputed statistics"
    lines = [f"samples    {args.samples} ({m['num_samples']} images)", f"reference  {args.reference} ({ref})",
             f"features   {m['features']}", f"FID        {m['fid']:.4f}"]
    if "is" in m:
        lines.append(f"IS         {m['is']:.4f} ± {m['is_std']:.4f} ({args.splits} splits)")
    if "kid" in m:
        lines.append(f"KID        {m['kid']:.6f} ± {m['kid_std']:.6f}")
    if "precision" in m:
        lines.append(f"precision  {m['precision']:.4f}   recall {m['recall']:.4f}   (k = 3)")
    print_or_stop(*lines, json.dumps(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------- FID during training

class PeriodicFID:
    """FID of EMA samples during training (rank 0): ``num_samples`` samples with labels i mod num_classes from fixed
    noise (the same at every evaluation), DPM-Solver++ 20 steps, against a reference computed once (or given). The
    samples are kept as ``run_dir/eval/step{S}.npz`` and the reference statistics as ``eval/reference_stats.npz``."""

    def __init__(self, *, features: str, inception: str | None, reference: str | None, dataset, run_dir: str,
                 num_samples: int, cfg_scale: float, seed: int, device, reference_images: int = 10_000,
                 batch_size: int = 64):
        _torchmetrics()
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
        from .data.latents import LatentDataset

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
    def __call__(self, step: int, model, codec, *, num_classes: int, shape, device, precision) -> float:
        model.eval()
        g = torch.Generator(device=device).manual_seed(self.seed)
        labels = torch.arange(self.num_samples, device=device) % num_classes
        noise = torch.randn((self.num_samples, *shape), generator=g, device=device)
        images = []
        for i in range(0, self.num_samples, self.batch_size):
            with precision.autocast():
                out = generate(model, labels[i:i + self.batch_size], noise[i:i + self.batch_size], sampler="dpm-solver++",
                               steps=20, cfg_scale=self.cfg_scale, clip_denoised=codec is None)
            x = codec.decode(out.float()) if codec is not None else out.float().clamp(-1, 1)
            images.append(to_uint8(x))
        arr = np.concatenate(images)
        path = os.path.join(self.dir, f"step{step:07d}.npz")
        np.savez(path + ".tmp.npz", arr_0=arr, arr_1=labels.cpu().numpy())
        os.replace(path + ".tmp.npz", path)
        feats, _ = extract(ImageSource.from_array(arr, "samples"), self.extractor, self.batch_size, "eval samples")
        return fid_from(feats, reference_stats=self.stats)
