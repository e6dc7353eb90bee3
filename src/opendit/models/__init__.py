"""The DiT model family."""

from .dit import (
    ATTENTION_IMPLS,
    DIT_SIZES,
    PUBLISHED_MODELS,
    AttentionBackendError,
    DiT,
    DiT_models,
    config_from_state_dict,
    model_config,
    sincos_2d,
    timestep_sinusoid,
)

__all__ = [
    "ATTENTION_IMPLS",
    "DIT_SIZES",
    "PUBLISHED_MODELS",
    "AttentionBackendError",
    "DiT",
    "DiT_models",
    "config_from_state_dict",
    "model_config",
    "sincos_2d",
    "timestep_sinusoid",
]
