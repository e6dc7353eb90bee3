"""Training checkpoints: layout, atomic save, discovery and safe loading.

    <run>/epoch{E}-global_step{G}/
        model/model.safetensors    the trained weights (fp32, official key names)
        ema.pt                     the EMA weights: a plain fp32 state dict, torch.load(..., weights_only=True)
        projector/projector.safetensors   REPA runs only: the trained projectors (``projectors.*``), kept out of
                                   model/ and ema.pt so that both keep the published DiT layout
        optimizer/optimizer.pt     the optimizer state, unsharded and keyed by parameter name (any plugin or world
                                   size resumes from it; tensors and numbers only)
        running_states.json        epoch, step in epoch, global step, data position, seeds, scaler state
        manifest.json              size and SHA-256 of every file above (written last)
    <run>/latest                   the name of the newest complete checkpoint of the run's current branch
    <run>/abandoned-after-<ckpt>-<time>/
                                   checkpoints of an abandoned branch: resuming from a checkpoint older than the run's
                                   newest moves the newer ones here (kept, never loaded by --load RUN or --load auto)

A checkpoint is written under a temporary name, flushed to disk and renamed when complete, so a crash (even SIGKILL
mid-write) never leaves a half-written checkpoint under a real name and ``latest`` always names a complete one. On
resume the manifest is checked; a truncated or corrupt checkpoint of a run directory is reported and the newest intact
one is used instead. Everything loads without executing pickled code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

from . import faults
from .models import TRAINING_ONLY
from .atomic import atomic_path, fsync_path, write_text_atomic
from .errors import UserError, reason

CKPT_RE = re.compile(r"^epoch(\d+)-global_step(\d+)$")
MODEL_FILE = os.path.join("model", "model.safetensors")
EMA_FILE = "ema.pt"
OPTIM_FILE = os.path.join("optimizer", "optimizer.pt")
PROJECTOR_FILE = os.path.join("projector", "projector.safetensors")
STATE_FILE = "running_states.json"
MANIFEST = "manifest.json"
LATEST = "latest"
MANIFEST_FORMAT = "opendit-checkpoint-manifest-v1"


class CorruptCheckpoint(UserError):
    """A checkpoint whose files are missing, truncated or altered (a run directory falls back to an older one)."""


def checkpoint_name(epoch: int, global_step: int) -> str:
    return f"epoch{epoch}-global_step{global_step}"


def is_checkpoint_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_FILE))


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint directories of a run, oldest first (by global step)."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = CKPT_RE.match(name)
        if m and is_checkpoint_dir(os.path.join(run_dir, name)):
            found.append((int(m.group(2)), name))
    return [os.path.join(run_dir, n) for _, n in sorted(found)]


def _candidates(path: str, flag: str) -> list[str]:
    """Checkpoints to try for ``path``, best first: the directory itself, or a run's ``latest`` then newest to oldest."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file or directory")
    if is_checkpoint_dir(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: expected a checkpoint directory (epochE-global_stepG/) or a run directory")
    ckpts = list_checkpoints(path)[::-1]
    pointer = os.path.join(path, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        target = os.path.join(path, name)
        if name and target not in ckpts:
            present = ", ".join(os.path.basename(c) for c in ckpts[:3]) or "none"
            raise UserError(f"{flag} {path}: {LATEST} names {name}, which is missing (checkpoints present, newest "
                            f"first: {present}); name the checkpoint directory to use explicitly")
        if name:
            ckpts = [target] + [c for c in ckpts if c != target]
    if not ckpts:
        raise UserError(f"{flag} {path}: no checkpoint in this directory")
    return ckpts


def first_intact(path: str, load, flag: str = "--load") -> tuple[str, object, list[str]]:
    """(checkpoint directory, ``load(it)``, warnings) for ``path``. ``load`` raises CorruptCheckpoint for a damaged
    checkpoint. A checkpoint directory must be intact (else that one-line error); for a run directory, corrupt
    checkpoints are skipped (each with a warning) for the newest intact one."""
    candidates = _candidates(path, flag)
    warnings = []
    for c in candidates:
        try:
            return c, load(c), warnings
        except CorruptCheckpoint as e:
            if c == path:  # named explicitly
                raise
            warnings.append(f"skipping {c}: {e}")
    raise CorruptCheckpoint(f"{flag} {path}: every checkpoint is corrupt ({warnings[0]})")


def find_resumable(path: str, flag: str = "--load") -> tuple[str, dict, list[str]]:
    """(checkpoint directory, its loaded state, warnings): ``first_intact`` with ``load_checkpoint``."""
    return first_intact(path, load_checkpoint, flag)


def find_auto_resume(outputs: str, model_name: str) -> str | None:
    """For ``--load auto``: the newest run directory of ``model_name`` under ``outputs`` that has a checkpoint."""
    if not os.path.isdir(outputs):
        return None
    suffix = "-" + model_name.replace("/", "-")
    runs = []
    for d in os.listdir(outputs):
        m = re.match(r"^(\d{3,})-(.+)$", d)
        if m and "-" + m.group(2) == suffix and list_checkpoints(os.path.join(outputs, d)):
            runs.append((int(m.group(1)), d))
    return os.path.join(outputs, max(runs)[1]) if runs else None


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write_manifest(ckpt_dir: str) -> None:
    """Record the size and SHA-256 of every file of ``ckpt_dir`` (fsyncing each) in manifest.json."""
    files = {}
    for root, _, names in os.walk(ckpt_dir):
        for n in sorted(names):
            full = os.path.join(root, n)
            rel = os.path.relpath(full, ckpt_dir).replace(os.sep, "/")
            if rel == MANIFEST:
                continue
            fsync_path(full)
            files[rel] = {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}
    write_text_atomic(os.path.join(ckpt_dir, MANIFEST), json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))


def verify_manifest(ckpt_dir: str, only: tuple[str, ...] | None = None) -> bool:
    """Check the files of ``ckpt_dir`` (or just ``only``) against its manifest: raise CorruptCheckpoint on a missing,
    truncated or altered file. False when the checkpoint has no manifest (written before manifests existed)."""
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"checkpoint {ckpt_dir}: {MANIFEST} is unreadable ({e})") from None
    for rel, want in files.items():
        if only is not None and rel not in only:
            continue
        full = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(full):
            raise CorruptCheckpoint(f"checkpoint {ckpt_dir} is incomplete: {rel} is missing")
        size = os.path.getsize(full)
        if size != want["bytes"]:
            raise CorruptCheckpoint(f"checkpoint {ckpt_dir} is corrupt: {rel} has {size} bytes, the manifest says "
                                    f"{want['bytes']} (truncated?)")
        if sha256_file(full) != want["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {ckpt_dir} is corrupt: {rel} fails its SHA-256 check")
    return True


def remove_stale_partials(run_dir: str) -> list[str]:
    """Delete what an interrupted save left behind (.tmp-*/.old-* directories, latest.tmp); returns their names."""
    if not os.path.isdir(run_dir):
        return []
    gone = []
    for name in os.listdir(run_dir):
        if name.startswith((".tmp-", ".old-")) or name == LATEST + ".tmp":
            full = os.path.join(run_dir, name)
            shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
            gone.append(name)
    return gone


def save_checkpoint(run_dir: str, name: str, *, model_state: dict, ema_state: dict, optimizer_state: dict,
                    running_states: dict, keep: int = 0, protect: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """Write a complete checkpoint (called on one rank); returns (its path, the names retention deleted).
    ``model_state``: the trained model's; REPA's projectors in it go to their own file. ``keep`` > 0
    deletes all but the newest ``keep`` checkpoints of the run's current branch, never the one just written nor those
    named in ``protect`` (e.g. the checkpoint this session resumed from)."""
    remove_stale_partials(run_dir)
    final = os.path.join(run_dir, name)
    # the same step saved again (e.g. the final save right after a periodic one) replaces the folder only when the
    # new one is complete; a kill in between leaves .tmp-* / .old-* folders that remove_stale_partials clears
    with atomic_path(final, tmp=os.path.join(run_dir, f".tmp-{name}-{os.getpid()}")) as tmp:
        os.makedirs(os.path.join(tmp, "model"))
        os.makedirs(os.path.join(tmp, "optimizer"))
        projector_state = {k: v for k, v in model_state.items() if k.startswith(TRAINING_ONLY)}
        model_state = {k: v for k, v in model_state.items() if not k.startswith(TRAINING_ONLY)}
        save_file({k: v.detach().float().contiguous().cpu() for k, v in model_state.items()}, os.path.join(tmp, MODEL_FILE))
        if m := CKPT_RE.match(name):
            faults.maybe_kill_in_save(int(m.group(2)))
        torch.save({k: v.detach().float().cpu() for k, v in ema_state.items()}, os.path.join(tmp, EMA_FILE))
        torch.save(optimizer_state, os.path.join(tmp, OPTIM_FILE))
        if projector_state:
            os.makedirs(os.path.join(tmp, "projector"))
            save_file({k: v.detach().float().contiguous().cpu() for k, v in projector_state.items()},
                      os.path.join(tmp, PROJECTOR_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(running_states, f, indent=2)
        write_manifest(tmp)
        for d in (tmp, os.path.join(tmp, "model"), os.path.join(tmp, "optimizer")):
            fsync_path(d)
        if projector_state:
            fsync_path(os.path.join(tmp, "projector"))
    write_text_atomic(os.path.join(run_dir, LATEST), name + "\n")
    fsync_path(run_dir)
    deleted = []
    if keep > 0:
        spared = {name, *(os.path.basename(os.path.normpath(p)) for p in protect)}
        for stale in list_checkpoints(run_dir)[:-keep]:
            if os.path.basename(stale) not in spared:
                shutil.rmtree(stale, ignore_errors=True)
                deleted.append(os.path.basename(stale))
    return final, deleted


def checkpoint_step(ckpt_dir: str) -> int:
    m = CKPT_RE.match(os.path.basename(os.path.normpath(ckpt_dir)))
    if not m:
        raise UserError(f"{ckpt_dir} is not named like a checkpoint (epochE-global_stepG)")
    return int(m.group(2))


def start_branch(run_dir: str, ckpt_dir: str, stamp: str) -> tuple[str | None, list[str]]:
    """Resuming from ``ckpt_dir`` when ``run_dir`` has newer checkpoints starts a new branch of the run's history:
    the newer ones are moved (not deleted) into ``run_dir/abandoned-after-<ckpt>-<stamp>[-n]/`` and ``latest`` names
    ``ckpt_dir``, so the run directory, ``latest`` and retention all follow the branch being trained. Returns (that
    folder or None, the names moved). Called on one rank."""
    name = os.path.basename(os.path.normpath(ckpt_dir))
    step = checkpoint_step(ckpt_dir)
    newer = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) > step]
    if not newer:
        return None, []
    aside = os.path.join(run_dir, f"abandoned-after-{name}-{stamp}")
    n = 1
    while os.path.exists(aside):  # branched back twice in the same second
        n += 1
        aside = os.path.join(run_dir, f"abandoned-after-{name}-{stamp}-{n}")
    os.makedirs(aside)
    for c in newer:
        os.replace(c, os.path.join(aside, os.path.basename(c)))
    write_text_atomic(os.path.join(run_dir, LATEST), name + "\n")
    fsync_path(aside)
    fsync_path(run_dir)
    return aside, [os.path.basename(c) for c in newer]


def _refusal(path: str, e: Exception) -> str:
    m = re.search(r"GLOBAL (\S+)", str(e))
    what = f"it calls or builds {m.group(1)}" if m else "objects other than tensors"
    return (f"refusing to load {path}: it is a pickle that carries more than tensors ({what}), and only weights_only "
            f"loads are allowed because unpickling can run arbitrary code; export its state dict to a bare .pt or "
            f".safetensors file with code you trust")


def _torch_load_safe(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"checkpoint file {path} is missing") from None
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise UserError(_refusal(path, e)) from None
        raise CorruptCheckpoint(f"cannot load {path} ({reason(e)})") from None
    except Exception as e:  # RuntimeError/EOFError for truncation
        raise CorruptCheckpoint(f"{path} is corrupt or truncated ({reason(e)})") from None


def load_checkpoint(ckpt_dir: str) -> dict:
    """{"model", "ema", "optimizer", "running_states"} of a checkpoint directory, on the CPU, after checking its
    manifest ("model": the trained model's state, REPA's projectors included). Integrity problems raise
    CorruptCheckpoint, a pickle carrying code a plain UserError."""
    verify_manifest(ckpt_dir)
    try:
        model = load_file(os.path.join(ckpt_dir, MODEL_FILE))
    except FileNotFoundError:
        raise CorruptCheckpoint(f"checkpoint {ckpt_dir} has no {MODEL_FILE}") from None
    except Exception as e:  # safetensors' SafetensorError, OSError
        raise CorruptCheckpoint(f"checkpoint {ckpt_dir}: {MODEL_FILE} is corrupt or truncated ({e})") from None
    try:
        with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
            states = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"checkpoint {ckpt_dir}: {STATE_FILE} is unreadable ({e})") from None
    for key in ("epoch", "global_step", "epoch_offset"):
        if not isinstance(states.get(key), int):
            raise CorruptCheckpoint(f"checkpoint {ckpt_dir}: {STATE_FILE} has no integer {key!r}")
    if os.path.isfile(os.path.join(ckpt_dir, PROJECTOR_FILE)):
        try:
            model.update(load_file(os.path.join(ckpt_dir, PROJECTOR_FILE)))
        except Exception as e:
            raise CorruptCheckpoint(f"checkpoint {ckpt_dir}: {PROJECTOR_FILE} is corrupt or truncated ({e})") from None
    return {
        "model": model,
        "ema": _torch_load_safe(os.path.join(ckpt_dir, EMA_FILE)),
        "optimizer": _torch_load_safe(os.path.join(ckpt_dir, OPTIM_FILE)),
        "running_states": states,
    }


def load_into(module: torch.nn.Module, state: dict, what: str) -> None:
    """load_state_dict(strict=True) with a one-line explanation of any mismatch."""
    check_fits({k: tuple(v.shape) for k, v in module.state_dict().items()}, state, what)
    module.load_state_dict(state, strict=True)


def check_fits(own: dict, state: dict, what: str) -> None:
    """Raise a one-line UserError unless ``state`` has exactly the keys and shapes of ``own`` (name -> shape)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k])}" for k in own if k in state and tuple(state[k].shape) != tuple(own[k])]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shape mismatch: {wrong[0]}" + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""))
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise UserError(f"{what} does not fit this model: " + "; ".join(parts))


# ----------------------------------------------------------------------------- weights for sampling

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_state_dict_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as e:
            raise UserError(f"{path} is not a readable safetensors file ({reason(e)})") from None
    try:  # a training checkpoint's argparse.Namespace (REPA's, SiT's) is plain data: allowed, and nothing else
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(_refusal(path, e)) from None
    except Exception as e:  # truncated or not a torch file
        raise UserError(f"{path} is not a readable checkpoint ({reason(e)})") from None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]  # a training checkpoint saved without pickled objects
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return obj


def release_layout(sd: dict) -> dict:
    """A bare state dict in our layout: REPA's release (projectors inside, time reversed) converted exactly."""
    from .published import from_repa_layout, is_repa_layout

    return from_repa_layout(sd) if is_repa_layout(sd) else sd


CONFIG_FILE = "config.json"


def run_dir_of(path: str) -> str | None:
    """The run directory a checkpoint path belongs to, for every spelling: a run directory, a checkpoint directory,
    its model/ folder (with or without a trailing slash), model/model.safetensors, ema.pt, or a weights file kept in
    a run or checkpoint directory. None for a file outside any run."""
    p = os.path.abspath(path)  # also drops a trailing slash
    if os.path.isfile(p):
        p = os.path.dirname(p)
    for _ in range(3):  # model.safetensors -> model/ -> checkpoint -> run
        if is_checkpoint_dir(p):
            return os.path.dirname(p)
        if os.path.isfile(os.path.join(p, CONFIG_FILE)):
            return p
        p = os.path.dirname(p)
    return None


def read_run_config(run_dir: str | None) -> dict | None:
    """config.json of a run directory (the settings it was started with), or None."""
    if run_dir is None:
        return None
    try:
        with open(os.path.join(run_dir, CONFIG_FILE)) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    # ours: another tool's config.json in a folder above a weights file is not a run's
    return cfg if isinstance(cfg, dict) and {"model", "global_batch", "image_size"} <= set(cfg) else None


def load_weights(path: str, use_model_weights: bool = False, flag: str = "--ckpt") -> tuple[dict, str, dict | None]:
    """(state dict, the weights file it came from, the run's config.json or None) for every checkpoint people have: a
    bare state dict (.pt, e.g. the published DiT-XL-2-256x256.pt), our ema.pt, a .safetensors file, a checkpoint's
    model/ folder, a checkpoint directory or a run directory (EMA unless ``use_model_weights``); or the name of a
    published checkpoint (``opendit.published``: fetched into the hub cache), or ``hf://OWNER/NAME[@REVISION][/FILE]``
    (``opendit.hf_hub``; an ``opendit export`` folder: its model.safetensors, with its config.json as the run's). REPA's
    release layout comes back in ours (``opendit.published.from_repa_layout``)."""
    from .hf_hub import local_path
    from .published import PUBLISHED, fetch_published, unknown_name_hint

    path = local_path(path, flag)  # hf://...: the Hub cache's copy (an export loads like the run it came from)
    if not os.path.exists(path):
        if path not in PUBLISHED:
            raise UserError(f"{flag} {path}: no such file or directory{unknown_name_hint(path)}")
        path = fetch_published(path, flag)
    cfg = read_run_config(run_dir_of(path))
    path = os.path.normpath(path)
    if os.path.isfile(path):
        return release_layout(load_state_dict_file(path)), path, cfg
    if os.path.isfile(os.path.join(path, "model.safetensors")):  # epochXX-global_stepXX/model
        file = os.path.join(path, "model.safetensors")
        return load_state_dict_file(file), file, cfg
    rel = MODEL_FILE if use_model_weights else EMA_FILE
    # a run directory: the newest checkpoint whose weights file passes its manifest
    ckpt_dir, _, warnings = first_intact(path, lambda d: verify_manifest(d, only=(rel.replace(os.sep, "/"),)), flag)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    file = os.path.join(ckpt_dir, rel)
    return load_state_dict_file(file), file, cfg
