"""FID, Inception Score, KID and precision / recall of generated images against a reference.

    opendit eval samples/xl2.npz VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth
    opendit eval samples/demo.npz digits --features digits        # the bundled digits, the project's digits classifier
    python scripts/dit/evaluate.py samples/ folder_of_real_images/ --save_stats real_stats.npz

SAMPLES and REFERENCE are each an ``.npz`` (``arr_0``: N x H x W x C uint8, as sample_ddp.py and the ADM evaluation
suite write), a folder of images (searched recursively), or for the reference also a statistics file (``mu``,
``sigma``: an ADM reference batch or ``--save_stats`` output; used as is when the features match) or ``digits``. Each
of them and ``--inception`` may be on the Hugging Face Hub: ``hf://datasets/OWNER/NAME/FILE`` (a data set's file),
``hf://OWNER/NAME/FILE`` (a model's), a whole repository without /FILE; fetched into the Hub cache (offline: from it).

Features come from a pluggable extractor: ``inception`` (the FID network, opendit.eval.inception), ``digits`` (the
classifier of opendit.eval.digits), or ``package.module:factory`` (a callable returning an extractor: an object with
``num_features`` and ``__call__(uint8 (N, C, H, W) tensor) -> (features (N, D), logits (N, K) or None)``).
FID is the Fréchet distance of opendit.eval.frechet; IS and KID are torchmetrics' (InceptionScore,
KernelInceptionDistance) fed with those features. The last line printed is one JSON object with the metrics.
"""

from __future__ import annotations

import json
import sys

from ..errors import POSITIVE_INT, print_or_stop
from ..eval.scores import run_eval
from ..hf_hub import local_path
from .program import ArgumentParser, run_main


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


def report(args) -> int:
    fetched = dict(samples=local_path(args.samples, "SAMPLES"), reference=local_path(args.reference, "REFERENCE"),
                   inception=local_path(args.inception, "--inception"))  # hf:// addresses: their copies in the cache
    m = run_eval(**{**vars(args), **fetched})
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


def main(argv=None) -> int:
    return run_main(report, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
