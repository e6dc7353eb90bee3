"""Shared helpers for tests that run the command-line programs.

``run`` / ``run_train`` run a program of scripts/dit/ (or ``python -m opendit``) *in this process* by calling its
``main(argv)`` with stdout and stderr captured, which is what the program does as a process minus Python's and torch's
start-up (seconds per run on a 2-core CPU). They run it as a real process when asked (``process=True``: the end-to-end
tests that prove the wiring), under torchrun, or when an injected fault kills or crashes the process.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "scripts", "dit", "train.py")

# A tiny, fast training configuration on the bundled digits (fp32, CPU).
TINY = ["--dataset", "digits", "--model", "DiT-N/2", "--mixed_precision", "fp32", "--device", "cpu", "--lr", "1e-3"]

# scripts/dit/<file> -> the module whose main(argv) it runs
SCRIPT_MODULES = {"train.py": "opendit.cli.train", "train_dit.py": "opendit.cli.train", "sample_dit.py": "opendit.cli.sample",
                  "sample_ddp.py": "opendit.cli.sample_ddp", "score_digits.py": "opendit.cli.score_digits",
                  "evaluate.py": "opendit.cli.evaluate", "extract_features.py": "opendit.cli.extract_features",
                  "convert.py": "opendit.cli.convert"}
PROCESS_ONLY_FAULTS = ("crash", "kill_in_save")  # they end the process they happen in


def _program(args):
    """(module, argv) when ``args`` is ``python scripts/dit/X.py ...`` or ``python -m opendit ...``, else None."""
    if len(args) < 2 or args[0] != sys.executable:
        return None
    if args[1] == "-m" and len(args) > 2 and args[2] in ("opendit", "opendit.cli"):
        return "opendit.cli", list(args[3:])
    if os.path.dirname(os.path.abspath(args[1])) == os.path.join(REPO, "scripts", "dit"):
        module = SCRIPT_MODULES.get(os.path.basename(args[1]))
        return (module, list(args[2:])) if module else None
    return None


def run_in_process(module: str, argv: list[str], env_extra=None) -> subprocess.CompletedProcess:
    env = {"OPENDIT_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    saved_env, cwd = {k: os.environ.get(k) for k in env}, os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env)
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = importlib.import_module(module).main(argv)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess([module, *argv], code, out.getvalue(), err.getvalue())


def run(args, env_extra=None, timeout=300, process=False):
    fault = (env_extra or {}).get("OPENDIT_FAULT", "")
    target = None if process or any(k in fault for k in PROCESS_ONLY_FAULTS) else _program(args)
    if target is not None:
        return run_in_process(*target, env_extra=env_extra)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OPENDIT_OFFLINE="1", HF_HUB_OFFLINE="1")
    env.update(env_extra or {})
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def run_train(*args, nproc: int = 1, env_extra=None, process=False, **kw):
    if nproc == 1:
        return run([sys.executable, TRAIN, *args], env_extra=env_extra, process=process, **kw)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return run([*torchrun, TRAIN, *args], env_extra={"OMP_NUM_THREADS": "1", **(env_extra or {})}, **kw)


def only_run_dir(outputs) -> str:
    dirs = [d for d in os.listdir(outputs) if not d.startswith(".")]
    assert len(dirs) == 1, dirs
    return os.path.join(outputs, dirs[0])


def run_cut_at_first_checkpoint(run_dir, tmp_path) -> str:
    """A copy of a finished run holding only its first checkpoint and config.json (what an interrupted run leaves),
    to resume and compare with the uninterrupted run."""
    import shutil

    from opendit.checkpoint import list_checkpoints

    part = os.path.join(str(tmp_path), os.path.basename(run_dir))
    os.makedirs(part)
    first = list_checkpoints(run_dir)[0]
    shutil.copytree(first, os.path.join(part, os.path.basename(first)))
    shutil.copy(os.path.join(run_dir, "config.json"), os.path.join(part, "config.json"))
    return part


def perturbed(model, seed: int = 0, std: float = 0.05):
    """Add noise to every trainable weight: at its adaLN-Zero init a DiT outputs exactly zero, which would make any
    comparison of two forward paths vacuous."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def read_metrics(run_dir) -> dict:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out.setdefault(row["step"], {}).update(row)  # evaluation rows add to the step's training row
    return out


SHELL_FENCES = ("bash", "shell", "sh", "console")


def shell_commands(text: str) -> list[str]:
    """The commands of a markdown text's fenced shell blocks (```bash, ```shell, ...), continuation lines joined,
    comments dropped."""
    out, block = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            block = not block and line[3:].strip() in SHELL_FENCES
            continue
        if not block:
            continue
        line = line.split("  #")[0].split(" # ")[0].rstrip()
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1].rstrip() + " " + line.strip()
        elif line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out
