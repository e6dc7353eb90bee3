"""Published checkpoints by name, and the release layouts that need converting on load.

``--ckpt DiT-XL-2-256x256.pt`` (any name below) loads the published file: from the path when one exists there, else from
the torch hub cache (``$TORCH_HOME/hub/checkpoints/``), else downloaded into it with a progress bar, as the official DiT
code's ``find_model`` does (its ``pretrained_models/`` folder becomes the hub cache; the download is written to a
temporary file and moved into place when complete, its SHA-256 checked where one is published). Offline
(OPENDIT_OFFLINE) or on a failed download: one line naming the URL and where to put the file.

REPA's release layout (``last.pt``, or a REPA ``train.py`` checkpoint's ``ema``): the SiT network with the projectors
inside (``projectors.*``), 4 output channels, and time running from data (0) to noise (1) with the velocity
noise - data. ``from_repa_layout`` turns it into our flow layout exactly, so it samples and converts like any SiT
checkpoint: the projectors are dropped; the time reversal t -> 1 - t is folded into the first timestep-embedding layer
(the sinusoid of 1 - t is a fixed rotation of the sinusoid of t: cos(w (1 - t)) = cos w cos wt + sin w sin wt,
sin(w (1 - t)) = sin w cos wt - cos w sin wt); the velocity's sign into the final layer; and the output gets SiT's
untouched variance half (zeros), which is how a flow checkpoint is recognised.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass

import torch

from .errors import UserError
from .hub import cache_path, weights_file

REPA_PREFIX = "projectors."


@dataclass(frozen=True)
class Published:
    name: str  # the file name people use (the official code's name where it has one)
    url: str
    model: str  # our registry name
    image_size: int
    objective: str
    fid: str  # the published result
    command: str  # what reproduces it here
    sha256: str | None = None  # hash prefix checked after download (none is published for these files)
    latent_stats: tuple[str, str] | None = None  # (file name, url) of the per-channel statistics it needs


_DIT = "https://dl.fbaipublicfiles.com/DiT/models/"
_HF = "https://huggingface.co/hustvl/"
_SAMPLE = "torchrun --nproc_per_node 8 scripts/dit/sample_ddp.py --config recipes/"
_LIGHTNING_STATS = ("latents_stats.pt", _HF + "vavae-imagenet256-f16d32-dinov2/resolve/main/latents_stats.pt")

PUBLISHED = {p.name: p for p in (
    Published("DiT-XL-2-256x256.pt", _DIT + "DiT-XL-2-256x256.pt", "DiT-XL/2", 256, "diffusion",
              "FID-50K 2.27 (cfg 1.5, DDPM 250, 3 channels guided); 9.62 without guidance",
              _SAMPLE + "dit-xl-2-imagenet256.toml --ckpt DiT-XL-2-256x256.pt"),
    Published("DiT-XL-2-512x512.pt", _DIT + "DiT-XL-2-512x512.pt", "DiT-XL/2", 512, "diffusion",
              "FID-50K 3.04 (cfg 1.5, DDPM 250, 3 channels guided); 12.03 without guidance",
              _SAMPLE + "dit-xl-2-imagenet256.toml --ckpt DiT-XL-2-512x512.pt"),
    Published("SiT-XL-2-256x256.pt", "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/"
              "SiT-XL-2-256.pt?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0", "DiT-XL/2", 256, "flow",
              "FID-50K 2.06 (cfg 1.5, SDE Euler 250, sigma, 3 channels guided)",
              _SAMPLE + "sit-xl-2-imagenet256.toml --ckpt SiT-XL-2-256x256.pt"),
    Published("REPA-SiT-XL-2-256x256.pt", "https://www.dl.dropboxusercontent.com/scl/fi/cxedbs4da5ugjq5wg3zrg/"
              "last.pt?rlkey=8otgrdkno0nd89po3dpwngwcc&st=apcc645o&dl=0", "DiT-XL/2", 256, "flow",
              "FID-50K 1.42 (4M steps; cfg 1.8 for t >= 0.3, SDE Euler 250, all channels); 5.9 without guidance",
              _SAMPLE + "repa-sit-xl-2-imagenet256.toml --ckpt REPA-SiT-XL-2-256x256.pt"),
    Published("lightningdit-xl-imagenet256-64ep.pt", _HF + "lightningdit-xl-imagenet256-64ep/resolve/main/"
              "lightningdit-xl-imagenet256-64ep.pt", "LightningDiT-XL/1", 256, "flow",
              "FID-50K 2.11 (cfg 10.0 for t >= 0.10, 3 channels, Euler 250, shift 0.3); 5.14 without guidance",
              _SAMPLE + "lightningdit-xl-1-imagenet256.toml --ckpt lightningdit-xl-imagenet256-64ep.pt "
              "--vae VAVAE_DIFFUSERS_FOLDER", latent_stats=_LIGHTNING_STATS),
    Published("lightningdit-xl-imagenet256-800ep.pt", _HF + "lightningdit-xl-imagenet256-800ep/resolve/main/"
              "lightningdit-xl-imagenet256-800ep.pt", "LightningDiT-XL/1", 256, "flow",
              "FID-50K 1.35 (cfg 6.7 for t >= 0.125, 3 channels, Euler 250, shift 0.3); 2.17 without guidance",
              _SAMPLE + "lightningdit-xl-1-imagenet256.toml --ckpt lightningdit-xl-imagenet256-800ep.pt "
              "--cfg_scale 6.7 --cfg_interval 0.125 1 --vae VAVAE_DIFFUSERS_FOLDER", latent_stats=_LIGHTNING_STATS),
)}


def fetch_published(name: str, flag: str = "--ckpt") -> str:
    """The local file of a published checkpoint: the hub cache, downloading into it when missing."""
    p = PUBLISHED[name]
    return weights_file(None, p.name, p.url, flag=flag, what=f"published {p.name}", hash_prefix=p.sha256)


def fetch_latent_stats(name: str) -> str | None:
    """The latent statistics file a published checkpoint needs (LightningDiT's latents_stats.pt), fetched like it."""
    name = os.path.basename(name or "")  # by name, or the published file kept elsewhere
    stats = PUBLISHED[name].latent_stats if name in PUBLISHED else None
    if stats is None:
        return None
    return weights_file(None, stats[0], stats[1], flag="--latent_stats", what=f"latent statistics of {name}")


def published_objective(ckpt: str | None) -> str | None:
    """What a published checkpoint (by name, or its file kept elsewhere) was trained as; None for any other file."""
    p = PUBLISHED.get(os.path.basename(ckpt or ""))
    return p.objective if p is not None else None


def unknown_name_hint(path: str) -> str:
    """For a --ckpt that is neither a file nor a published name: the closest published name, if any is close."""
    close = difflib.get_close_matches(path, list(PUBLISHED), n=1, cutoff=0.6)
    return f" (did you mean the published {close[0]}? `opendit models` lists them)" if close else ""


def describe_published() -> list[str]:
    """`opendit models`' list of the published checkpoints: name, architecture, result, the command reproducing it."""
    lines = ["", "published checkpoints (--ckpt NAME fetches the file into " + cache_path("") + "):"]
    for p in PUBLISHED.values():
        lines += [f"  {p.name:<38} {p.model} {p.image_size}px {p.objective}: {p.fid}", f"      {p.command}"]
    return lines


# ----------------------------------------------------------------------------- REPA's release layout


def is_repa_layout(sd: dict) -> bool:
    """A state dict with the projectors inside and as many output channels as input channels: REPA's SiT (our own
    checkpoints keep projectors in a file of their own, and our sampled weights never carry them)."""
    if not any(k.startswith(REPA_PREFIX) for k in sd):
        return False
    try:
        patch, c = sd["x_embedder.proj.weight"].shape[2], sd["x_embedder.proj.weight"].shape[1]
        return sd["final_layer.linear.weight"].shape[0] == patch * patch * c
    except KeyError:
        return False


def time_reversal_rotation(frequency_embedding_size: int, dtype=torch.float64) -> torch.Tensor:
    """R with sinusoid(1 - t) = R sinusoid(t) for DiT's timestep sinusoid [cos(w_k t), sin(w_k t)], w_k =
    10000^(-k / half) (computed in float32 as the embedder does)."""
    half = frequency_embedding_size // 2
    w = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(dtype)
    cos, sin = torch.diag(torch.cos(w)), torch.diag(torch.sin(w))
    return torch.cat([torch.cat([cos, sin], 1), torch.cat([sin, -cos], 1)], 0)


def from_repa_layout(sd: dict) -> dict:
    """REPA's release state dict -> ours (a SiT-layout flow checkpoint whose velocity at t equals minus REPA's network
    at 1 - t), in float64 then back to each tensor's dtype."""
    out = {k: v for k, v in sd.items() if not k.startswith(REPA_PREFIX)}
    w0 = out["t_embedder.mlp.0.weight"]
    if w0.shape[1] % 2:
        raise UserError("REPA layout: an odd timestep-embedding width is not supported")
    out["t_embedder.mlp.0.weight"] = (w0.double() @ time_reversal_rotation(w0.shape[1])).to(w0.dtype)
    patch, c = out["x_embedder.proj.weight"].shape[2], out["x_embedder.proj.weight"].shape[1]
    w, b = out["final_layer.linear.weight"], out["final_layer.linear.bias"]
    rows = torch.arange(patch * patch * c)
    new_rows = rows // c * (2 * c) + rows % c  # (p, q, channel), channel fastest: the velocity half of 2C channels
    w8 = torch.zeros(patch * patch * 2 * c, w.shape[1], dtype=w.dtype)
    b8 = torch.zeros(patch * patch * 2 * c, dtype=b.dtype)
    w8[new_rows], b8[new_rows] = -w, -b
    out["final_layer.linear.weight"], out["final_layer.linear.bias"] = w8, b8
    return out
