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


def timm_resample_abs_pos_embed(posemb: torch.Tensor, new_size, num_prefix_tokens: int = 1) -> torch.Tensor:
    """timm 1.0.x layers/pos_embed.py resample_abs_pos_embed with its defaults (interpolation 'bicubic', antialias
    True), which REPA's utils.load_encoders applies to DINOv2's pos_embed once, with new_size [16 (res // 256)] * 2."""
    if posemb.shape[1] == new_size[0] * new_size[1] + num_prefix_tokens and new_size[0] == new_size[1]:
        return posemb
    hw = int(math.sqrt(posemb.shape[1] - num_prefix_tokens))
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    d = grid.shape[-1]
    grid = grid.float().reshape(1, hw, hw, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=list(new_size), mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, d)
    return torch.cat([prefix, grid], dim=1)


# hub/backbones.py: the _reg models are built with interpolate_antialias=True, interpolate_offset=0.0; the plain ones
# keep vision_transformer.py's defaults False, 0.1
RELEASE_INTERPOLATION = {0: dict(antialias=False, offset=0.1), 4: dict(antialias=True, offset=0.0)}


def release_interpolate_pos_encoding(pos_embed, npatch: int, w: int, h: int, patch: int, antialias: bool,
                                     offset: float) -> torch.Tensor:
    """vision_transformer.py DinoVisionTransformer.interpolate_pos_encoding (``w, h`` as it names the image's dims 2
    and 3)."""
    n = pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    pe = pos_embed.float()
    cls, patches = pe[:, 0], pe[:, 1:]
    dim = pe.shape[-1]
    w0, h0 = w // patch, h // patch
    m = int(math.sqrt(n))
    kwargs = {}
    if offset:
        kwargs["scale_factor"] = (float(w0 + offset) / m, float(h0 + offset) / m)
    else:
        kwargs["size"] = (w0, h0)
    patches = F.interpolate(patches.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias,
                            **kwargs)
    assert (w0, h0) == patches.shape[-2:]
    patches = patches.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((cls.unsqueeze(0), patches), dim=1).to(pos_embed.dtype)


def naive_dinov2(sd: dict, images: torch.Tensor, heads: int, registers: int = 0) -> torch.Tensor:
    """The released DinoVisionTransformer.forward_features(images)["x_norm_patchtokens"] written out: unfolded
    patches, explicit LayerNorm, softmax attention, GELU (erf) or SwiGLU, LayerScale; the position table of ``sd`` as
    prepare_tokens_with_masks adds it (interpolate_pos_encoding with the variant's settings)."""
    def ln(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-6) * w + b

    n, _, hgt, wid = images.shape
    assert hgt % 14 == 0 and wid % 14 == 0  # the release's PatchEmbed asserts it
    gh, gw = hgt // 14, wid // 14
    w = sd["patch_embed.proj.weight"]
    d = w.shape[0]
    patches = images.unfold(2, 14, 14).unfold(3, 14, 14)  # (N, 3, gh, gw, 14, 14)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, gh * gw, -1)
    x = patches @ w.reshape(d, -1).T + sd["patch_embed.proj.bias"]
    x = torch.cat([sd["cls_token"].expand(n, -1, -1), x], 1)
    x = x + release_interpolate_pos_encoding(sd["pos_embed"], x.shape[1] - 1, hgt, wid, 14,
                                             **RELEASE_INTERPOLATION[registers])
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


IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def repa_targets(sd: dict, raw_images: torch.Tensor, heads: int, registers: int = 0) -> torch.Tensor:
    """REPA's alignment targets of uint8-valued images (N, 3, R, R), R = 256 or 512, as its training does: the encoder
    loaded with pos_embed resampled by timm to 16 (R // 256) per side (utils.load_encoders), the image through
    train.preprocess_raw_image (x / 255, Normalize, bicubic resize to 224 (R // 256)), then
    forward_features(...)["x_norm_patchtokens"]."""
    resolution = raw_images.shape[-1]
    assert resolution in (256, 512)  # REPA's assertion
    grid = 16 * (resolution // 256)
    sd = dict(sd, pos_embed=timm_resample_abs_pos_embed(sd["pos_embed"], [grid, grid]))
    x = raw_images / 255.0
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
    return naive_dinov2(sd, x, heads, registers)
