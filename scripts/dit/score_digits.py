"""Score generated digits from sample_ddp.py: classifier accuracy, pixel and feature Fréchet distances."""

import os
import sys

try:
    import opendit  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from opendit.cli.score_digits import main

if __name__ == "__main__":
    sys.exit(main())
