"""An independent, deliberately naive forward pass of the LightningDiT layout, written from the facts file alone
(recipes-facts.md: RMSNorm with a weight, SwiGLU ``mlp.w12`` / ``mlp.w3``, EVA-02-style 2-D RoPE, QK-norm, no-shift
modulation), working directly on a state dict in float64: per-head attention, every rotary pair turned by an explicit
2x2 rotation whose angle is computed from the token's row / column. It shares no code with opendit.models.

The DiT parts (patchify, embeddings, final layer, unpatchify) follow reference_dit.py's naive loops."""

from __future__ import annotations

import math

import torch

from reference_dit import _gelu_tanh, _layernorm, _linear, _silu


def rmsnorm(x, weight, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def layernorm_affine(x, weight, bias, eps=1e-5):
    return _layernorm(x, eps) * weight + bias


def rope_angle(row: int, col: int, channel: int, head_dim: int) -> float:
    """The angle that turns channel pair (2i, 2i+1) of a head at token (row, col): the first half of the head's
    channels rotates with the row, the second half with the column, pair i of a half by 10000^(-2i / (hd/2))."""
    half = head_dim // 2
    pos, c = (row, channel) if channel < half else (col, channel - half)
    i = c // 2
    return pos * 10000.0 ** (-2 * i / half)


def rotate(q: torch.Tensor, grid_w: int) -> torch.Tensor:
    """q (N, T, hd): every interleaved pair rotated by its angle, one 2x2 matrix at a time."""
    out = torch.empty_like(q)
    T, hd = q.shape[1], q.shape[2]
    for tok in range(T):
        r, c = divmod(tok, grid_w)
        for ch in range(0, hd, 2):
            a = rope_angle(r, c, ch, hd)
            x0, x1 = q[:, tok, ch], q[:, tok, ch + 1]
            out[:, tok, ch] = math.cos(a) * x0 - math.sin(a) * x1
            out[:, tok, ch + 1] = math.sin(a) * x0 + math.cos(a) * x1
    return out


def reference_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, patch: int, heads: int,
                      use_rmsnorm=False, use_swiglu=False, use_rope=False, use_qknorm=False, wo_shift=False,
                      wo_pos_embed=False, learn_sigma=False) -> torch.Tensor:
    """x (N, C, H, W) float64 -> (N, out_C, H, W) (the model's whole output, variance half included)."""
    N, C, H, W = x.shape
    D = sd["pos_embed"].shape[-1]
    h, w = H // patch, W // patch
    conv_w = sd["x_embedder.proj.weight"]
    tokens = []
    for r in range(h):
        for c in range(w):
            piece = x[:, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            tokens.append(torch.einsum("ncij,dcij->nd", piece, conv_w) + sd["x_embedder.proj.bias"])
    z = torch.stack(tokens, dim=1)
    if not wo_pos_embed:
        z = z + sd["pos_embed"][0]

    half = 128
    freqs = torch.tensor([math.exp(-math.log(10000) * k / half) for k in range(half)], dtype=torch.float64)
    ang = t.double()[:, None] * freqs[None]
    temb = torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)
    temb = _linear(sd, "t_embedder.mlp.2", _silu(_linear(sd, "t_embedder.mlp.0", temb)))
    cond = temb + sd["y_embedder.embedding_table.weight"][y]

    def norm(prefix, v):
        return rmsnorm(v, sd[prefix + ".weight"]) if use_rmsnorm else _layernorm(v)

    def qk_norm(prefix, v):
        if not use_qknorm:
            return v
        if use_rmsnorm:
            return rmsnorm(v, sd[prefix + ".weight"])
        return layernorm_affine(v, sd[prefix + ".weight"], sd[prefix + ".bias"])

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    hd = D // heads
    for b in range(depth):
        pre = f"blocks.{b}."
        mod = _linear(sd, pre + "adaLN_modulation.1", _silu(cond))
        parts = [mod[:, i * D:(i + 1) * D][:, None, :] for i in range(mod.shape[1] // D)]
        if wo_shift:
            sc1, g1, sc2, g2 = parts
            sh1 = sh2 = 0.0
        else:
            sh1, sc1, g1, sh2, sc2, g2 = parts
        a_in = norm(pre + "norm1", z) * (1 + sc1) + sh1
        qkv = _linear(sd, pre + "attn.qkv", a_in)
        outs = []
        for head in range(heads):
            q = qk_norm(pre + "attn.q_norm", qkv[..., head * hd:(head + 1) * hd])
            k = qk_norm(pre + "attn.k_norm", qkv[..., D + head * hd:D + (head + 1) * hd])
            v = qkv[..., 2 * D + head * hd:2 * D + (head + 1) * hd]
            if use_rope:
                q, k = rotate(q, w), rotate(k, w)
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)
            outs.append(att @ v)
        z = z + g1 * _linear(sd, pre + "attn.proj", torch.cat(outs, dim=-1))
        m_in = norm(pre + "norm2", z) * (1 + sc2) + sh2
        if use_swiglu:
            ab = _linear(sd, pre + "mlp.w12", m_in)
            width = ab.shape[-1] // 2
            hidden = _silu(ab[..., :width]) * ab[..., width:]
            z = z + g2 * _linear(sd, pre + "mlp.w3", hidden)
        else:
            z = z + g2 * _linear(sd, pre + "mlp.fc2", _gelu_tanh(_linear(sd, pre + "mlp.fc1", m_in)))

    mod = _linear(sd, "final_layer.adaLN_modulation.1", _silu(cond))
    shift, scale = mod[:, None, :D], mod[:, None, D:]
    out = _linear(sd, "final_layer.linear", norm("final_layer.norm_final", z) * (1 + scale) + shift)
    oc = out.shape[-1] // (patch * patch)
    img = torch.zeros(N, oc, H, W, dtype=out.dtype)
    for r in range(h):
        for c in range(w):
            tok = out[:, r * w + c].reshape(N, patch, patch, oc)
            img[:, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = tok.permute(0, 3, 1, 2)
    return img


def lightningdit_xl1_shapes(in_channels: int = 32, grid: int = 16, classes: int = 1000, learn_sigma=False,
                            use_qknorm=False, wo_shift=False) -> dict:
    """The state dict of the published LightningDiT-XL/1 (RMSNorm, SwiGLU, RoPE), key -> shape, from the facts:
    hidden 1152, depth 28, 16 heads (head dim 72), patch 1, SwiGLU width int(2/3 * 4608) = 3072, RoPE tables
    (T, 72) as buffers ``feat_rope.freqs_cos`` / ``freqs_sin``."""
    D, T, hd, F = 1152, grid * grid, 72, 3072
    out = in_channels * (2 if learn_sigma else 1)
    shapes = {
        "pos_embed": (1, T, D), "x_embedder.proj.weight": (D, in_channels, 1, 1), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
        "feat_rope.freqs_cos": (T, hd), "feat_rope.freqs_sin": (T, hd),
        "final_layer.norm_final.weight": (D,), "final_layer.linear.weight": (out, D), "final_layer.linear.bias": (out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    m = 4 if wo_shift else 6
    for n in range(28):
        b = f"blocks.{n}."
        shapes.update({
            b + "norm1.weight": (D,), b + "norm2.weight": (D,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.w12.weight": (2 * F, D), b + "mlp.w12.bias": (2 * F,),
            b + "mlp.w3.weight": (D, F), b + "mlp.w3.bias": (D,),
            b + "adaLN_modulation.1.weight": (m * D, D), b + "adaLN_modulation.1.bias": (m * D,),
        })
        if use_qknorm:
            shapes.update({b + "attn.q_norm.weight": (hd,), b + "attn.k_norm.weight": (hd,)})
    return shapes
