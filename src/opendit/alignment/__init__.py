"""Representation alignment (REPA): frozen encoders, the projectors and the alignment loss of the training step."""

from .encoders import ENCODER_NAMES, build_encoders, encode, match_grid, parse_specs
from .repa import (PREFIX, Alignment, RepaLoss, add_alignment_flags, alignment_loss, attach_projectors,
                   build_projector, check_alignment_flags, setup_alignment)

__all__ = ["ENCODER_NAMES", "PREFIX", "Alignment", "RepaLoss", "add_alignment_flags", "alignment_loss",
           "attach_projectors", "build_encoders", "build_projector", "check_alignment_flags", "encode", "match_grid",
           "parse_specs", "setup_alignment"]
