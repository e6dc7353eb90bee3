"""Convert DiT weights between the formats people use.

    opendit convert outputs/000-DiT-XL-2 dit-xl2.safetensors          # a run's newest EMA weights -> safetensors
    opendit convert DiT-XL-2-256x256.pt dit-xl2-diffusers/              # published .pt -> diffusers folder
    opendit convert dit-xl2-diffusers/ DiT-XL-2-256x256.pt               # and back

Sources: anything sampling accepts (a run or checkpoint directory, its model/ folder, ema.pt, a published bare .pt, a
.safetensors state dict) and a diffusers ``DiTTransformer2DModel`` folder (config.json + diffusion_pytorch_model.*).
The target format follows from DST (``.pt``/``.pth``: a bare state dict loadable with weights_only=True, as published;
``.safetensors``; a folder: diffusers) or ``--format``. Tensors are copied exactly; files are written atomically.

diffusers' DiTTransformer2DModel keeps one copy of the timestep and label embedders per block (all equal after a
conversion) and computes the timestep frequencies as exp(-ln(10000) k / 127) where the DiT release uses k / 128; the
exported config sets norm_eps to the release's 1e-6, so the only numerical difference is that frequency convention
(``model.t_embedder.freq_shift = 1`` reproduces diffusers exactly).
"""

from __future__ import annotations

import sys

from ..conversion import FORMATS, convert
from ..errors import POSITIVE_INT
from .program import ArgumentParser, run_main


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Convert DiT weights: opendit checkpoints, published .pt, .safetensors, diffusers.")
    p.add_argument("src", help="run / checkpoint directory, ema.pt, .pt, .safetensors, or a diffusers folder")
    p.add_argument("dst", help="*.pt, *.safetensors, or a folder (diffusers)")
    p.add_argument("--format", choices=FORMATS, default=None, help="override the format DST's name implies")
    p.add_argument("--model_weights", action="store_true", help="from a checkpoint: the raw weights instead of the EMA")
    p.add_argument("--num_heads", type=POSITIVE_INT, default=None, help="attention heads, for widths outside the DiT family")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    return p


def main(argv=None) -> int:
    return run_main(lambda args: convert(**vars(args)), build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
