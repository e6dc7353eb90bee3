"""Latent space through Stable Diffusion's VAE (diffusers.AutoencoderKL), an optional extra.

latents = posterior sample * scaling_factor (0.18215 for the SD VAEs); images = decode(latents / scaling_factor).
"""

from __future__ import annotations

import os

import torch

from .errors import UserError

VAE_NAMES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
PIXEL_SPACE_MAX = 64  # --vae auto: pixel space up to this image size, the VAE above


def resolve_vae(spec: str, image_size: int) -> str | None:
    """The VAE to load for --vae SPEC (a hub name or a local path), or None for pixel space."""
    if spec == "none":
        return None
    if spec == "auto":
        return None if image_size <= PIXEL_SPACE_MAX else VAE_NAMES["ema"]
    return VAE_NAMES.get(spec, spec)


class LatentCodec:
    """Encode images in [-1, 1] to scaled latents and back."""

    def __init__(self, vae, name: str):
        self.vae, self.name = vae.eval().requires_grad_(False), name
        self.scale = float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of q(z | x), unscaled."""
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def encode(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """A posterior sample (with the given standard-normal ``eps``, or the mean when None), scaled."""
        mean, std = self.posterior(x)
        z = mean if eps is None else mean + std * eps.to(mean.dtype)
        return z * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((z / self.scale).to(self.vae.dtype)).sample.float().clamp(-1, 1)


def load_vae(name: str, device, dtype=torch.float32) -> LatentCodec:
    try:
        import diffusers
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise UserError(f"--vae {name} needs diffusers (pip install 'opendit[vae]'), or train in pixel space with --vae none") from e
    diffusers.utils.logging.set_verbosity_error()
    if os.path.sep in name or name.startswith(".") or os.path.exists(name):
        if not os.path.isdir(name):
            raise UserError(f"--vae {name}: no such directory (expected a diffusers AutoencoderKL folder)")
    attempts = [True] if os.environ.get("HF_HUB_OFFLINE") or os.path.isdir(name) else [True, False]
    last = None
    for local_only in attempts:  # the local cache first, then the hub
        try:
            vae = AutoencoderKL.from_pretrained(name, local_files_only=local_only, torch_dtype=dtype)
            return LatentCodec(vae.to(device), name)
        except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError, HTTP errors ...
            last = e
    reason = str(last).strip().splitlines()[0] if last else "unknown error"
    raise UserError(f"cannot load the VAE {name!r} ({reason[:200]}); offline, download it where you have a network "
                    f"and pass --vae PATH (a diffusers AutoencoderKL folder), or use --vae none for pixel space")
