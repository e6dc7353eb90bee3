"""The metrics of generated images, on feature vectors: FID (one Fréchet distance, opendit.eval.frechet), Inception
Score and KID (torchmetrics' implementations, an optional dependency), improved precision / recall; and the
``opendit eval`` computation that puts sources, extractor and metrics together."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import UserError
from .features import ImageSource, build_extractor, extract
from .frechet import frechet_distance, mean_cov


class _Given(torch.nn.Module):
    """A 'feature extractor' for torchmetrics that passes precomputed features through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def _torchmetrics():
    try:
        from torchmetrics.image.inception import InceptionScore
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError:
        raise UserError("opendit eval needs torchmetrics: pip install 'opendit[eval]' (or pip install torchmetrics)") from None
    return InceptionScore, KernelInceptionDistance


def fid_from(samples: torch.Tensor, reference: torch.Tensor | None = None, reference_stats: dict | None = None) -> float:
    """FID between sample features (N, D) and reference features or statistics (``mu``, ``sigma``): the Fréchet
    distance of the two Gaussians (means and unbiased covariances, float64)."""
    mu, sigma = mean_cov(samples.double().numpy())
    if reference is not None:
        mu_r, sigma_r = mean_cov(reference.double().numpy())
    else:
        mu_r = np.asarray(reference_stats["mu"], dtype=np.float64)
        sigma_r = np.asarray(reference_stats["sigma"], dtype=np.float64)
        if mu_r.shape != (samples.shape[1],) or sigma_r.shape != (samples.shape[1],) * 2:
            raise UserError(f"the reference statistics have {mu_r.shape[0]} features; the samples' extractor gives "
                            f"{samples.shape[1]}")
    return frechet_distance(mu, sigma, mu_r, sigma_r)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` of exp(E_x KL(p(y|x) || p(y))), by torchmetrics (its split order is seeded)."""
    IS, _ = _torchmetrics()
    with warnings.catch_warnings():  # "features kept in memory", and std() of one split
        warnings.simplefilter("ignore", UserWarning)
        m = IS(feature=_Given(logits.shape[1]), splits=splits)
        m.update(logits.double())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mean, std = m.compute()
    return float(mean), float(std) if splits > 1 else 0.0


def kid(samples: torch.Tensor, reference: torch.Tensor, subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
    _, KID = _torchmetrics()
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
    with atomic_path(path) as tmp:
        np.savez(tmp, **stats)


# by other names inside run_eval, whose keyword arguments are the flags' names
kernel_inception_distance, improved_precision_recall, write_stats = kid, precision_recall, save_stats


def run_eval(samples: str, reference: str, *, features: str = "inception", inception: str | None = None,
             batch_size: int = 64, splits: int = 10, kid: bool = False, precision_recall: bool = False,
             save_stats: str | None = None, device: str = "auto") -> dict:
    """The metrics ``opendit eval`` prints, as a dict: FID (and IS, KID, precision / recall) of ``samples`` against
    ``reference``."""
    if save_stats and os.path.isdir(save_stats):
        raise UserError(f"--save_stats {save_stats} is a directory")
    if save_stats and reference.endswith(".npz") and os.path.isfile(reference):
        with np.load(reference, allow_pickle=False) as d:
            if "arr_0" not in d.files:
                raise UserError(f"--save_stats: the reference {reference} holds statistics already, not images")
    _torchmetrics()  # IS and KID
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible")
    sample_src = ImageSource(samples, "samples")
    if not sample_src.has_images:
        raise UserError(f"samples {samples}: holds statistics, not images")
    ref_src = ImageSource(reference, "reference")
    extractor = build_extractor(features, inception, dev)
    name = getattr(extractor, "name", features)
    need_images = kid or precision_recall
    use_stats = ref_src.stats is not None and not save_stats and not need_images
    if use_stats and ref_src.stats.get("features") not in (None, name):
        raise UserError(f"reference {reference} holds {ref_src.stats['features']} statistics, not {name}")
    if len(sample_src) < 2:
        raise UserError("FID needs at least 2 samples")
    s_feat, s_logits = extract(sample_src, extractor, batch_size, "samples")
    r_feat = None
    if not use_stats:
        r_feat, _ = extract(ref_src, extractor, batch_size, "reference")
        if save_stats:
            write_stats(save_stats, feature_stats(r_feat, name))
    out = {"fid": fid_from(s_feat, r_feat, ref_src.stats if use_stats else None)}
    if s_logits is not None:
        if len(s_logits) < splits:
            raise UserError(f"--splits {splits} exceeds the {len(s_logits)} samples")
        out["is"], out["is_std"] = inception_score(s_logits, splits)
    if need_images and r_feat is None:
        raise UserError("--kid and --precision_recall need reference images, not only statistics")
    if kid:
        out["kid"], out["kid_std"] = kernel_inception_distance(s_feat, r_feat)
    if precision_recall:
        out["precision"], out["recall"] = improved_precision_recall(s_feat, r_feat, device=dev)
    out.update(num_samples=len(sample_src),
               num_reference=len(ref_src) if r_feat is not None else ref_src.stats.get("n"), features=name)
    return out
