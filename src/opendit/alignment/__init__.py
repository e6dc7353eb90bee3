"""Representation alignment (REPA): frozen encoders, the projectors and the alignment loss of the training step."""

from .encoders import ENCODER_NAMES, build_encoders, encode, match_grid, parse_specs
from .repa import (PREFIX, Alignment, RepaLoss, alignment_loss, attach_projectors,
                   build_projector, check_alignment_settings, setup_alignment)

__all__ = ["ENCODER_NAMES", "PREFIX", "Alignment", "RepaLoss", "alignment_loss",
           "attach_projectors", "build_encoders", "build_projector", "check_alignment_settings", "encode", "match_grid",
           "parse_specs", "setup_alignment"]
