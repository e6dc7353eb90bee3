"""Analytic cost of a DiT, counted the way the DiT paper counts it (multiply-adds of the matrix
products; norms, activations and softmax are not counted), from its DiTConfig."""

from __future__ import annotations

from .models.config import DiTConfig


def dit_forward_macs(config: DiTConfig) -> int:
    """Multiply-adds of one forward pass for one image. SwiGLU: three D x h products with h = 2/3 of the MLP width
    (about the MLP's two); wo_shift: 4 D modulation outputs per block instead of 6. RoPE and the norms are
    elementwise (not counted)."""
    h, w = config.input_size
    p = config.patch_size
    T = (h // p) * (w // p)
    D = config.hidden_size
    hidden_mlp = int(D * config.mlp_ratio)
    mlp = 3 * D * int(2 / 3 * hidden_mlp) if config.use_swiglu else 2 * D * hidden_mlp
    per_block = T * (3 * D * D + D * D + mlp) + 2 * T * T * D + (4 if config.wo_shift else 6) * D * D  # linears, attn, adaLN
    embed = T * D * config.in_channels * p**2 + (256 * D + D * D) * (2 if config.mean_flow else 1)  # + h_embedder
    final = T * D * p**2 * config.out_channels + 2 * D * D
    return config.depth * per_block + embed + final


def dit_train_flops_per_image(config: DiTConfig) -> int:
    """FLOPs of one training step per image: backward ~ 2x forward, 2 FLOPs per multiply-add."""
    return 3 * 2 * dit_forward_macs(config)
