"""Train a class-conditional DiT: see `python scripts/dit/train.py --help`, opendit/config/train.py (the settings),
opendit/cli/train.py (the program) and opendit/training/trainer.py (the training). scripts/dit/train_dit.py is this
file under the spec's second name (a link)."""

import os
import sys

try:
    import opendit  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from opendit.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
