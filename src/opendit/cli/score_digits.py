"""Score generated digits with the project's digits classifier (opendit.eval.digits): accuracy, pixel FD, feature FD.

    python scripts/dit/score_digits.py samples/demo.npz
"""

from __future__ import annotations

import json
import sys

from ..errors import print_or_stop
from ..eval.digits import score_npz
from .program import ArgumentParser, run_main


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Score generated digits (an ADM-format .npz from sample_ddp.py).")
    p.add_argument("npz")
    return p


def report(args) -> int:
    m = score_npz(args.npz)
    print_or_stop(f"{args.npz}: {m['n']} samples  accuracy {m['accuracy']:.1%}  pixel FD {m['pixel_fd']:.2f}  "
                  f"feature FD {m['feature_fd']:.2f}", json.dumps(m))
    return 0


def main(argv=None) -> int:
    return run_main(report, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
