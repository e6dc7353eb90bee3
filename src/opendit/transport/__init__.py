"""Flow matching (the SiT objective and samplers) with the conventional interface of the SiT lineage:
``create_transport(...)`` -> ``Transport`` (the training objective), ``Sampler(transport).sample_ode / sample_sde``.
Time runs from noise (t = 0) to data (t = 1)."""

from .meanflow import MeanFlow, create_meanflow
from .paths import DIFFUSION_FORMS, PATHS, GVPPath, LinearPath, Path, VPPath, expand_t_like
from .sampler import FIXED_ODE_METHODS, LAST_STEPS, SDE_METHODS, Sampler, SampleFn, shift_times, time_grid
from .transport import PREDICTIONS, TIME_SAMPLINGS, ModelType, Transport, WeightType, create_transport, prediction_of

__all__ = [
    "DIFFUSION_FORMS", "FIXED_ODE_METHODS", "MeanFlow", "create_meanflow", "GVPPath", "LAST_STEPS", "LinearPath", "ModelType", "PATHS", "PREDICTIONS", "Path",
    "SDE_METHODS", "SampleFn", "Sampler", "TIME_SAMPLINGS", "Transport", "VPPath", "WeightType", "create_transport",
    "expand_t_like", "prediction_of", "shift_times", "time_grid",
]
