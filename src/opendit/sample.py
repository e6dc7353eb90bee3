"""Sample a DiT from any checkpoint.

    python scripts/dit/sample_dit.py --ckpt DiT-XL-2-256x256.pt --cfg_scale 4.0 --out sample.png
    python scripts/dit/sample_dit.py --ckpt outputs/000-DiT-XL-2 --sampler dpm-solver++ --num_sampling_steps 20

What the checkpoint determines (classes, channels, patch size, width, depth, token grid) is read from it; flags that
contradict it are errors. The published sampler is reproduced exactly with ``--sampler ddpm --num_sampling_steps 250
--guidance_channels 3`` and the same seed: torch.manual_seed(seed), then z = randn(n, C, H, W), then the loop.
"""

from __future__ import annotations

import argparse
import sys

from .errors import NONNEG_FLOAT, NONNEG_FLOAT_OR_INF, POSITIVE_FLOAT, POSITIVE_INT, SEED, UNIT_FLOAT, ArgumentParser, int_flag
from .objectives import OBJECTIVES
from .precision import PRECISIONS
from .program import run_main
from .recipes import add_config_flag, parse_with_config
from .sampling import SAMPLERS
from .sampling.grid import sample_grid
from .transport import DIFFUSION_FORMS, PATHS, PREDICTIONS


def add_model_flags(p: argparse.ArgumentParser, cfg_scale: float) -> None:
    """Flags shared by sample_dit.py and sample_ddp.py."""
    a = p.add_argument
    a("--ckpt", required=True, help="a bare state dict (.pt), ema.pt, .safetensors, epochX-global_stepY/model, a "
                                    "checkpoint directory or a run directory (its newest intact checkpoint)")
    a("--model", default=None, help="checked against the checkpoint (read from it when omitted)")
    a("--image_size", type=POSITIVE_INT, default=None, help="checked against the checkpoint's token grid (read from it when omitted)")
    a("--num_classes", type=POSITIVE_INT, default=None, help="checked against the checkpoint")
    a("--use_model_weights", action="store_true", help="the raw weights of a checkpoint directory instead of its EMA")
    a("--cfg_scale", type=NONNEG_FLOAT, default=cfg_scale, help="classifier-free guidance scale (1 = none)")
    a("--guidance_channels", type=POSITIVE_INT, default=None, help="guide only the first N epsilon channels (3 = the published sampler)")
    a("--sampler", default="auto", choices=["auto", *SAMPLERS],
      help="auto: ddpm for a diffusion model, ode for a flow; ddpm, ddim, dpm-solver++ (diffusion); ode, sde (flow)")
    a("--num_sampling_steps", type=int_flag(1, 1000), default=250,
      help="diffusion: steps; flow: points of the time grid (ode euler/heun: N - 1 steps; sde: N - 1 steps + the "
           "last step)")
    a("--cfg_interval", type=UNIT_FLOAT, nargs=2, default=None, metavar=("LO", "HI"),
      help="guidance only at times in [LO, HI] (0 = noise, 1 = data; a diffusion step k of 1000 is at 1 - k/1000); "
           "elsewhere the conditional prediction alone")
    a("--cfg_interval_sigma", type=NONNEG_FLOAT_OR_INF, nargs=2, default=None, metavar=("LO", "HI"),
      help="guidance only where the noise level sigma of the model's own schedule lies in [LO, HI] (the "
           "guidance-interval paper's axis; a flow's sigma is (1 - t) / t, a diffusion's sqrt(1 / abar_k - 1); HI may "
           "be inf); not with --cfg_interval")
    a("--cache_method", default="none", choices=["none", "fora", "taylorseer"],
      help="cached steps (off by default): between whole model calls, reuse each block's attention and MLP outputs "
           "(fora) or forecast them to first order in time (taylorseer)")
    a("--cache_interval", type=POSITIVE_INT, default=None,
      help="with --cache_method: every N-th model call runs whole (default 3)")
    a("--cache_warmup", type=POSITIVE_INT, default=None,
      help="with --cache_method: the first K model calls run whole (default 2)")
    a("--objective", default="auto", choices=["auto", *OBJECTIVES],
      help="what the checkpoint was trained as: auto = its run's config.json, else what its weights say (a flow "
           "never trains the variance channels), else diffusion")
    a("--path_type", default=None, choices=list(PATHS), help="flow, bare checkpoints: the path (default Linear)")
    a("--prediction", default=None, choices=list(PREDICTIONS),
      help="flow, bare checkpoints: the model's prediction (default velocity)")
    a("--sample_eps", type=UNIT_FLOAT, default=None, help="flow, bare checkpoints: the sampling interval's margin")
    a("--sampling_method", default=None,
      help="flow: ode: euler (default), heun (= heun2), or a torchdiffeq method (dopri5, rk4, ...; needs torchdiffeq);"
           " sde: Euler (default) or Heun")
    a("--timestep_shift", type=POSITIVE_FLOAT, default=None, help="flow: grid t -> s t / (1 + (s - 1) t) (default 1)")
    a("--atol", type=POSITIVE_FLOAT, default=None, help="flow ode, adaptive methods (default 1e-6)")
    a("--rtol", type=POSITIVE_FLOAT, default=None, help="flow ode, adaptive methods (default 1e-3)")
    a("--diffusion_form", default=None, choices=list(DIFFUSION_FORMS), help="flow sde: w(t) (default sigma)")
    a("--diffusion_norm", type=NONNEG_FLOAT, default=None, help="flow sde: scale of w(t) (default 1)")
    a("--last_step", default=None, choices=["Mean", "Tweedie", "Euler", "none"], help="flow sde (default Mean)")
    a("--last_step_size", type=UNIT_FLOAT, default=None, help="flow sde (default 0.04)")
    a("--clip_denoised", default="auto", choices=["auto", "yes", "no"],
      help="clamp the x0 prediction to [-1, 1]; auto: yes in pixel space, no in latent space (as published)")
    a("--vae", default="auto", help="auto (from the run or the image size), ema, mse, none, or a diffusers AutoencoderKL folder")
    a("--latent_stats", default=None,
      help="per-channel latent statistics of a model trained on normalized latents (default: the run's config.json): "
           "a latents folder, or a torch file with 'mean' and 'std' (LightningDiT's latents_stats.pt)")
    a("--latent_multiplier", type=POSITIVE_FLOAT, default=None, help="with --latent_stats (default: the run's, or 1)")
    a("--mixed_precision", default="fp32", choices=list(PRECISIONS))
    a("--enable_flashattn", action="store_true")
    a("--compile", action="store_true",
      help="torch.compile the model's forward (one graph, compiled at the first batch of each shape)")
    a("--cuda_graphs", action="store_true", help="with --compile on a GPU: replay the compiled forward as CUDA graphs")
    a("--seed", type=SEED, default=0)
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_config_flag(p)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Sample a grid of images from a DiT checkpoint.")
    add_model_flags(p, cfg_scale=4.0)
    p.add_argument("--labels", default=None, help="comma-separated class indices (default: a fixed set)")
    p.add_argument("--out", default="sample.png", help="the grid PNG (one row per label)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    return run_main(lambda _: sample_grid(parse_with_config(parser, sys.argv[1:] if argv is None else list(argv),
                                                      section="sample")[0]), None)


if __name__ == "__main__":
    sys.exit(main())
