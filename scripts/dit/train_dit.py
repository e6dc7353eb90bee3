"""Train a class-conditional DiT: see `python scripts/dit/train.py --help`, opendit/train.py (the flags) and
opendit/training/trainer.py (the training)."""

import os
import sys

try:
    import opendit  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from opendit.train import main

if __name__ == "__main__":
    sys.exit(main())
