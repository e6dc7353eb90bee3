"""Cached steps: training-free reuse of the blocks' features between a sampler's model calls.

Adjacent model calls of a sampler see nearly the same input, so each block's attention and MLP outputs change little
between them. With a cache, the first ``warmup`` model calls and then every ``interval``-th (counted from the last
warm-up call) run the whole model and keep those outputs; the calls in between run only the cheap parts (patch and
condition embeddings, each block's adaLN modulation, gates and residual adds, the final layer) and take each block's
attention and MLP outputs from the cache:

- ``fora``: the last computed outputs, as they are (FORA, Selvaraju et al. 2024: reuse of attention and MLP outputs);
- ``taylorseer``: a first-order forecast in time from the last two computed outputs,
  f(t) = f(t1) + (t - t1) (f(t1) - f(t0)) / (t1 - t0) (TaylorSeer, Liu et al. 2025, at order 1; with only one computed
  call so far, the last outputs as they are).

A model call whose batch differs from the cached one (entering or leaving a guidance interval, where the unguided
half runs alone) runs whole. Two computed calls at the same time (Heun's second evaluation at t and the next step's
first) keep only the later one, so a forecast never divides by a zero time difference. The model is not changed:
``FeatureCache.attach`` routes its calls for the duration of a ``with`` block (``routing``). Off (the default), nothing
is attached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .routing import forwards_replaced

METHODS = ("fora", "taylorseer")


@dataclass(frozen=True)
class CacheSettings:
    method: str  # fora | taylorseer
    interval: int = 3  # every interval-th model call runs the whole model (1: every call, i.e. no reuse)
    warmup: int = 2  # the first warmup model calls run whole

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown cache method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.interval < 1 or self.warmup < 1:
            raise ValueError("cache interval and warmup must be >= 1")

    def describe(self) -> str:
        return f"{self.method} cache (whole model every {self.interval} calls, first {self.warmup} whole)"


class FeatureCache:
    """One sampling run's cache of the blocks' attention and MLP outputs (see the module docstring)."""

    def __init__(self, settings: CacheSettings):
        self.settings = settings
        self.calls = 0  # model calls so far
        self.whole = 0  # of those, run whole
        self.whole_rows = 0  # batch rows through the whole model (sample-forwards)
        self.compute = True  # the current call runs whole
        self.t = None  # the current call's time
        self.batch = None  # the batch size of the cached features
        self.replace_last = False  # the current call replaces the last kept outputs (computed at the same time)
        self.times: list[float] = []  # the times of the computed features kept (the last two)
        self.features: dict[str, list[torch.Tensor]] = {}  # branch -> its outputs at self.times

    def begin_call(self, x: torch.Tensor, t: torch.Tensor) -> None:
        s, time = self.settings, float(t.reshape(-1)[0])
        due = self.calls < s.warmup or (self.calls - s.warmup + 1) % s.interval == 0  # interval after the last warm-up
        self.compute = due or len(x) != self.batch
        if self.compute and len(x) != self.batch:
            self.times, self.features, self.batch = [], {}, len(x)
        self.t, self.calls, self.whole = time, self.calls + 1, self.whole + int(self.compute)
        self.whole_rows += len(x) if self.compute else 0
        # a call computed at the time of the last kept one replaces it
        self.replace_last = self.compute and bool(self.times) and self.times[-1] == time
        if self.compute and not self.replace_last:
            self.times = (self.times + [time])[-2:]

    def branch(self, key: str, fn, *args) -> torch.Tensor:
        """The output of branch ``key`` (e.g. 'blocks.3.attn'): ``fn(*args)`` computed and kept, or from the cache."""
        if self.compute:
            out = fn(*args)
            kept = self.features.get(key, [])
            self.features[key] = ((kept[:-1] if self.replace_last else kept) + [out])[-2:]
            return out
        kept = self.features[key]
        if self.settings.method == "fora" or len(kept) < 2:
            return kept[-1]
        (t0, t1), (f0, f1) = self.times, kept
        # f1 + (f1 - f0) (t - t1) / (t1 - t0), as one kernel: lerp(f0, f1, w) = f0 + w (f1 - f0)
        return torch.lerp(f0, f1, 1.0 + (self.t - t1) / (t1 - t0))

    def attach(self, model):
        """A context: within it, calls of ``model.forward`` (also through ``forward_with_cfg``) and of each block's
        ``attn`` and ``mlp`` go through the cache."""
        forward = model.forward

        def cached_forward(x, t, *args, **kwargs):
            self.begin_call(x, t)
            return forward(x, t, *args, **kwargs)

        branches = [(getattr(block, name), f"blocks.{i}.{name}") for i, block in enumerate(model.blocks)
                    for name in ("attn", "mlp")]
        return forwards_replaced([(model, cached_forward)] + [(m, self._routed(key, m.forward)) for m, key in branches])

    def _routed(self, key: str, forward):
        return lambda *args: self.branch(key, forward, *args)


def cache_from_flags(method: str | None, interval: int | None, warmup: int | None) -> CacheSettings | None:
    """The sampling flags ``--cache_method`` (None / 'none': off), ``--cache_interval`` (default 3) and
    ``--cache_warmup`` (default 2); the last two without a method are an error, not ignored."""
    if method in (None, "none"):
        if interval is not None or warmup is not None:
            raise UserError(f"--cache_{'interval' if interval is not None else 'warmup'} applies to cached steps: add "
                            f"--cache_method fora or taylorseer")
        return None
    return CacheSettings(method, 3 if interval is None else interval, 2 if warmup is None else warmup)
