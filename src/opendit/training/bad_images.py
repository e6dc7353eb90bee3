"""Unreadable image files met during training: skipped (the data set already put the next image in their place),
counted, and named once each in a warning; or the end of the run under ``--on_bad_image error``."""

from __future__ import annotations

import sys

import torch

from ..data import ImageFolder
from ..distributed import DistEnv, all_reduce_
from ..errors import RankError


class BadImages:
    def __init__(self, policy: str, env: DistEnv, log, earlier: int = 0):
        """``policy``: "skip" or "error"; ``earlier``: the count of earlier sessions (every rank's)."""
        self.policy, self.env, self.log, self.earlier = policy, env, log, earlier
        self.here = 0  # this rank, this session
        self.seen: set[str] = set()

    def note(self, problems: list[str], labels: torch.Tensor, step: int) -> None:
        """This rank's batch of ``step`` (1-based) met the unreadable files ``problems`` ("path: reason" each)."""
        first = problems[0]
        if self.policy == "error":
            raise RankError(f"unreadable image {first} (--on_bad_image error; 'skip' replaces such files by the "
                            f"next image and counts them)")
        if bool((labels < 0).any()):
            raise RankError(f"no readable image among {ImageFolder.MAX_SUBSTITUTES + 1} files in a row, starting "
                            f"with {first}; is --data_path right?")
        self.here += len(problems)
        for line in problems:
            path = line.split(": ", 1)[0]
            if path not in self.seen:
                self.seen.add(path)
                msg = f"warning: skipped unreadable image {line} (rank {self.env.rank}, step {step})"
                self.log.info(msg) if self.env.is_main else print(msg, file=sys.stderr)

    def total(self) -> int:
        """Every rank's count, all sessions. Collective: every rank calls it."""
        return self.earlier + int(all_reduce_(torch.tensor(float(self.here), device=self.env.device), self.env))
