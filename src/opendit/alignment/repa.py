"""Representation alignment (REPA, Yu et al., 2024) as an auxiliary loss of the training step.

The DiT's tokens after block ``depth`` (1 = the first block) go through one projector per encoder, an MLP
Linear(D, W) - SiLU - Linear(W, W) - SiLU - Linear(W, d_enc) with W = 2048 as published, and are pulled towards the
frozen encoder's patch features of the clean image:

    loss = mean over encoders, batch and tokens of  -cos(projector(h_t), z_t)

and the step minimizes objective + lambda * loss (lambda 0.5 published). The projectors are trained with the model:
they are attached to it as ``model.projectors`` (so data parallelism, the optimizer, resume and the optimizer state
cover them) but are not part of the sampled model: the EMA skips them, and checkpoints keep them in their own file
(``projector/projector.safetensors``), so ``ema.pt`` and ``model/`` keep the published DiT layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .encoders import build_encoders, encode, match_grid, parse_specs
from ..models import TRAINING_ONLY

PREFIX = TRAINING_ONLY[0]  # the projectors' state dict keys "projectors." (REPA's release uses the same name)
SETTINGS = ("repa_encoder_weights", "repa_depth", "repa_lambda", "repa_projector_dim")  # need --repa_encoder


def build_projector(hidden_size: int, width: int, feature_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, feature_dim))


def attach_projectors(model: nn.Module, feature_dims: list[int], width: int, seed: int) -> nn.ModuleList:
    """``model.projectors``: one projector per encoder, xavier-uniform weights and zero biases (as the DiT's linear
    layers), drawn from ``seed`` alone (the same on every rank, whatever else used the global generator)."""
    hidden = model.hidden_size
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projectors = nn.ModuleList(build_projector(hidden, width, d) for d in feature_dims)
        for m in projectors.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    model.projectors = projectors.to(device)
    return model.projectors


def alignment_loss(projected: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Mean over encoders, batch and tokens of the negative cosine similarity; each pair (N, T, d_k), computed in
    fp32 (the projections may come out of autocast in bf16)."""
    losses = [-(F.normalize(p.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1).mean()
              for p, z in zip(projected, targets, strict=True)]
    return torch.stack(losses).mean()


class RepaLoss:
    """The auxiliary loss the training step calls (see opendit.training.step): ``hidden`` holds the tokens after
    block ``depth``; ``batch.features`` the encoders' features of the batch's clean images."""

    name = "repa"

    def __init__(self, projectors: nn.ModuleList, depth: int, weight: float, grid: tuple[int, int]):
        self.projectors, self.weight, self.grid = projectors, float(weight), tuple(grid)
        self.depth, self.depths = depth, (depth,)

    def __call__(self, hidden: dict, batch) -> torch.Tensor:
        h = hidden[self.depth]  # (N, T, D)
        targets = [match_grid(z, self.grid) for z in batch.features]
        return alignment_loss([p(h) for p in self.projectors], targets)


@dataclass
class Alignment:
    """A run's REPA: the loss, and the encoders (None when the data set brings precomputed features)."""

    loss: RepaLoss
    encoders: list | None
    names: list[str]

    @property
    def stored(self) -> bool:
        """The features come with the data (precomputed latents): no encoder runs."""
        return self.encoders is None

    def features(self, images: torch.Tensor | None, precomputed: list | None, precision, device) -> list[torch.Tensor]:
        if self.stored:
            return [z.to(device, non_blocking=True) for z in precomputed]
        with precision.autocast():
            return encode(self.encoders, images)

    def describe(self) -> str:
        where = "precomputed with the latents" if self.stored else "encoded in the loop"
        return (f"REPA: tokens after block {self.loss.depth} aligned to {', '.join(self.names)} ({where}), "
                f"lambda {self.loss.weight:g}")


def setup_alignment(cfg, model: nn.Module, dataset, device) -> Alignment | None:
    """REPA for a run (``cfg``: its TrainConfig; None without --repa_encoder): the encoders, or the data set's
    precomputed features, and the projectors attached to ``model``. Call after building the model, before
    parallelizing it and its optimizer."""
    a = cfg.alignment
    names = parse_specs(a.repa_encoder)
    if not names:
        return None
    depth = len(model.blocks)
    if not 1 <= a.repa_depth <= depth:
        raise UserError(f"--repa_depth {a.repa_depth}: {cfg.model.model} has blocks 1..{depth} (published: 8 for L "
                        f"and XL, 4 for B)")
    stored = getattr(dataset, "encoder_names", None)
    if stored is not None or cfg.data.dataset == "latents":
        if stored != names:
            raise UserError(f"--repa_encoder {a.repa_encoder}: the latents in {cfg.data.data_path} hold features of "
                            f"{', '.join(stored) if stored else 'no encoder'}; extract them with --repa_encoder "
                            f"{a.repa_encoder} (scripts/dit/extract_features.py)")
        if a.repa_encoder_weights:
            raise UserError("--repa_encoder_weights: the latents bring precomputed features; no encoder is loaded")
        encoders, dims = None, list(dataset.encoder_dims)
    else:
        image_size = cfg.data.image_size or getattr(dataset, "image_size", None)
        encoders = build_encoders(a.repa_encoder, a.repa_encoder_weights, device, image_size)
        dims = [e.feature_dim for e in encoders]
    projectors = attach_projectors(model, dims, a.repa_projector_dim, seed=cfg.optim.global_seed + 1)
    return Alignment(RepaLoss(projectors, a.repa_depth, a.repa_lambda, model.x_embedder.grid_size), encoders, names)


def check_alignment_settings(a, given: set[str] | None) -> None:
    """REPA's settings (``a``: AlignmentSettings) given without --repa_encoder are an error."""
    if given is None or parse_specs(a.repa_encoder):
        return
    if unused := [k for k in SETTINGS if k in given]:
        raise UserError(f"--{unused[0]} is a REPA setting; add --repa_encoder (e.g. dinov2-vit-b)")
