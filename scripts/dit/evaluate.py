"""FID / IS / KID of generated images against a reference (opendit eval)."""

import os
import sys

try:
    import opendit  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from opendit.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
