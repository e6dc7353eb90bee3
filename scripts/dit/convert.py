"""Convert DiT weights between opendit checkpoints, published .pt, .safetensors and diffusers (opendit convert)."""

import os
import sys

try:
    import opendit  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from opendit.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
