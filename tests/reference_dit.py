"""An independent, deliberately naive DiT forward pass written from the facts file alone, working
directly on a state dict: explicit per-patch loops, per-head attention, float64 numpy-style math.
It shares no code with opendit.models and is the reference the model is tested against."""

from __future__ import annotations

import math

import torch


def _linear(sd, prefix, x):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def _layernorm(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    return x / (1 + torch.exp(-x))


def reference_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, patch: int, heads: int, learn_sigma=True):
    """x (N, C, H, W) float64 -> (N, out_C, H, W). sd: the model's state dict in float64."""
    N, C, H, W = x.shape
    D = sd["pos_embed"].shape[-1]
    h, w = H // patch, W // patch
    conv_w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    # patchify token by token, row-major
    tokens = []
    for r in range(h):
        for c in range(w):
            piece = x[:, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]  # (N, C, p, p)
            tokens.append(torch.einsum("ncij,dcij->nd", piece, conv_w) + sd["x_embedder.proj.bias"])
    z = torch.stack(tokens, dim=1) + sd["pos_embed"][0]  # (N, T, D)

    half = 128
    freqs = torch.tensor([math.exp(-math.log(10000) * k / half) for k in range(half)], dtype=torch.float64)
    ang = t.double()[:, None] * freqs[None]
    temb = torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)
    temb = _linear(sd, "t_embedder.mlp.2", _silu(_linear(sd, "t_embedder.mlp.0", temb)))
    cond = temb + sd["y_embedder.embedding_table.weight"][y]  # (N, D)

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    hd = D // heads
    for b in range(depth):
        pre = f"blocks.{b}."
        mod = _linear(sd, pre + "adaLN_modulation.1", _silu(cond))
        sh1, sc1, g1, sh2, sc2, g2 = [mod[:, i * D:(i + 1) * D][:, None, :] for i in range(6)]
        a_in = _layernorm(z) * (1 + sc1) + sh1
        qkv = _linear(sd, pre + "attn.qkv", a_in)  # (N, T, 3D): [q | k | v], each split in heads
        outs = []
        for head in range(heads):
            q = qkv[..., 0 * D + head * hd:0 * D + (head + 1) * hd]
            k = qkv[..., 1 * D + head * hd:1 * D + (head + 1) * hd]
            v = qkv[..., 2 * D + head * hd:2 * D + (head + 1) * hd]
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)
            outs.append(att @ v)
        z = z + g1 * _linear(sd, pre + "attn.proj", torch.cat(outs, dim=-1))
        m_in = _layernorm(z) * (1 + sc2) + sh2
        z = z + g2 * _linear(sd, pre + "mlp.fc2", _gelu_tanh(_linear(sd, pre + "mlp.fc1", m_in)))

    mod = _linear(sd, "final_layer.adaLN_modulation.1", _silu(cond))
    shift, scale = mod[:, None, :D], mod[:, None, D:]
    out = _linear(sd, "final_layer.linear", _layernorm(z) * (1 + scale) + shift)  # (N, T, p*p*oc)
    oc = out.shape[-1] // (patch * patch)
    img = torch.zeros(N, oc, H, W, dtype=out.dtype)
    for r in range(h):
        for c in range(w):
            tok = out[:, r * w + c].reshape(N, patch, patch, oc)  # channel fastest
            img[:, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = tok.permute(0, 3, 1, 2)
    return img
