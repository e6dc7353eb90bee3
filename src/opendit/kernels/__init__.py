"""Fused kernels (Triton) and their torch references."""

from .attention_jvp import attention_jvp, attention_jvp_reference
from .gated_residual import gated_residual, gated_residual_reference
from .norm_modulate import kernels_available, layer_norm, norm_modulate, norm_modulate_reference

__all__ = ["attention_jvp", "attention_jvp_reference", "gated_residual", "gated_residual_reference", "kernels_available", "layer_norm", "norm_modulate",
           "norm_modulate_reference"]
