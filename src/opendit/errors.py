"""User-facing errors: one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """Something the user can fix (a path, a flag, a checkpoint). The message is shown as is."""


class RankError(UserError):
    """A UserError only this rank saw (e.g. an unreadable file in its share of the data): reported by the rank that
    raised it rather than by rank 0."""


class TrainingFailed(Exception):
    """The run cannot go on (e.g. too many non-finite steps in a row): one line on stderr, exit code 1, the run
    directory and its checkpoints kept."""


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with bad command lines reported as one line (`error: ...`) and exit code 2, without the usage dump."""

    def error(self, message):
        fail(message)
