"""Graceful stop on SIGTERM / SIGINT: the signal only sets a flag; the trainer checks it once per step (all ranks agree
through the step's flag all-reduce), finishes the step, writes a checkpoint and exits.

A second SIGINT (Ctrl-C twice) aborts at once. Data-loading worker processes ignore both signals (``ignore_in_worker``):
a scheduler that signals every process of the job must not kill the workers under the main process mid-step.
"""

from __future__ import annotations

import signal

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """``with StopRequest() as stop:`` (or ``install()`` / ``restore()``); ``stop.signum`` is the first signal received
    (0 if none)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        if not self.signum:
            self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        """0 after SIGTERM (a clean preemption: schedulers and torchrun treat it as success), 130 after SIGINT."""
        return 130 if self.signum == signal.SIGINT else 0

    def install(self) -> "StopRequest":
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before ``install``."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.restore()
        return False


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers leave SIGTERM / SIGINT to the main process (which shuts them down)."""
    for sig in HANDLED:
        signal.signal(sig, signal.SIG_IGN)
