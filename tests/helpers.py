"""Shared helpers for tests that run the command-line programs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "scripts", "dit", "train.py")

# A tiny, fast training configuration on the bundled digits (fp32, CPU).
TINY = ["--dataset", "digits", "--model", "DiT-N/2", "--mixed_precision", "fp32", "--device", "cpu", "--lr", "1e-3"]


def run(args, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OPENDIT_OFFLINE="1", HF_HUB_OFFLINE="1")
    env.update(env_extra or {})
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def run_train(*args, nproc: int = 1, env_extra=None, **kw):
    if nproc == 1:
        return run([sys.executable, TRAIN, *args], env_extra=env_extra, **kw)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return run([*torchrun, TRAIN, *args], env_extra={"OMP_NUM_THREADS": "1", **(env_extra or {})}, **kw)


def only_run_dir(outputs) -> str:
    dirs = [d for d in os.listdir(outputs) if not d.startswith(".")]
    assert len(dirs) == 1, dirs
    return os.path.join(outputs, dirs[0])


def read_metrics(run_dir) -> dict:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out.setdefault(row["step"], {}).update(row)  # evaluation rows add to the step's training row
    return out
