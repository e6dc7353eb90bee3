"""DINOv2 (Oquab et al., 2023) as a frozen feature encoder for representation alignment, written here so that the
published weights load without the hub's code: the parameter names are those of the released checkpoints
(``dinov2_vitb14_pretrain.pth`` ...), loaded with ``torch.load(weights_only=True)`` or safetensors.

    images (N, 3, R, R), ImageNet-normalized, R a multiple of 14
      -> patch tokens (N, T, D), T = (R / 14)^2: the final LayerNorm of the last block's patch tokens
         ("x_norm_patchtokens" of the release; what REPA aligns to)

A ViT with a class token, optional register tokens, LayerScale, and a learned position table for a 37 x 37 grid
(518 px). Two resizings of that table, each as its released code does it:

- ``resample_position_table(g)``: once, to the alignment grid, as REPA does when it loads the encoder (REPA utils.py
  load_encoders: timm's ``resample_abs_pos_embed``, bicubic with antialiasing to size (g, g), timm 1.0.x); the table
  is then used as is for g x g patches (DINOv2 returns its table unchanged when the grid matches).
- at run time, for a grid the table does not have, DINOv2's ``interpolate_pos_encoding`` with the variant's settings
  (hub/backbones.py): the plain models bicubic without antialiasing at scale factor (g + 0.1) / M, the ``_reg`` models
  bicubic with antialiasing to size (g, g) (``interpolate_antialias=True, interpolate_offset=0.0``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError, reason
from ..hub import weights_file

PATCH = 14
# name -> (width, depth, heads, feed-forward, hub file stem)
SIZES = {
    "s": (384, 12, 6, "mlp", "dinov2_vits14"),
    "b": (768, 12, 12, "mlp", "dinov2_vitb14"),
    "l": (1024, 24, 16, "mlp", "dinov2_vitl14"),
    "g": (1536, 40, 24, "swiglu", "dinov2_vitg14"),
}
PRETRAIN_GRID = 37  # the released position tables: 1 + 37 * 37 entries (518 px)
URL = "https://dl.fbaipublicfiles.com/dinov2/{stem}/{file}"


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, T, D))


class ViTMlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTSwiGLU(nn.Module):
    """The giant model's feed-forward: hidden width 2/3 of 4 D rounded up to a multiple of 8."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: str):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), ViTAttention(dim, heads), LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ViTSwiGLU(dim) if ffn == "swiglu" else ViTMlp(dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resample_abs_pos_embed(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M * M, D) -> (1, 1 + grid * grid, D): the class entry kept, the patch table resized bicubically with
    antialiasing to (grid, grid) in float32 (what timm 1.0's resample_abs_pos_embed does with its defaults)."""
    m = math.isqrt(table.shape[1] - 1)
    if grid == m:
        return table
    patches = table[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)
    return torch.cat([table[:, :1], patches], dim=1)


class DINOv2(nn.Module):
    def __init__(self, size: str = "b", registers: int = 0, grid: int = PRETRAIN_GRID):
        super().__init__()
        dim, depth, heads, ffn, _ = SIZES[size]
        self.dim, self.registers = dim, registers
        # the release's run-time interpolation settings: dinov2_vit*14_reg pass antialias on and no offset
        self.interpolate_antialias, self.interpolate_offset = (True, 0.0) if registers else (False, 0.1)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused here; part of the released state dict
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, ffn) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    @property
    def grid(self) -> int:
        """The side of the position table's patch grid (37 as released; the alignment grid once resampled)."""
        return math.isqrt(self.pos_embed.shape[1] - 1)

    @torch.no_grad()
    def resample_position_table(self, grid: int) -> None:
        """Resize the position table to a grid x grid patch grid once (REPA's load-time resampling)."""
        if grid != self.grid:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(self.pos_embed.data, grid),
                                          requires_grad=self.pos_embed.requires_grad)

    def position_table(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h w, D): the table as is for its own square grid, else resized at run time as the release's
        interpolate_pos_encoding does (float32; the variant's antialiasing and offset)."""
        m = self.grid
        if (h, w) == (m, m):
            return self.pos_embed
        table = self.pos_embed.float()
        patches = table[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            size = dict(scale_factor=((h + self.interpolate_offset) / m, (w + self.interpolate_offset) / m))
        else:
            size = dict(size=(h, w))
        patches = F.interpolate(patches, mode="bicubic", antialias=self.interpolate_antialias, **size)
        return torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) normalized images -> (N, (R/14)^2, D) normalized patch tokens."""
        h, w = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (N, h w, D)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self.position_table(h, w).to(tokens.dtype)
        if self.registers:
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(len(x), -1, -1), tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 1 + self.registers:]


def weights_file_name(size: str, registers: int) -> str:
    return f"{SIZES[size][4]}{'_reg4' if registers else ''}_pretrain.pth"


def find_weights(size: str, registers: int, path: str | None, flag: str) -> str:
    """``path`` when given, else the torch hub cache (where ``torch.hub.load('facebookresearch/dinov2', ...)`` puts the
    released file), downloading into it when online (never with OPENDIT_OFFLINE)."""
    file = weights_file_name(size, registers)
    return weights_file(path, file, URL.format(stem=SIZES[size][4], file=file), flag=flag, what="DINOv2")


def load_dinov2(size: str, registers: int = 0, path: str | None = None, flag: str = "--repa_encoder_weights",
                device="cpu") -> DINOv2:
    """The released DINOv2 of ``size`` (s, b, l, g) in eval mode, frozen, on ``device``, its position table as released
    (``DINOv2Encoder`` resamples it to the alignment grid)."""
    file = find_weights(size, registers, path, flag)
    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(file)
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{flag} {file}: not a readable weights file ({reason(e)})") from None
    if not isinstance(sd, dict) or "pos_embed" not in sd:
        raise UserError(f"{flag} {file}: not a DINOv2 state dict (no pos_embed)")
    grid = int(math.isqrt(sd["pos_embed"].shape[1] - 1))
    net = DINOv2(size, registers, grid)
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    wrong = [k for k in own if k not in sd or tuple(sd[k].shape) != own[k]] + [k for k in sd if k not in own]
    if wrong:
        raise UserError(f"{flag} {file} is not the DINOv2 ViT-{size.upper()}/14{' with registers' if registers else ''} "
                        f"({len(wrong)} missing, misshapen or unexpected keys, e.g. {wrong[0]})")
    net.load_state_dict(sd)
    return net.eval().requires_grad_(False).to(device)
