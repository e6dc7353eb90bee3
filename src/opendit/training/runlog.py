"""The run directory (``outputs/NNN-<model>``) and its log: log.txt and stdout, metrics.jsonl, TensorBoard scalars and
the periodic sample grids."""

from __future__ import annotations

import json
import math
import os
import re
import time

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError


def new_run_dir(outputs: str, model_name: str) -> str:
    try:
        os.makedirs(outputs, exist_ok=True)
        taken = [int(m.group(1)) for d in os.listdir(outputs) if (m := re.match(r"^(\d{3,})-", d))]
        path = os.path.join(outputs, f"{(max(taken) + 1 if taken else 0):03d}-{model_name.replace('/', '-')}")
        os.makedirs(path)
    except OSError as e:
        raise UserError(f"--outputs {outputs}: cannot create a run directory ({e.strerror or e})") from None
    return path


class RunLog:
    """log.txt + stdout, metrics.jsonl, and TensorBoard scalars when tensorboard is installed (rank 0 only)."""

    def __init__(self, run_dir: str | None):
        self.run_dir = run_dir
        self.tb = None
        if run_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def info(self, msg: str) -> None:
        if self.run_dir is None:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        tqdm.write(line)
        with open(os.path.join(self.run_dir, "log.txt"), "a") as f:
            f.write(line + "\n")

    def metrics(self, step: int, values: dict) -> None:
        if self.run_dir is None:
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image in TensorBoard (when installed), e.g. the sample grid of a periodic evaluation."""
        if self.run_dir is not None and self.tb is not None:
            self.tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
