"""Fused kernels (Triton) and their torch references."""

from .norm_modulate import kernels_available, layer_norm, norm_modulate, norm_modulate_reference

__all__ = ["kernels_available", "layer_norm", "norm_modulate", "norm_modulate_reference"]
