"""Pretrained files the project uses but never ships (the FID Inception network, DINOv2): where they are looked for,
when they are downloaded, and the one-line error that says where to put them; and ``package.module:factory`` specs.

A file given on the command line is used as is; otherwise the torch hub cache (``$TORCH_HOME/hub/checkpoints/``, where
``torch.hub`` itself keeps them); otherwise it is downloaded there when a network is there and OPENDIT_OFFLINE is not
set (torch.hub writes a temporary file and moves it into place only when complete, and checks the hash when the file
name carries one).
"""

from __future__ import annotations

import importlib
import os

import torch

from .errors import UserError, reason


def cache_path(file_name: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", file_name)


def weights_file(path: str | None, file_name: str, url: str, *, flag: str, what: str,
                 hash_prefix: str | None = None) -> str:
    """The file to load ``what`` from: ``path`` (``flag``'s value) when given, else the hub cache, downloading into it."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such file ({what}: {url})")
        return path
    cached = cache_path(file_name)
    if os.path.isfile(cached):
        return cached
    hint = f"download {url} and put it at {cached}, or pass {flag} PATH"
    if os.environ.get("OPENDIT_OFFLINE"):
        raise UserError(f"the {what} weights are not in {cached} and OPENDIT_OFFLINE is set; {hint}")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, cached, hash_prefix=hash_prefix, progress=True)
    except Exception as e:  # no network, HTTP error, a wrong hash
        raise UserError(f"cannot download the {what} weights ({reason(e)}); {hint}") from None
    return cached


def import_factory(spec: str, flag: str):
    """The callable ``attr`` of ``module`` for a ``module:attr`` spec (one line when it cannot be imported)."""
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{flag} {spec}: cannot import it ({e})") from None
