"""Fault injection for the reliability tests (never set in normal use).

``OPENDIT_FAULT`` is a comma-separated list of ``KIND@STEP`` or ``KIND@STEP:rankR``:

    nan_loss@3          the loss of global step 3 (1-based, the step being computed) becomes NaN
    sigterm@4:rank0     rank 0 sends itself SIGTERM during step 4
    kill_in_save@6      the process is SIGKILLed while writing the checkpoint of step 6 (after the weights file)
    crash@7:rank1       rank 1 dies (exit 1, no cleanup) during step 7 (on torchrun's first attempt only)

Without ``:rankR`` a fault fires on every rank.
"""

from __future__ import annotations

import functools
import os
import re
import signal

_SPEC = re.compile(r"^(nan_loss|sigterm|kill_in_save|crash)@(\d+)(?::rank(\d+))?$")


@functools.lru_cache(maxsize=4)  # asked several times per training step
def _parse(text: str) -> list[tuple[str, int, int | None]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = _SPEC.match(item)
        if not m:
            raise ValueError(f"OPENDIT_FAULT: cannot parse {item!r}")
        out.append((m.group(1), int(m.group(2)), None if m.group(3) is None else int(m.group(3))))
    return out


def armed(kind: str, step: int, rank: int | None = None) -> bool:
    """Whether fault ``kind`` is set for ``step`` on this rank (RANK from the environment when not given)."""
    text = os.environ.get("OPENDIT_FAULT")
    if not text:
        return False
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    return any(k == kind and s == step and r in (None, rank) for k, s, r in _parse(text))


def maybe_signal(step: int) -> None:
    if armed("sigterm", step):
        os.kill(os.getpid(), signal.SIGTERM)


def maybe_crash(step: int) -> None:
    if armed("crash", step) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os._exit(1)


def maybe_kill_in_save(step: int) -> None:
    if armed("kill_in_save", step):
        os.kill(os.getpid(), signal.SIGKILL)
