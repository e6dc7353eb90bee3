"""Atomic writes: a file (or folder) appears complete under its name, or not at all.

Every output a user or a later run reads (checkpoints' config and manifest, sample PNGs and .npz files, latent
shards, statistics, grids, converted weights) is written to a temporary name beside its destination and renamed over
it only once complete; an error or a kill in between leaves the destination as it was and removes the temporary.
"""

from __future__ import annotations

import contextlib
import os
import shutil


def temporary_name(path: str) -> str:
    """``a/b.npz`` -> ``a/b.tmp.npz``: beside the destination (the same file system, so the rename is atomic), with
    the same extension (numpy and PIL choose the format from it)."""
    root, ext = os.path.splitext(path)
    return f"{root}.tmp{ext}"


def fsync_path(path: str) -> None:
    """Flush a file's (or a folder's entries') data to disk; ignored where the file system cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: str, *, durable: bool = False, tmp: str | None = None):
    """Yield a temporary path to write ``path``'s content to (a file or a folder); on success it is renamed over
    ``path`` (``durable``: flushed to disk first; a folder at ``path`` is moved aside first and removed after), on any
    exception removed. ``tmp`` overrides the temporary name."""
    tmp = tmp or temporary_name(path)
    _remove(tmp)  # what an interrupted earlier write left behind
    try:
        yield tmp
        if durable and os.path.isfile(tmp):
            fsync_path(tmp)
        replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def replace(src: str, dst: str) -> None:
    """Rename the complete ``src`` over ``dst``; a folder at ``dst`` is moved aside first and removed after (a folder
    cannot be renamed over a non-empty one), so ``dst`` is at every moment either the old or the new content."""
    if os.path.isdir(dst) and not os.path.islink(dst):
        old = src + ".old"
        _remove(old)
        os.replace(dst, old)
        os.replace(src, dst)
        _remove(old)
    else:
        os.replace(src, dst)


def write_text_atomic(path: str, text: str, *, durable: bool = True) -> None:
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)
