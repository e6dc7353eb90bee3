"""Where a DiT works: on pixels, or on the latents of a VAE. Training and sampling decide it here.

    image (N, 3, S, S) in [-1, 1] --encode--> model input (N, C, S/f, S/f) --the DiT--> ... --decode--> image

Pixel space: C is the image's channels and f = 1. Latent space: C and f are the VAE's (4 and 8 for Stable
Diffusion's, 32 and 16 for VA-VAE's), or those of precomputed latents (``--dataset latents``, which carry the name of
their VAE); the latents are scaled by the VAE's factor, or normalized per channel (``--latent_norm``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import UserError
from .vae import LatentCodec, LatentNorm, NormalizedCodec, load_vae, resolve_vae


@dataclass
class Space:
    image_size: int  # the side of the images, in pixels
    input_size: tuple[int, int]  # the side(s) of the model's input
    channels: int  # the model's input channels
    codec: object | None  # LatentCodec, PrecomputedLatents, or None in pixel space
    vae_name: str | None  # what the run records (None: pixels)

    @property
    def latent(self) -> bool:
        return self.codec is not None

    def describe(self) -> str:
        h, w = self.input_size
        norm = ", normalized per channel" if isinstance(self.codec, NormalizedCodec) else ""
        return f"input {self.channels}x{h}x{w} ({'latents of ' + self.vae_name + norm if self.latent else 'pixels'})"

    @property
    def latent_norm(self) -> LatentNorm | None:
        return self.codec.norm if isinstance(self.codec, NormalizedCodec) else None

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space samples -> images in [-1, 1]."""
        return self.codec.decode(x) if self.codec is not None else x.clamp(-1, 1)


def training_space(vae_flag: str, image_size: int, pixel_channels: int, device, *, saved: dict | None = None,
                   run_dir: str | None = None, latents=None, norm_multiplier: float | None = None) -> Space:
    """The space of a training run at ``image_size``: pixels or the VAE of ``--vae``. ``saved``: the settings of the
    run being resumed, whose VAE must not change; ``latents``: a LatentDataset, whose VAE it is; ``norm_multiplier``
    (--latent_norm): normalize the latents per channel with the statistics stored with them, times this."""
    if norm_multiplier is not None:
        if latents is None:
            raise UserError("--latent_norm needs --dataset latents: the per-channel statistics are computed over the "
                            "data set by extract_features.py")
        if latents.stats is None:
            raise UserError(f"--latent_norm: {latents.root}/index.json has no latent statistics (extracted by an "
                            f"older version); run extract_features.py on it again (finished shards are kept)")
    if latents is not None:
        from .data.latents import PrecomputedLatents

        wanted = resolve_vae(vae_flag, image_size) if vae_flag != "auto" else latents.vae
        if wanted != latents.vae and not (os.path.exists(wanted) and os.path.exists(latents.vae)
                                          and os.path.samefile(wanted, latents.vae)):
            raise UserError(f"--vae {vae_flag}: the latents in {latents.root} were extracted with {latents.vae}; "
                            f"drop --vae or extract again")
        codec, vae_name = PrecomputedLatents(latents, device), latents.vae
        if norm_multiplier is not None:
            codec = NormalizedCodec(codec, LatentNorm.from_record(dict(latents.stats, multiplier=norm_multiplier),
                                                                  f"{latents.root}/index.json"))
    else:
        vae_name = resolve_vae(vae_flag, image_size)
        if saved is not None and vae_name != saved.get("vae_resolved", vae_name):
            raise UserError(f"--vae {vae_flag}: the run in {run_dir} was trained with the VAE "
                            f"{saved['vae_resolved'] or 'none (pixel space)'}; resume without --vae or start a new run")
        codec = load_vae(vae_name, device) if vae_name else None
    if codec is None:
        return Space(image_size, (image_size, image_size), pixel_channels, None, None)
    if image_size % codec.downsample:
        raise UserError(f"--image_size {image_size} is not divisible by the VAE's downsampling factor {codec.downsample}")
    side = image_size // codec.downsample
    return Space(image_size, (side, side), codec.latent_channels, codec, vae_name)


IMAGE_CHANNELS = (1, 3, 4)  # what can be written as an image without a VAE: grey, RGB, RGBA


def sampling_space(vae_name: str | None, input_size: tuple[int, int], in_channels: int, patch_size: int, device, *,
                   image_size: int | None = None, norm: LatentNorm | None = None) -> Space:
    """The space of a model whose input is ``in_channels`` x ``input_size``: pixels, or the latents of ``vae_name``
    (whose channels must be the model's), normalized per channel by ``norm`` when given. ``image_size``, when given,
    must be the one this implies."""
    codec: LatentCodec | NormalizedCodec | None = None
    if vae_name is None and in_channels not in IMAGE_CHANNELS:
        raise UserError(f"the checkpoint takes {in_channels}-channel inputs: latents, not an image; pass --vae PATH, a "
                        f"diffusers AutoencoderKL folder with {in_channels} latent channels (LightningDiT's VA-VAE: "
                        f"see docs/lightningdit.md)")
    if vae_name is None and norm is not None:
        raise UserError("--latent_stats: the checkpoint works in pixel space; drop it")
    if vae_name is not None:
        codec = load_vae(vae_name, device)
        if codec.latent_channels != in_channels:
            raise UserError(f"checkpoint has {in_channels} input channels but the VAE's latents have "
                            f"{codec.latent_channels}; use --vae none for a pixel-space checkpoint")
        if norm is not None:
            codec = NormalizedCodec(codec, norm)
    implied = input_size[0] * (codec.downsample if codec is not None else 1)
    if image_size is not None and image_size != implied:
        where = f"latents through the VAE (x{codec.downsample})" if codec else "pixels"
        raise UserError(f"checkpoint has a {input_size[0] // patch_size}x{input_size[1] // patch_size} token "
                        f"grid with patch {patch_size}: in {where} that is --image_size {implied}, not {image_size}")
    return Space(implied, tuple(input_size), in_channels, codec, vae_name)


def check_patch(space: Space, model_name: str, patch_size: int) -> None:
    if space.input_size[0] % patch_size or space.input_size[1] % patch_size:
        where = "latent" if space.latent else "image"
        raise UserError(f"the {where} size {space.input_size[0]} (from --image_size {space.image_size}) is not "
                        f"divisible by {model_name}'s patch size {patch_size}")
