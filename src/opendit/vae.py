"""Latent space through Stable Diffusion's VAE (diffusers.AutoencoderKL), an optional extra.

latents = posterior sample * scaling_factor (0.18215 for the SD VAEs); images = decode(latents / scaling_factor).
Or, with a per-channel latent normalization (LightningDiT's ``latent_norm``, for VAEs such as VA-VAE whose channels
differ in scale): latents = (posterior sample - mean_c) / std_c * multiplier, the statistics of the data set's latents.
Any channel count works; the VAE's config says it.
"""

from __future__ import annotations

import os

import torch

from .errors import UserError, reason

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
    def sample(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """A posterior sample (with the given standard-normal ``eps``, or the mean when None), unscaled."""
        mean, std = self.posterior(x)
        return mean if eps is None else mean + std * eps.to(mean.dtype)

    def encode(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """The model's input: a posterior sample, scaled."""
        return self.sample(x, eps) * self.scale

    @torch.no_grad()
    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_unscaled(z / self.scale)


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
    why = reason(last) if last else "unknown error"
    raise UserError(f"cannot load the VAE {name!r} ({why}); offline, download it where you have a network "
                    f"and pass --vae PATH (a diffusers AutoencoderKL folder), or use --vae none for pixel space")


class LatentNorm:
    """Per-channel normalization of unscaled latents: (z - mean) / std * multiplier, and back."""

    def __init__(self, mean, std, multiplier: float = 1.0, source: str = ""):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        self.multiplier, self.source = float(multiplier), source
        self._moved: dict = {}  # (device, dtype) -> (mean, std) there
        if self.mean.shape != self.std.shape or not torch.isfinite(self.mean).all() or not (self.std > 0).all():
            raise UserError(f"latent statistics {source}: mean and std must be finite, of one length, std > 0")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def _shape(self, z: torch.Tensor):
        """mean and std as (1, C, 1, 1) on z's device and dtype, moved once (not a host-to-device copy per step)."""
        key = (z.device, z.dtype)
        if key not in self._moved:
            self._moved[key] = (self.mean.to(*key).view(1, -1, 1, 1), self.std.to(*key).view(1, -1, 1, 1))
        return self._moved[key]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._shape(z)
        return (z - mean) / std * self.multiplier

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._shape(x)
        return x / self.multiplier * std + mean

    def record(self) -> dict:
        """What a run's config.json keeps, so that sampling needs neither the latents nor the statistics file."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "multiplier": self.multiplier}

    @classmethod
    def from_record(cls, rec: dict, source: str) -> "LatentNorm":
        return cls(rec["mean"], rec["std"], rec.get("multiplier", 1.0), source)


def load_latent_stats(path: str, multiplier: float = 1.0) -> LatentNorm:
    """--latent_stats PATH: a latents folder (its index.json's statistics), or a torch file holding a dict with "mean"
    and "std" (LightningDiT's ``latents_stats.pt``, shape (1, C, 1, 1)), read with weights_only=True."""
    import json

    index = os.path.join(path, "index.json") if os.path.isdir(path) else path
    if path.endswith(".json") or os.path.isdir(path):
        try:
            with open(index) as f:
                rec = json.load(f).get("latent_stats")
        except (OSError, ValueError) as e:
            raise UserError(f"--latent_stats {path}: unreadable ({e})") from None
        if rec is None:
            raise UserError(f"--latent_stats {path}: the index has no latent statistics (extract again to add them)")
        return LatentNorm(rec["mean"], rec["std"], multiplier, path)
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
        return LatentNorm(rec["mean"], rec["std"], multiplier, path)
    except UserError:
        raise
    except Exception as e:  # a missing file, not a torch file, no mean/std
        raise UserError(f"--latent_stats {path}: expected a latents folder or a torch file with 'mean' and 'std' "
                        f"({reason(e)})") from None


class NormalizedCodec:
    """A codec (LatentCodec or PrecomputedLatents) whose latents are normalized per channel instead of scaled."""

    def __init__(self, codec, norm: LatentNorm):
        if norm.channels != codec.latent_channels:
            raise UserError(f"latent statistics {norm.source} have {norm.channels} channels, the latents "
                            f"{codec.latent_channels}")
        self.codec, self.norm = codec, norm
        self.latent_channels, self.downsample, self.name = codec.latent_channels, codec.downsample, codec.name
        self.scale = codec.scale

    def encode(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm.normalize(self.codec.sample(x, eps))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.codec.decode_unscaled(self.norm.denormalize(z))
