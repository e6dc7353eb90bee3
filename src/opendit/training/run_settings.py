"""What a training run is, and what a resume may change.

A run directory keeps the settings it was started with (``config.json``, never rewritten) and one line per session
in ``history.jsonl``: its command line, the checkpoint it resumed from, and the settings it changed. On resume, each
setting acts by the resume class its field declares (opendit.config.train; no list here):

- ``RUN`` (seed, model and its block options, AdamW's beta2, data set, image size, VAE, classes, objective and the
  flow's settings, REPA's encoders and projectors, and the global batch) come from the run; a different value on the
  command line is an error;
- ``CHANGE`` (learning rate and schedule, step budget, logging, checkpoint cadence, evaluation, precision, ...) come
  from the run unless given, and a given value that differs is applied and recorded;
- ``MACHINE`` (device, plugin, workers, kernels, compile, ...) describe this session's machine and are taken from
  this command line.
"""

from __future__ import annotations

import json
import os
import time

from ..config import CHANGE, RUN, TrainConfig
from ..errors import UserError

HISTORY_FILE = "history.jsonl"
# the global batch (per-process batch x processes) defines the run; the per-process batch is checked through it
DEFINING = tuple(k for k in TrainConfig.with_resume(RUN) if k != "batch_size")
CHANGEABLE = TrainConfig.with_resume(CHANGE)


def read_history(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, HISTORY_FILE)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
    return rows


def current_settings(config: dict | None, run_dir: str | None) -> dict | None:
    """The run's settings now: config.json with every later session's recorded changes applied in order."""
    if config is None:
        return None
    settings = dict(config)
    for row in read_history(run_dir) if run_dir else []:
        for key, (_, new) in (row.get("changes") or {}).items():
            if key in CHANGEABLE:
                settings[key] = new
    return settings


def append_history(run_dir: str, entry: dict) -> None:
    line = json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **entry})
    with open(os.path.join(run_dir, HISTORY_FILE), "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _differs(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) != float(b)
    return a != b


def apply_run_settings(cfg: TrainConfig, given: set[str] | None, saved: dict, world_size: int,
                       run_dir: str) -> dict:
    """Make ``cfg`` continue the run whose settings are ``saved`` (see the module doc); returns the changes, flag ->
    [the run's value, this command line's], of the given settings that differ. ``given`` None means every flag was
    given (nothing is inherited). Raises a one-line UserError for a defining setting that differs."""
    given = set(cfg.names()) if given is None else given

    def refuse(flag: str, ours, theirs) -> None:
        raise UserError(f"--{flag} {ours}: the run in {run_dir} was started with --{flag} {theirs}; resume without "
                        f"it (the run's value is used) or start a new run")

    for key in DEFINING:
        if key not in saved:
            continue
        want = saved["vae_resolved"] if key == "vae" and "vae_resolved" in saved else saved[key]
        if key not in given:
            cfg.set(key, "none" if key == "vae" and want is None else want)
        elif key == "vae":
            pass  # compared once the image size is known (train.py: the resolved VAE against the run's)
        elif _differs(cfg.get(key), want):
            refuse(key, cfg.get(key), want)

    if "global_batch" in saved:
        batch = int(saved["global_batch"])
        if batch % world_size:
            raise UserError(f"the run in {run_dir} has a global batch of {batch}, which {world_size} processes cannot "
                            f"share evenly; resume on a number of processes that divides it")
        if "batch_size" not in given:
            cfg.optim.batch_size = batch // world_size
        elif cfg.optim.batch_size * world_size != batch:
            raise UserError(f"--batch_size {cfg.optim.batch_size} on {world_size} process(es) is a global batch of "
                            f"{cfg.optim.batch_size * world_size}; the run in {run_dir} has a global batch of {batch}; "
                            f"use --batch_size {batch // world_size} (or drop it)")

    changes = {}
    for key in CHANGEABLE:
        if key not in saved:
            continue
        if key not in given:
            cfg.set(key, saved[key])
        elif _differs(cfg.get(key), saved[key]):
            changes[key] = [saved[key], cfg.get(key)]
    return changes


def describe_changes(changes: dict) -> str:
    return ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in changes.items())


def saved_settings(load: str) -> tuple[str, dict]:
    """(run directory, its current settings) for ``--load PATH`` (a run or checkpoint directory). A run without
    config.json still has its seed and global batch in each checkpoint's running_states.json."""
    from .. import checkpoint as ckpt

    if not os.path.exists(load):
        raise UserError(f"--load {load}: no such file or directory")
    path = os.path.abspath(load)
    run_dir = os.path.dirname(path) if ckpt.is_checkpoint_dir(path) else path
    settings = current_settings(ckpt.read_run_config(run_dir), run_dir) or {}
    newest = path if ckpt.is_checkpoint_dir(path) else (ckpt.list_checkpoints(run_dir) or [None])[-1]
    if newest is not None:
        try:
            with open(os.path.join(newest, ckpt.STATE_FILE)) as f:
                rs = json.load(f)
            for key in ("global_seed", "global_batch"):
                if key in rs:
                    settings.setdefault(key, rs[key])
        except (OSError, json.JSONDecodeError, TypeError):
            pass  # a damaged checkpoint: reported when it is loaded
    return run_dir, settings
