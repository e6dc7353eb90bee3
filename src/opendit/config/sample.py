"""The settings of the sampling programs: a grid (scripts/dit/sample_dit.py, ``opendit sample``) and a sample folder
for evaluation (scripts/dit/sample_ddp.py, ``opendit sample-ddp``). Both read a recipe's [sample] table."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import (NONNEG_FLOAT, NONNEG_FLOAT_OR_INF, POSITIVE_FLOAT, POSITIVE_INT, POSITIVE_INT_OR_AUTO, SEED,
                      UNIT_FLOAT, int_flag)
from ..objectives import OBJECTIVES, SAMPLERS
from ..precision import PRECISIONS
from ..transport import DIFFUSION_FORMS, PATHS, PREDICTIONS
from .fields import Config, section, setting


@dataclass
class CheckpointSettings:
    """Which weights, and what the checkpoint is (read from it; a given value is checked against it)."""

    ckpt: str = setting(None, "a bare state dict (.pt), ema.pt, .safetensors, epochX-global_stepY/model, a checkpoint "
                              "directory or a run directory (its newest intact checkpoint)", required=True)
    use_model_weights: bool = setting(False, "the raw weights of a checkpoint directory instead of its EMA")
    model: str | None = setting(None, "checked against the checkpoint (read from it when omitted)")
    image_size: int | None = setting(None, "checked against the checkpoint's token grid (read from it when omitted)",
                                     type=POSITIVE_INT)
    num_classes: int | None = setting(None, "checked against the checkpoint", type=POSITIVE_INT)
    objective: str = setting("auto", "what the checkpoint was trained as: auto = its run's config.json, else what its "
                                     "weights say (a flow never trains the variance channels), else diffusion",
                             choices=["auto", *OBJECTIVES])
    path_type: str | None = setting(None, "flow, bare checkpoints: the path (default Linear)", choices=list(PATHS))
    prediction: str | None = setting(None, "flow, bare checkpoints: the model's prediction (default velocity)",
                                     choices=list(PREDICTIONS))
    sample_eps: float | None = setting(None, "flow, bare checkpoints: the sampling interval's margin", type=UNIT_FLOAT)
    vae: str = setting("auto", "auto (from the run or the image size), ema, mse, none, or a diffusers AutoencoderKL "
                               "folder")
    latent_stats: str | None = setting(
        None, "per-channel latent statistics of a model trained on normalized latents (default: the run's "
              "config.json): a latents folder, or a torch file with 'mean' and 'std' (LightningDiT's latents_stats.pt)")
    latent_multiplier: float | None = setting(None, "with --latent_stats (default: the run's, or 1)",
                                              type=POSITIVE_FLOAT)

    @property
    def flow_flags(self) -> dict:
        return {"path_type": self.path_type, "prediction": self.prediction, "sample_eps": self.sample_eps}


@dataclass
class SamplerSettings:
    sampler: str = setting("auto", "auto: ddpm for a diffusion model, ode for a flow; ddpm, ddim, dpm-solver++ "
                                   "(diffusion); ode, sde (flow)", choices=["auto", *SAMPLERS])
    num_sampling_steps: int | None = setting(
        None, "diffusion: steps; flow: points of the time grid (ode euler/heun: N - 1 steps; sde: N - 1 steps + the "
              "last step); meanflow: network calls (default: 250; meanflow 1)", type=int_flag(1, 1000))
    seed: int = setting(0, "", type=SEED)
    clip_denoised: str = setting("auto", "clamp the x0 prediction to [-1, 1]; auto: yes in pixel space, no in latent "
                                         "space (as published)", choices=["auto", "yes", "no"])
    # a flow's sampler options (None: the sampler's default)
    sampling_method: str | None = setting(
        None, "flow: ode: euler (default), heun (= heun2), or a torchdiffeq method (dopri5, rk4, ...; needs "
              "torchdiffeq); sde: Euler (default) or Heun")
    timestep_shift: float | None = setting(None, "flow: grid t -> s t / (1 + (s - 1) t) (default 1)",
                                           type=POSITIVE_FLOAT)
    atol: float | None = setting(None, "flow ode, adaptive methods (default 1e-6)", type=POSITIVE_FLOAT)
    rtol: float | None = setting(None, "flow ode, adaptive methods (default 1e-3)", type=POSITIVE_FLOAT)
    diffusion_form: str | None = setting(None, "flow sde: w(t) (default sigma)", choices=list(DIFFUSION_FORMS))
    diffusion_norm: float | None = setting(None, "flow sde: scale of w(t) (default 1)", type=NONNEG_FLOAT)
    last_step: str | None = setting(None, "flow sde (default Mean)", choices=["Mean", "Tweedie", "Euler", "none"])
    last_step_size: float | None = setting(None, "flow sde (default 0.04)", type=UNIT_FLOAT)

    OPTIONS = ("sampling_method", "timestep_shift", "atol", "rtol", "diffusion_form", "diffusion_norm", "last_step",
               "last_step_size")

    @property
    def options(self) -> dict:
        """The sampler options given (not None)."""
        return {k: getattr(self, k) for k in self.OPTIONS if getattr(self, k) is not None}


@dataclass
class GuidanceSettings:
    DEFAULT_SCALE = 4.0  # --cfg_scale not given (a model with guidance trained in: 1)

    cfg_scale: float | None = setting(None, "classifier-free guidance scale (1 = none; default 4.0, or 1 for a model "
                                            "with guidance trained in)", type=NONNEG_FLOAT)
    guidance_channels: int | None = setting(None, "guide only the first N epsilon channels (3 = the published "
                                                  "sampler)", type=POSITIVE_INT)
    cfg_interval: list | None = setting(
        None, "guidance only at times in [LO, HI] (0 = noise, 1 = data; a diffusion step k of 1000 is at 1 - k/1000); "
              "elsewhere the conditional prediction alone", type=UNIT_FLOAT, nargs=2, metavar=("LO", "HI"))
    cfg_interval_sigma: list | None = setting(
        None, "guidance only where the noise level sigma of the model's own schedule lies in [LO, HI] (the "
              "guidance-interval paper's axis; a flow's sigma is (1 - t) / t, a diffusion's sqrt(1 / abar_k - 1); HI "
              "may be inf); not with --cfg_interval", type=NONNEG_FLOAT_OR_INF, nargs=2, metavar=("LO", "HI"))


@dataclass
class FolderGuidanceSettings(GuidanceSettings):
    DEFAULT_SCALE = 1.5

    cfg_scale: float | None = setting(None, "classifier-free guidance scale (1 = none; default 1.5, or 1 for a model "
                                            "with guidance trained in)", type=NONNEG_FLOAT)


@dataclass
class CacheSettingsSection:
    cache_method: str = setting("none", "cached steps (off by default): between whole model calls, reuse each "
                                        "block's attention and MLP outputs (fora) or forecast them to first order in "
                                        "time (taylorseer)", choices=["none", "fora", "taylorseer"])
    cache_interval: int | None = setting(None, "with --cache_method: every N-th model call runs whole (default 3)",
                                         type=POSITIVE_INT)
    cache_warmup: int | None = setting(None, "with --cache_method: the first K model calls run whole (default 2)",
                                       type=POSITIVE_INT)


@dataclass
class SamplingMachineSettings:
    mixed_precision: str = setting("fp32", "", choices=list(PRECISIONS))
    enable_flashattn: bool = setting(False, "")
    compile: bool = setting(False, "torch.compile the model's forward (one graph, compiled at the first batch of "
                                   "each shape)")
    cuda_graphs: bool = setting(False, "with --compile on a GPU: replay the compiled forward as CUDA graphs")
    device: str = setting("auto", "", choices=["auto", "cpu", "cuda"])
    config: str | None = setting(None, "a TOML recipe file setting any of these flags (keys without dashes) in its "
                                       "[sample] table; the command line overrides it (see recipes/)")


@dataclass
class GridOutput:
    labels: str | None = setting(None, "comma-separated class indices (default: a fixed set)")
    out: str = setting("sample.png", "the grid PNG (one row per label)")


@dataclass
class FolderOutput:
    num_samples: int = setting(50_000, "", type=POSITIVE_INT)
    per_proc_batch_size: object = setting(
        32, "samples per batch and process, or auto: the largest power of two that fits the GPU (measured by two short "
            "probe runs; 32 on a CPU). Batch b is seeded from (seed, b): the batch size is part of the samples' "
            "settings", type=POSITIVE_INT_OR_AUTO)
    sample_dir: str | None = setting(None, "PNGs go here, DIR.npz beside it (default: samples/ plus a name made of "
                                           "the settings)")
    overwrite: bool = setting(False, "replace a --sample_dir that holds samples of other settings (once the new ones "
                                     "are complete)")


@dataclass
class SamplingConfig(Config):
    """What both sampling programs are told: the checkpoint, the sampler, guidance, cached steps, the machine."""

    checkpoint: CheckpointSettings = section(CheckpointSettings, "checkpoint")
    sampler: SamplerSettings = section(SamplerSettings, "sampler")
    guidance: GuidanceSettings = section(GuidanceSettings, "guidance")
    cache: CacheSettingsSection = section(CacheSettingsSection, "cached steps")
    machine: SamplingMachineSettings = section(SamplingMachineSettings, "machine")


@dataclass
class GridConfig(SamplingConfig):
    """sample_dit.py: a labelled grid."""

    output: GridOutput = section(GridOutput, "output")


@dataclass
class FolderConfig(SamplingConfig):
    """sample_ddp.py: a sample folder and its .npz (guidance 1.5 by default)."""

    guidance: FolderGuidanceSettings = section(FolderGuidanceSettings, "guidance")
    output: FolderOutput = section(FolderOutput, "output")


@dataclass
class ServeSettings:
    host: str = setting("127.0.0.1", "the address to listen on (127.0.0.1: this machine only; 0.0.0.0 exposes the "
                                     "page to the network)")
    port: int = setting(7860, "the port (0: a free one, printed)", type=int_flag(0, 65535))
    max_images: int = setting(64, "the most images one request may draw", type=int_flag(1, 4096))
    per_class: int = setting(4, "the page's images per class at first", type=POSITIVE_INT)


@dataclass
class ServeConfig(SamplingConfig):
    """opendit serve: a checkpoint loaded once, sampled from a local web page. The sampler, guidance and seed flags
    are the page's settings at first (default: the 20-evaluation sampler of the training grids); cached steps and the
    machine apply to every request."""

    serve: ServeSettings = section(ServeSettings, "the page")
