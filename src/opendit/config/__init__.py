"""Typed configuration: programs parse their command line (and a TOML recipe) once into these objects."""

from .fields import CHANGE, MACHINE, RESUME_CLASSES, RUN, Config, section, setting
from .train import TrainConfig

__all__ = ["CHANGE", "MACHINE", "RESUME_CLASSES", "RUN", "Config", "TrainConfig", "section", "setting"]
from .sample import FolderConfig, GridConfig, ServeConfig  # noqa: E402

__all__ += ["FolderConfig", "GridConfig", "ServeConfig"]
