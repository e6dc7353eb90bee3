"""Calls of a module routed elsewhere for the duration of a ``with`` block: an instance's ``forward`` replaced, then
restored. An instance's own earlier replacement comes back too, so routings nest (a forward counter around the cached
steps around the compiled forward); the model itself is never changed."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def forwards_replaced(replacements):
    """``replacements``: (module, fn) pairs; within the block ``module.forward`` is ``fn`` (read the current
    ``module.forward`` first to wrap it)."""
    saved = []
    try:
        for module, fn in replacements:
            saved.append((module, module.__dict__.get("forward")))
            module.forward = fn
        yield
    finally:
        for module, own in reversed(saved):
            if own is None:
                del module.forward  # the class's method again
            else:
                module.forward = own
