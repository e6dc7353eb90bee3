"""Typed configuration: a program's settings are a dataclass of sections, each section a dataclass of settings.

    @dataclass
    class OptimSettings:
        lr: float = setting(1e-4, "peak learning rate", type=POSITIVE_FLOAT, resume=CHANGE)

    @dataclass
    class TrainConfig(Config):
        optim: OptimSettings = section(OptimSettings, "optimization")

A setting is one field: its default, its help, how the command line and a TOML recipe spell it (``--lr``; the flag
name is the field name, unique across sections), and, for a training run, its resume class:

    RUN      defines the run: a resumed run keeps it; a different value on the command line is an error
    CHANGE   may change on resume: the run's value unless given; a given different value is applied and recorded
    MACHINE  describes this session's machine: always this command line's

The command line and recipe files are parsed once, at the program's edge (opendit.cli.flags); library code gets
these objects or plain arguments. config.json keeps the flat mapping (``Config.flat``): flag name -> value.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

RUN, CHANGE, MACHINE = "run", "change", "machine"
RESUME_CLASSES = (RUN, CHANGE, MACHINE)


def setting(default=None, help: str = "", *, resume: str | None = None, type=None, choices=None, nargs=None,
            const=None, metavar=None, required: bool = False):
    """One setting (a dataclass field). ``type``: the argparse type (a checker such as POSITIVE_INT); a bool with
    default False and no type is a switch (``--flag``)."""
    if resume is not None and resume not in RESUME_CLASSES:
        raise ValueError(f"unknown resume class {resume!r}")
    meta = dict(help=help, resume=resume, type=type, choices=tuple(choices) if choices is not None else None,
                nargs=nargs, const=const, metavar=metavar, required=required)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls, title: str):
    """A section of a config: a dataclass of settings, with a title for --help."""
    return field(default_factory=cls, metadata={"section": title})


def is_switch(f: dataclasses.Field) -> bool:
    return f.default is False and f.metadata.get("type") is None and f.metadata.get("nargs") is None


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@dataclass
class Config:
    """The root of a program's settings: its fields are sections."""

    @classmethod
    def sections(cls) -> list[tuple[str, str, type]]:
        """(name, title, section class) of each section, in order."""
        return [(f.name, f.metadata["section"], f.default_factory) for f in dataclasses.fields(cls)
                if "section" in f.metadata]

    @classmethod
    def settings(cls) -> list[tuple[str, dataclasses.Field]]:
        """(section name, field) of every setting, in order; names are unique across sections."""
        out, seen = [], set()
        for name, _, sec in cls.sections():
            for f in dataclasses.fields(sec):
                if f.name in seen:
                    raise TypeError(f"{cls.__name__}: setting {f.name!r} is in two sections")
                seen.add(f.name)
                out.append((name, f))
        return out

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for _, f in cls.settings()]

    @classmethod
    def with_resume(cls, resume: str) -> tuple[str, ...]:
        return tuple(f.name for _, f in cls.settings() if f.metadata.get("resume") == resume)

    def _owner(self, name: str):
        for sec, f in self.settings():
            if f.name == name:
                return getattr(self, sec)
        raise KeyError(f"{type(self).__name__} has no setting {name!r}")

    def get(self, name: str):
        return getattr(self._owner(name), name)

    def set(self, name: str, value) -> None:
        setattr(self._owner(name), name, value)

    def flat(self) -> dict:
        """Every setting by its flag name (what config.json keeps)."""
        return {f.name: getattr(getattr(self, sec), f.name) for sec, f in self.settings()}

    @classmethod
    def from_flat(cls, values: dict):
        """The config of a flat mapping (parsed flags, or a config.json of any age): unknown keys are ignored, absent
        settings take their defaults."""
        cfg = cls()
        for sec, f in cls.settings():
            if f.name in values:
                setattr(getattr(cfg, sec), f.name, values[f.name])
        return cfg
