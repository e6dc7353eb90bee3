"""Numeric precision: fp32 master weights; autocast to bf16 / fp16 activations; a gradient scaler for fp16."""

from __future__ import annotations

import contextlib

import torch

from .errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AMX (Sapphire Rapids and newer) makes bf16 matmuls fast on a CPU; without it they are far slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


class Precision:
    """Autocast policy: fp32 master weights; bf16/fp16 activations; a gradient scaler for fp16."""

    def __init__(self, name: str, device: torch.device):
        if name not in PRECISIONS:
            raise UserError(f"unknown --mixed_precision {name!r}; choose bf16, fp16 or fp32")
        self.name, self.device = name, device
        self.dtype = PRECISIONS[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def warning(self) -> str | None:
        if self.device.type == "cpu" and self.dtype is not None and not cpu_has_fast_bf16():
            return (f"--mixed_precision {self.name} on a CPU without AMX: low-precision matmuls run many times slower "
                    "than fp32 here; use --mixed_precision fp32 for CPU runs")
        return None
