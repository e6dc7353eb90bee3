"""Sample grids: one labelled row per class, as a PNG."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..distributed import pick_device
from ..errors import UserError
from ..images import labelled_grid, save_image_atomic
from ..parallelize import ModelOptions
from ..precision import Precision
from ..space import Space
from .compiled import check_fast_flags, compiled_forward
from .generate import describe_settings, generate, quick_sampler
from .load import clip_for, load_for_sampling, sampler_settings

PUBLISHED_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # the published sample.py's ImageNet classes


def parse_labels(text: str | None, num_classes: int) -> list[int]:
    if text is None:
        if num_classes == 1000:
            return list(PUBLISHED_LABELS)
        return list(range(num_classes)) if num_classes <= 16 else [round(i * (num_classes - 1) / 7) for i in range(8)]
    try:
        labels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--labels must be a comma-separated list of class indices, got {text!r}") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    if not labels or bad:
        raise UserError(f"--labels: class {bad[0] if bad else '?'} is outside 0..{num_classes - 1}")
    return labels


@torch.no_grad()
def write_sample_grid(path: str, model, space: Space, *, num_classes: int, class_names, per_class: int,
                      cfg_scale: float, device, seed: int, precision: Precision, objective=None) -> None:
    """``per_class`` EMA samples of (up to) 10 classes, 20 model evaluations (``quick_sampler``: DPM-Solver++ 20
    steps for the diffusion, Heun for a flow) from noise seeded by ``seed``, one row per class: the grid a training
    run ends with."""
    classes = list(range(num_classes)) if num_classes <= 10 else list(np.linspace(0, num_classes - 1, 10).round().astype(int))
    labels = torch.tensor([c for c in classes for _ in range(per_class)], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn((len(labels), space.channels, *space.input_size), generator=g, device=device)
    with precision.autocast():  # the training precision (flash attention needs bf16/fp16)
        out = generate(model, labels, z, cfg_scale=cfg_scale, **quick_sampler(objective))
    save_image_atomic(labelled_grid(space.to_images(out.float()), labels.tolist(), class_names), path)


def draw_grid(loaded, cfg, device, precision: Precision, *, progress: bool = False):
    """The labelled grid of a GridConfig's settings (sampler, guidance, cached steps, labels, seed) from a loaded
    checkpoint: (the PIL image, its labels, ``generate``'s settings). What sample_dit.py writes and ``opendit serve``
    shows: torch.manual_seed(seed), then z = randn(n, C, H, W), then the sampler."""
    settings = sampler_settings(cfg, loaded)
    labels = parse_labels(cfg.output.labels, loaded.num_classes)
    torch.manual_seed(cfg.sampler.seed)
    y = torch.tensor(labels, device=device)
    z = torch.randn(len(labels), loaded.in_channels, *loaded.input_size, device=device)
    machine = cfg.machine
    with precision.autocast(), compiled_forward(loaded.model, cuda_graphs=machine.cuda_graphs, enabled=machine.compile):
        x = generate(loaded.model, y, z, clip_denoised=clip_for(cfg, loaded), progress=progress, **settings)
    return labelled_grid(loaded.space.to_images(x.float()), labels, loaded.class_names), labels, settings


def sample_grid(cfg) -> int:
    """The body of sample_dit.py (``cfg``: a GridConfig): a labelled grid PNG of samples from a checkpoint."""
    machine, out = cfg.machine, cfg.output
    device = pick_device(machine.device, 0)
    precision = Precision(machine.mixed_precision, device)
    check_fast_flags(machine, cfg.cache, device)
    loaded = load_for_sampling(cfg.checkpoint, ModelOptions.from_config(machine), device, precision)
    grid, labels, settings = draw_grid(loaded, cfg, device, precision, progress=True)
    if os.path.dirname(out.out):
        os.makedirs(os.path.dirname(out.out), exist_ok=True)
    save_image_atomic(grid, out.out)
    print(f"{loaded.name} from {loaded.source} ({loaded.objective_note}): {len(labels)} samples, "
          f"{describe_settings(settings)} -> {out.out}")
    return 0
