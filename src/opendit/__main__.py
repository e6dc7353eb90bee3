"""``python -m opendit ...`` is the ``opendit`` command."""

import sys

from opendit.cli import main

if __name__ == "__main__":
    sys.exit(main())
