"""Test helpers for REPA: a small frozen encoder for ``--repa_encoder reference_repa:factory`` (tests/ is on sys.path in
the in-process runs) and a naive DINOv2 forward written from the released layout, op by op."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyEncoder(nn.Module):
    """RGB images in [-1, 1] -> (N, 16, 8): a fixed random 4 x 4 grid of features (stride-S/4 convolution)."""

    feature_dim = 8

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.weight = nn.Parameter(torch.randn(8, 3, 4, 4, generator=g) * 0.2, requires_grad=False)

    def forward(self, images):
        s = images.shape[-1] // 4
        x = F.avg_pool2d(images.float(), s // 4) if s > 4 else images.float()
        return torch.tanh(F.conv2d(x, self.weight, stride=4)).flatten(2).transpose(1, 2)


def factory():
    return TinyEncoder()


def naive_dinov2(sd: dict, images: torch.Tensor, heads: int, registers: int = 0) -> torch.Tensor:
    """The released forward written out: unfolded patches, explicit LayerNorm, softmax attention, GELU (erf) or SwiGLU,
    LayerScale; the position table resized with the release's bicubic scale factor (g + 0.1) / 37."""
    def ln(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-6) * w + b

    n, _, hgt, wid = images.shape
    gh, gw = hgt // 14, wid // 14
    w = sd["patch_embed.proj.weight"]
    d = w.shape[0]
    patches = images.unfold(2, 14, 14).unfold(3, 14, 14)  # (N, 3, gh, gw, 14, 14)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, gh * gw, -1)
    x = patches @ w.reshape(d, -1).T + sd["patch_embed.proj.bias"]
    pe = sd["pos_embed"]
    m = math.isqrt(pe.shape[1] - 1)
    if (gh, gw) != (m, m):
        grid = pe[:, 1:].reshape(1, m, m, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic")
        pe = torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, d)], 1)
    x = torch.cat([sd["cls_token"].expand(n, -1, -1), x], 1) + pe
    if registers:
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(n, -1, -1), x[:, 1:]], 1)
    k = 0
    while f"blocks.{k}.norm1.weight" in sd:
        p = lambda name: sd[f"blocks.{k}.{name}"]  # noqa: E731
        h = ln(x, p("norm1.weight"), p("norm1.bias"))
        qkv = (h @ p("attn.qkv.weight").T + p("attn.qkv.bias")).reshape(n, -1, 3, heads, d // heads)
        q, kk, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        a = a.transpose(1, 2).reshape(n, -1, d) @ p("attn.proj.weight").T + p("attn.proj.bias")
        x = x + a * p("ls1.gamma")
        h = ln(x, p("norm2.weight"), p("norm2.bias"))
        if f"blocks.{k}.mlp.fc1.weight" in sd:
            h = h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
            h = h @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
        else:
            u = h @ p("mlp.w12.weight").T + p("mlp.w12.bias")
            a1, a2 = u.chunk(2, -1)
            h = (a1 * torch.sigmoid(a1) * a2) @ p("mlp.w3.weight").T + p("mlp.w3.bias")
        x = x + h * p("ls2.gamma")
        k += 1
    return ln(x, sd["norm.weight"], sd["norm.bias"])[:, 1 + registers:]
