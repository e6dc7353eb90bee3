"""Training checkpoints: layout, atomic save, discovery and safe loading.

    <run>/epoch{E}-global_step{G}/
        model/model.safetensors    the trained weights (fp32, official key names)
        ema.pt                     the EMA weights: a plain fp32 state dict, torch.load(..., weights_only=True)
        optimizer/optimizer.pt     the optimizer state, unsharded and keyed by parameter name (any plugin or world
                                   size resumes from it; tensors and numbers only)
        running_states.json        epoch, step in epoch, global step, data position, seeds, scaler state
    <run>/latest                   the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed when complete, so a crash never leaves a
half-written checkpoint under a real name. Everything loads without executing pickled code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

CKPT_RE = re.compile(r"^epoch(\d+)-global_step(\d+)$")
MODEL_FILE = os.path.join("model", "model.safetensors")
EMA_FILE = "ema.pt"
OPTIM_FILE = os.path.join("optimizer", "optimizer.pt")
STATE_FILE = "running_states.json"
LATEST = "latest"


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


def resolve_checkpoint(path: str, flag: str = "--load") -> str:
    """A checkpoint directory, or a run directory meaning its latest checkpoint."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file or directory")
    if is_checkpoint_dir(path):
        return path
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: expected a checkpoint directory (epochE-global_stepG/) or a run directory")
    pointer = os.path.join(path, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        if name and is_checkpoint_dir(os.path.join(path, name)):
            return os.path.join(path, name)
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise UserError(f"{flag} {path}: no checkpoint in this directory")
    return ckpts[-1]


def _write_atomic_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str, name: str, *, model_state: dict, ema_state: dict, optimizer_state: dict,
                    running_states: dict, keep: int = 0) -> str:
    """Write a complete checkpoint (called on one rank). ``keep`` > 0 deletes all but the newest ``keep``."""
    final = os.path.join(run_dir, name)
    tmp = os.path.join(run_dir, f".tmp-{name}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.join(tmp, "model"))
    os.makedirs(os.path.join(tmp, "optimizer"))
    save_file({k: v.detach().float().contiguous().cpu() for k, v in model_state.items()}, os.path.join(tmp, MODEL_FILE))
    torch.save({k: v.detach().float().cpu() for k, v in ema_state.items()}, os.path.join(tmp, EMA_FILE))
    torch.save(optimizer_state, os.path.join(tmp, OPTIM_FILE))
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump(running_states, f, indent=2)
    if os.path.exists(final):  # the same step saved again (e.g. the final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic_text(os.path.join(run_dir, LATEST), name + "\n")
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _torch_load_safe(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint file {path} is missing") from None
    except Exception as e:  # UnpicklingError for code-carrying pickles, RuntimeError/EOFError for truncation
        raise UserError(f"cannot load {path} safely ({str(e).splitlines()[0][:160]})") from None


def load_checkpoint(ckpt_dir: str) -> dict:
    """{"model", "ema", "optimizer", "running_states"} of a checkpoint directory, on the CPU."""
    try:
        model = load_file(os.path.join(ckpt_dir, MODEL_FILE))
    except FileNotFoundError:
        raise UserError(f"checkpoint {ckpt_dir} has no {MODEL_FILE}") from None
    except Exception as e:  # safetensors' SafetensorError, OSError
        raise UserError(f"checkpoint {ckpt_dir}: {MODEL_FILE} is corrupt or truncated ({e})") from None
    try:
        with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
            states = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt_dir}: {STATE_FILE} is unreadable ({e})") from None
    for key in ("epoch", "global_step", "epoch_offset"):
        if not isinstance(states.get(key), int):
            raise UserError(f"checkpoint {ckpt_dir}: {STATE_FILE} has no integer {key!r}")
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


def _load_weights_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as e:
            raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:160]})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"refusing to load {path}: it is a pickle that carries more than tensors (code or Python objects such as "
            f"argparse.Namespace), and only weights_only loads are allowed; export its state dict to a bare .pt or "
            f".safetensors file with code you trust ({str(e).splitlines()[0][:120]})"
        ) from None
    except Exception as e:  # truncated or not a torch file
        raise UserError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0][:160]})") from None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]  # a training checkpoint saved without pickled objects
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return obj


def run_config_for(ckpt_dir: str) -> dict | None:
    """config.json of the run a checkpoint directory belongs to, if any."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def load_weights(path: str, use_model_weights: bool = False) -> tuple[dict, str, dict | None]:
    """(state dict, what was loaded, the run's config.json or None) for every checkpoint people have: a bare
    state dict (.pt, e.g. the published DiT-XL-2-256x256.pt), our ema.pt, a .safetensors file, a checkpoint's
    model/ folder, a checkpoint directory or a run directory (EMA unless ``use_model_weights``)."""
    if not os.path.exists(path):
        raise UserError(f"--ckpt {path}: no such file or directory")
    if os.path.isfile(path):
        cfg = run_config_for(os.path.dirname(path)) if os.path.basename(path) == EMA_FILE else None
        return _load_weights_file(path), path, cfg
    if os.path.isfile(os.path.join(path, "model.safetensors")):  # epochXX-global_stepXX/model
        return _load_weights_file(os.path.join(path, "model.safetensors")), path, run_config_for(os.path.dirname(path))
    ckpt_dir = resolve_checkpoint(path, flag="--ckpt")
    file = os.path.join(ckpt_dir, MODEL_FILE if use_model_weights else EMA_FILE)
    return _load_weights_file(file), file, run_config_for(ckpt_dir)
