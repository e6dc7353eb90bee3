"""The DiT model family."""

from .dit import (
    ATTENTION_IMPLS,
    BLOCK_OPTIONS,
    DIT_SIZES,
    LIGHTNING_NAMES,
    PUBLISHED_MODELS,
    AttentionBackendError,
    DiT,
    DiT_models,
    block_options_problem,
    config_from_state_dict,
    model_config,
    sincos_2d,
    timestep_sinusoid,
    unknown_model,
)

__all__ = [
    "ATTENTION_IMPLS",
    "BLOCK_OPTIONS",
    "DIT_SIZES",
    "LIGHTNING_NAMES",
    "PUBLISHED_MODELS",
    "AttentionBackendError",
    "DiT",
    "DiT_models",
    "block_options_problem",
    "config_from_state_dict",
    "model_config",
    "sincos_2d",
    "timestep_sinusoid",
    "unknown_model",
]
