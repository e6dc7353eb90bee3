"""Sample many images (PNGs + ADM .npz) on N processes: see --help, opendit/config/sample.py (the settings) and opendit/sampling/folder.py."""

import os
import sys

try:
    import opendit  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from opendit.cli.sample_ddp import main

if __name__ == "__main__":
    sys.exit(main())
