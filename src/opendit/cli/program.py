"""How every program (``opendit <command>``, ``scripts/dit/*.py``) ends: one line and an exit code, never a traceback.

    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)
        return run_main(body, args)
"""

from __future__ import annotations

import argparse
import os
import sys

from ..distributed import shutdown
from ..errors import RankError, TrainingFailed, UserError, fail


class ArgumentParser(argparse.ArgumentParser):
    """argparse with bad command lines reported as one line (`error: ...`) and exit code 2, without the usage dump."""

    def error(self, message):
        fail(message)


def run_main(fn, args) -> int:
    """Run a program's body ``fn(args)`` (its exit code) alone or under torchrun: a UserError is one line
    (``error: ...``) from global rank 0 (or from the rank that raised a RankError) and exit code 2; TrainingFailed is
    one line and exit code 1; Ctrl-C is 130. The process group, if any, is always shut down."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        return fn(args)
    except UserError as e:
        if rank0 or isinstance(e, RankError):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        shutdown()
