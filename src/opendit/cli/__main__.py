"""``python -m opendit.cli ...`` is the ``opendit`` command too."""

import sys

from opendit.cli import main

if __name__ == "__main__":
    sys.exit(main())
