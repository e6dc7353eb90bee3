"""Encode a data set once with the VAE (posterior mean and std of each image and its flip) for --dataset latents."""

import os
import sys

try:
    import opendit  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from opendit.cli.extract_features import main

if __name__ == "__main__":
    sys.exit(main())
