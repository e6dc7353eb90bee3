"""The fast sampling path, applied to a model from outside: its forward compiled into one graph by torch.compile
(Inductor), optionally replayed as CUDA graphs, and a batch size that fills the device.

    with compiled_forward(model, cuda_graphs=True):        # the samplers call model.forward as usual
        x = generate(model, labels, noise, ...)

Compilation happens at the first call of each input shape (a guided step's doubled batch, an unguided step's, the last
short batch) and is reused for every later batch of the process. Under CUDA graphs (torch.compile's
"reduce-overhead") the graph's output buffer is overwritten by the next replay, while samplers keep earlier outputs
(Heun's first slope, DPM-Solver++'s previous prediction): each output is copied out. The eager model is the reference
the compiled one is tested against (tests/test_fast_sampling.py).
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import UserError
from .routing import forwards_replaced


@contextlib.contextmanager
def compiled_forward(model, *, cuda_graphs: bool = False, enabled: bool = True):
    """Within the block, ``model.forward`` (and so ``forward_with_cfg``) runs compiled; the model is unchanged after.
    The compiled function is kept on the model (``model._sampling_compiled``), so later blocks reuse its graphs."""
    if not enabled:
        yield model
        return
    key = "reduce-overhead" if cuda_graphs else "default"
    store = model.__dict__.setdefault("_sampling_compiled", {})
    if key not in store:
        store[key] = torch.compile(type(model).forward.__get__(model), mode=key, dynamic=False)
    compiled = store[key]

    def forward(x, t, y, **kwargs):
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(x, t, y, **kwargs).clone()
        return compiled(x, t, y, **kwargs)

    with forwards_replaced([(model, forward)]):
        yield model


def check_fast_flags(machine, cache, device: torch.device) -> None:
    """--compile, --cuda_graphs and --cache_method together, on this device (``machine``, ``cache``: the sampling
    config's sections)."""
    if machine.cuda_graphs and not machine.compile:
        raise UserError("--cuda_graphs captures the compiled model: add --compile")
    if machine.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda_graphs needs a CUDA device (this run samples on the CPU)")
    if machine.compile and cache.cache_method != "none":
        raise UserError("--cache_method runs the model eagerly (it reroutes the blocks' branches call by call): leave "
                        "out --compile")


def batch_for_memory(per_sample_bytes: float, fixed_bytes: float, free_bytes: float, *, cap: int = 1024,
                     headroom: float = 0.85) -> int:
    """The largest power of two b <= cap with fixed + b * per_sample <= headroom * free (at least 1)."""
    b = 1
    while b * 2 <= cap and fixed_bytes + b * 2 * per_sample_bytes <= headroom * free_bytes:
        b *= 2
    return b


def auto_batch_size(probe, device: torch.device, *, default: int = 32, probe_batch: int = 8, cap: int = 1024) -> int:
    """The per-process batch that fills this GPU: ``probe(n)`` samples a batch of n once (one short sampling run);
    its peak memory at ``probe_batch`` and 2 * ``probe_batch`` gives the memory per sample and the fixed part. On a
    CPU: ``default``."""
    if device.type != "cuda":
        return default
    peaks = []
    for n in (probe_batch, 2 * probe_batch):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        probe(n)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_sample = max(1.0, (peaks[1] - peaks[0]) / probe_batch)
    fixed = max(0.0, peaks[0] - probe_batch * per_sample)
    free, _ = torch.cuda.mem_get_info(device)
    return batch_for_memory(per_sample, fixed, free, cap=cap)
