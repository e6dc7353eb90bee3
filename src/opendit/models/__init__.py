"""The DiT model family: ``DiTConfig`` (what a DiT is) and ``DiT`` (the plain nn.Module it builds)."""

from .config import (
    BLOCK_OPTIONS,
    DIT_SIZES,
    LIGHTNING_NAMES,
    MODEL_NAMES,
    PUBLISHED_MODELS,
    DiTConfig,
    block_options_problem,
    config_from_state_dict,
    model_config,
    unknown_model,
)
from .dit import (
    ATTENTION_IMPLS,
    TRAINING_ONLY,
    sampling_weights,
    AttentionBackendError,
    DiT,
    DiT_models,
    sincos_2d,
    timestep_sinusoid,
)

__all__ = [
    "ATTENTION_IMPLS",
    "BLOCK_OPTIONS",
    "DIT_SIZES",
    "LIGHTNING_NAMES",
    "MODEL_NAMES",
    "PUBLISHED_MODELS",
    "TRAINING_ONLY",
    "AttentionBackendError",
    "DiT",
    "DiTConfig",
    "DiT_models",
    "block_options_problem",
    "config_from_state_dict",
    "model_config",
    "sincos_2d",
    "timestep_sinusoid",
    "sampling_weights",
    "unknown_model",
]
