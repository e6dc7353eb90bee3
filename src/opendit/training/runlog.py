"""The run directory (``outputs/NNN-<model>``) and its log: log.txt and stdout, metrics.jsonl, TensorBoard scalars and
the periodic sample grids, and optionally the same in a Weights & Biases run (``--wandb``)."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError, reason


def new_run_dir(outputs: str, model_name: str) -> str:
    try:
        os.makedirs(outputs, exist_ok=True)
        taken = [int(m.group(1)) for d in os.listdir(outputs) if (m := re.match(r"^(\d{3,})-", d))]
        path = os.path.join(outputs, f"{(max(taken) + 1 if taken else 0):03d}-{model_name.replace('/', '-')}")
        os.makedirs(path)
    except OSError as e:
        raise UserError(f"--outputs {outputs}: cannot create a run directory ({e.strerror or e})") from None
    return path


WANDB_ID_FILE = "wandb-run-id"  # the W&B run of a run directory: a resumed run continues its curves


def check_wandb() -> None:
    """--wandb needs the wandb package: one line before anything is written when it is missing."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("--wandb needs the wandb package (pip install wandb, or pip install -e '.[wandb]')") from None


def start_wandb(run_dir: str, project: str, mode: str, config: dict | None):
    """A W&B run for ``run_dir`` (its files under run_dir/wandb/; the id kept in run_dir, so that a resumed run
    continues the same W&B run). ``mode``: online, offline, or auto (WANDB_MODE, else wandb's default: online)."""
    import wandb

    id_file = os.path.join(run_dir, WANDB_ID_FILE)
    if os.path.isfile(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(6)
        with open(id_file, "w") as f:
            f.write(run_id)
    try:
        return wandb.init(project=project, name=os.path.basename(os.path.abspath(run_dir)), id=run_id, resume="allow",
                          dir=run_dir, config=config, mode=None if mode == "auto" else mode,
                          settings=wandb.Settings(console="off"))  # stdout stays ours (log.txt has it)
    except Exception as e:  # not logged in, no network, a bad project name
        raise UserError(f"--wandb: cannot start a W&B run ({type(e).__name__}: {reason(e)}); log in with `wandb "
                        f"login`, or pass --wandb_mode offline (and `wandb sync` later)") from None


class RunLog:
    """log.txt + stdout, metrics.jsonl, TensorBoard scalars when tensorboard is installed, and a W&B run when given
    (rank 0 only)."""

    def __init__(self, run_dir: str | None, wandb_run=None):
        self.run_dir = run_dir
        self.tb = None
        self.wandb = wandb_run
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
        scalars = {f"train/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=step)

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image in TensorBoard (when installed), e.g. the sample grid of a periodic evaluation."""
        if self.run_dir is not None and self.tb is not None:
            self.tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self.run_dir is not None and self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image.convert("RGB"))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            wandb.teardown()  # waits until the run's file is written (finish may return before)
            self.wandb = None
