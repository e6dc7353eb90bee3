"""Analytic cost of a DiT, counted the way the DiT paper counts it (multiply-adds of the matrix
products; norms, activations and softmax are not counted)."""

from __future__ import annotations


def dit_forward_macs(
    *, input_size, patch_size: int, in_channels: int, hidden_size: int, depth: int, mlp_ratio: float = 4.0,
    learn_sigma: bool = True, use_swiglu: bool = False, wo_shift: bool = False
) -> int:
    """Multiply-adds of one forward pass for one image. SwiGLU: three D x h products with h = 2/3 of the MLP width
    (about the MLP's two); wo_shift: 4 D modulation outputs per block instead of 6. RoPE and the norms are
    elementwise (not counted)."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    T = (h // patch_size) * (w // patch_size)
    D = hidden_size
    out_ch = in_channels * (2 if learn_sigma else 1)
    hidden_mlp = int(D * mlp_ratio)
    mlp = 3 * D * int(2 / 3 * hidden_mlp) if use_swiglu else 2 * D * hidden_mlp
    per_block = T * (3 * D * D + D * D + mlp) + 2 * T * T * D + (4 if wo_shift else 6) * D * D  # linears, attn, adaLN
    embed = T * D * in_channels * patch_size**2 + 256 * D + D * D
    final = T * D * patch_size**2 * out_ch + 2 * D * D
    return depth * per_block + embed + final


def dit_train_flops_per_image(**cfg) -> int:
    """FLOPs of one training step per image: backward ~ 2x forward, 2 FLOPs per multiply-add."""
    return 3 * 2 * dit_forward_macs(**cfg)


def model_cost_config(model) -> dict:
    """The arguments of :func:`dit_forward_macs` read off a built DiT."""
    return dict(
        input_size=model.input_size,
        patch_size=model.patch_size,
        in_channels=model.in_channels,
        hidden_size=model.hidden_size,
        depth=len(model.blocks),
        mlp_ratio=model.mlp_ratio,
        learn_sigma=model.learn_sigma,
        use_swiglu=model.options["use_swiglu"],
        wo_shift=model.options["wo_shift"],
    )
