"""What a training run is, and what a resume may change.

A run directory keeps the settings it was started with (``config.json``, never rewritten) and one line per session
in ``history.jsonl``: its command line, the checkpoint it resumed from, and the settings it changed. On resume:

- settings that define the run (``DEFINING``: seed, model and its block options, AdamW's beta2 (the
  optimizer state keeps it), data set, image size, VAE, number of classes, objective
  and the flow's settings, REPA's encoders and projectors, and the global batch) come from the run; a different value
  on the command line is an error;
- settings that may change (``CHANGEABLE``: learning rate and schedule, step budget, logging, checkpoint cadence,
  evaluation, precision, ...) come from the run unless given, and a given value that differs is applied and recorded;
- the rest (``ENVIRONMENT``: device, plugin, workers, kernels, compile, ...) describe this session's machine and are
  taken from this command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..errors import UserError

HISTORY_FILE = "history.jsonl"

# the global batch (per-process batch x processes) defines the run too; it is handled on its own
DEFINING = ("model", "dataset", "image_size", "vae", "global_seed", "num_classes", "objective", "path_type",
            "prediction", "loss_weight", "train_eps", "sample_eps", "time_sampling", "time_mean", "time_std",
            "cosine_loss", "repa_encoder", "repa_depth", "repa_projector_dim", "use_rmsnorm", "use_swiglu", "use_rope",
            "use_qknorm", "wo_shift", "wo_pos_embed", "latent_norm", "latent_multiplier", "adam_beta2")
CHANGEABLE = ("lr", "lr_schedule", "warmup_steps", "max_steps", "epochs", "grad_clip", "ema_decay", "log_every",
              "ckpt_every", "ckpt_keep", "max_bad_steps", "on_bad_image", "eval_every", "eval_samples",
              "eval_cfg_scale", "eval_features", "eval_reference", "final_samples", "final_cfg_scale",
              "mixed_precision", "grad_reduce_dtype", "data_path", "repa_lambda")
_UNSET = object()


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the options that ``argv`` sets explicitly (argparse fills in a default only for a
    destination its namespace lacks, so a namespace pre-filled with a sentinel tells given from defaulted)."""
    blank = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != argparse.SUPPRESS})
    parsed = parser.parse_args(sys.argv[1:] if argv is None else argv, namespace=blank)
    return {k for k, v in vars(parsed).items() if v is not _UNSET}


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


def apply_run_settings(args: argparse.Namespace, given: set[str] | None, saved: dict, world_size: int,
                       run_dir: str) -> dict:
    """Make ``args`` continue the run whose settings are ``saved`` (see the module doc); returns the changes, flag ->
    [the run's value, this command line's], of the given settings that differ. ``given`` None means every flag was
    given (nothing is inherited). Raises a one-line UserError for a defining setting that differs."""
    given = set(vars(args)) if given is None else given

    def refuse(flag: str, ours, theirs) -> None:
        raise UserError(f"--{flag} {ours}: the run in {run_dir} was started with --{flag} {theirs}; resume without "
                        f"it (the run's value is used) or start a new run")

    for key in DEFINING:
        if key not in saved or not hasattr(args, key):
            continue
        want = saved["vae_resolved"] if key == "vae" and "vae_resolved" in saved else saved[key]
        if key not in given:
            setattr(args, key, "none" if key == "vae" and want is None else want)
        elif key == "vae":
            pass  # compared once the image size is known (train.py: the resolved VAE against the run's)
        elif _differs(getattr(args, key), want):
            refuse(key, getattr(args, key), want)

    if "global_batch" in saved:
        batch = int(saved["global_batch"])
        if batch % world_size:
            raise UserError(f"the run in {run_dir} has a global batch of {batch}, which {world_size} processes cannot "
                            f"share evenly; resume on a number of processes that divides it")
        if "batch_size" not in given:
            args.batch_size = batch // world_size
        elif args.batch_size * world_size != batch:
            raise UserError(f"--batch_size {args.batch_size} on {world_size} process(es) is a global batch of "
                            f"{args.batch_size * world_size}; the run in {run_dir} has a global batch of {batch}; "
                            f"use --batch_size {batch // world_size} (or drop it)")

    changes = {}
    for key in CHANGEABLE:
        if key not in saved or not hasattr(args, key):
            continue
        if key not in given:
            setattr(args, key, saved[key])
        elif _differs(getattr(args, key), saved[key]):
            changes[key] = [saved[key], getattr(args, key)]
    return changes


def describe_changes(changes: dict) -> str:
    return ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in changes.items())


def saved_settings(load: str) -> tuple[str, dict]:
    """(run directory, its current settings) for ``--load PATH`` (a run or checkpoint directory). A run without
    config.json still has its seed and global batch in each checkpoint's running_states.json."""
    from . import checkpoint as ckpt

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
