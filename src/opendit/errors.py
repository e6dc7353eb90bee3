"""User-facing errors: one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys


class UserError(Exception):
    """Something the user can fix (a path, a flag, a checkpoint). The message is shown as is."""


class RankError(UserError):
    """A UserError only this rank saw (e.g. an unreadable file in its share of the data): reported by the rank that
    raised it rather than by rank 0."""


class TrainingFailed(Exception):
    """The run cannot go on (e.g. too many non-finite steps in a row): one line on stderr, exit code 1, the run
    directory and its checkpoints kept."""


def reason(e: BaseException, limit: int = 160) -> str:
    """An exception's message for a one-line error: its first line, in whole sentences (as many as fit in ``limit``
    characters, at least the first), never cut in the middle of one."""
    text = (str(e).strip().splitlines() or [""])[0].strip() or type(e).__name__
    sentences = re.split(r"(?<=[.!?])\s+", text)
    out = sentences[0]
    for sentence in sentences[1:]:
        if len(out) + 1 + len(sentence) > limit:
            break
        out += " " + sentence
    return out.rstrip(".")


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def print_or_stop(*lines: str) -> bool:
    """Print ``lines`` to stdout; False when the reader has gone (``| head -n 1``): stdout is then pointed at /dev/null
    so that the interpreter's last flush raises nothing either. A closed pipe is the reader's choice, not an error."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return False


# ----------------------------------------------------------------------------- numeric flags
# argparse ``type=`` callables: a value outside the allowed range (or not finite) is rejected while the command line is
# parsed, before anything is written, as one line: "error: argument --lr: must be a finite number > 0, got nan".

def _range_text(lo, hi, lo_open: bool) -> str:
    lo, hi = (f"{v:g}" if isinstance(v, float) else v for v in (lo, hi))
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]" if not lo_open else f"in ({lo}, {hi}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


def _number_flag(convert, what: str, allowed):
    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not allowed(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    parse.__name__ = convert.__name__  # argparse names the type in its own messages
    return parse


def int_flag(lo: int | None = None, hi: int | None = None):
    """An integer flag in [lo, hi] (either bound optional)."""
    return _number_flag(int, f"an integer {_range_text(lo, hi, False)}".rstrip(),
                        lambda v: (lo is None or v >= lo) and (hi is None or v <= hi))


def float_flag(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """A finite float flag in [lo, hi] ((lo, hi] with ``lo_open``; either bound optional)."""
    return _number_flag(float, f"a finite number {_range_text(lo, hi, lo_open)}".rstrip(),
                        lambda v: math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo))
                        and (hi is None or v <= hi))


POSITIVE_INT = int_flag(1)
NONNEG_INT = int_flag(0)
SEED = int_flag(0, 2**32 - 1)  # what every use accepts (the data order seeds torch with seed * 1_000_003 + epoch)
POSITIVE_FLOAT = float_flag(0.0, lo_open=True)

NONNEG_FLOAT = float_flag(0.0)
UNIT_FLOAT = float_flag(0.0, 1.0)
NONNEG_FLOAT_OR_INF = _number_flag(float, "a number >= 0 or inf", lambda v: v >= 0)  # nan fails v >= 0


def POSITIVE_INT_OR_AUTO(text: str):  # noqa: N802 (a flag type, named like the others)
    """A positive integer, or the word auto (the program chooses)."""
    if text == "auto":
        return text
    try:
        return POSITIVE_INT(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or auto, got {text}") from None
