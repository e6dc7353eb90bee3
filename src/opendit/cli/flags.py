"""The command line of a typed config (opendit.config): one flag per setting, grouped by section in --help, parsed
once here, at the program's edge, with a TOML recipe (``--config``; opendit.cli.recipes) under it."""

from __future__ import annotations

import argparse
import sys

from ..config.fields import Config, default_of, is_switch
from ..errors import UserError
from .recipes import parse_with_config

_UNSET = object()


def add_settings(parser: argparse.ArgumentParser, config_cls: type[Config]) -> None:
    """A flag ``--name`` for every setting of ``config_cls``, in an argument group per section."""
    for name, title, sec in config_cls.sections():
        group = parser.add_argument_group(title)
        for _, f in [(s, f) for s, f in config_cls.settings() if s == name]:
            m = f.metadata
            if is_switch(f):
                group.add_argument(f"--{f.name}", action="store_true", help=m["help"] or None)
                continue
            kw = {k: m[k] for k in ("type", "nargs", "const", "metavar") if m.get(k) is not None}
            if m.get("choices") is not None:
                kw["choices"] = list(m["choices"])
            if m.get("required"):
                kw["required"] = True
            else:
                kw["default"] = default_of(f)
            group.add_argument(f"--{f.name}", help=m["help"] or None, **kw)


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the options that ``argv`` sets explicitly (argparse fills in a default only for a
    destination its namespace lacks, so a namespace pre-filled with a sentinel tells given from defaulted)."""
    blank = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != argparse.SUPPRESS})
    parsed = parser.parse_args(sys.argv[1:] if argv is None else argv, namespace=blank)
    return {k for k, v in vars(parsed).items() if v is not _UNSET}


def parse_config(config_cls: type[Config], parser: argparse.ArgumentParser, argv: list[str], section: str):
    """(the config, the settings given on the command line or in the recipe, the effective command line)."""
    args, effective = parse_with_config(parser, argv, section=section)
    return config_cls.from_flat(vars(args)), given_flags(parser, effective), effective


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def checking_parser(config_cls: type[Config]):
    """``parse(argv) -> config`` for command lines that come from elsewhere than a terminal (``opendit serve``'s
    requests, tests, notebooks): ``config_cls``'s flags, no recipe, a bad value raised as one UserError line (the
    message argparse would print) instead of printed and exited on."""
    parser = _RaisingParser(add_help=False, allow_abbrev=False)
    add_settings(parser, config_cls)
    return lambda argv: config_cls.from_flat(vars(parser.parse_args(argv)))


def parse_argv(config_cls: type[Config], argv: list[str]) -> Config:
    """The config of a command line alone (no recipe), as a program parses it: for tests and notebooks."""
    return checking_parser(config_cls)(argv)
