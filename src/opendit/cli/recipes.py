"""Recipes as files: ``--config FILE`` (TOML) sets any flag of a program; the command line overrides it.

    # recipes/sit-xl-2-imagenet256.toml
    model = "DiT-XL/2"          # top-level keys: training flags (scripts/dit/train.py)
    objective = "flow"
    [sample]                    # sampling flags (sample_dit.py, sample_ddp.py)
    sampler = "sde"

Keys are the flags' names without the dashes (``lr``, ``cfg_interval = [0.0, 0.7]``, ``compile = true``). Each value is
checked like the flag itself (type, range, choices); an unknown key or a bad value is one line naming the file.
Training reads the top level and an optional ``[train]`` table; the sampling programs read ``[sample]`` (each skips
the keys only the other one has: num_samples, per_proc_batch_size, sample_dir, overwrite; labels, out).
"""

from __future__ import annotations

import argparse
import os

from ..errors import UserError


def read_toml(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UserError("--config needs Python 3.11+ (tomllib) or the tomli package") from None
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: not valid TOML ({e})") from None


def recipe_settings(data: dict, section: str) -> dict:
    """The settings a program reads from a recipe: ``train``: the top level plus [train]; ``sample``: [sample]."""
    if section == "train":
        settings = {k: v for k, v in data.items() if not isinstance(v, dict)}
        settings.update(data.get("train", {}))
        return settings
    return dict(data.get(section, {}))


def _as_argv(action: argparse.Action, value, where: str) -> list[str]:
    """One recipe entry as command-line words, checked like the flag."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise UserError(f"{where}: must be true or false, got {value!r}")
        return [flag] if value else []
    if action.nargs == "?" and value is True:
        return [flag]
    values = list(value) if isinstance(value, list) else [value]
    if isinstance(action.nargs, int) and len(values) != action.nargs:
        raise UserError(f"{where}: needs {action.nargs} values, got {value!r}")
    if not isinstance(action.nargs, int) and action.nargs not in ("+", "*") and isinstance(value, list):
        raise UserError(f"{where}: needs one value, got a list")
    words = []
    for v in values:
        if isinstance(v, (dict, list)):
            raise UserError(f"{where}: not a flag value: {v!r}")
        text = str(v).lower() if isinstance(v, bool) else str(v)
        if action.type is not None:
            try:
                checked = action.type(text)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                raise UserError(f"{where}: {e}") from None
        else:
            checked = text
        if action.choices is not None and checked not in action.choices:
            raise UserError(f"{where}: {v!r} is not one of {', '.join(map(str, action.choices))}")
        words.append(text)
    return [flag, *words]


# [sample] serves sample_dit.py and sample_ddp.py: what only one of them has is skipped by the other
SECTION_SHARED = {"sample": {"num_samples", "per_proc_batch_size", "sample_dir", "overwrite", "labels", "out"}}


def config_argv(parser: argparse.ArgumentParser, path: str, section: str) -> list[str]:
    """A recipe file's settings for ``parser`` as command-line words."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    argv = []
    for key, value in recipe_settings(read_toml(path), section).items():
        dest = key.replace("-", "_")
        if dest not in actions and dest in SECTION_SHARED.get(section, ()):
            continue
        if dest not in actions:
            raise UserError(f"--config {path}: unknown setting {key!r} for {parser.prog}"
                            + (" (sampling settings go in a [sample] table)" if section == "train" else ""))
        argv += _as_argv(actions[dest], value, f"--config {path}: {key}")
    return argv


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str], section: str):
    """(args, the effective command line): the recipe's settings first, then ``argv``, which overrides them."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args, list(argv)
    full = config_argv(parser, args.config, section) + list(argv)
    return parser.parse_args(full), full
