"""Process groups, data parallelism and precision.

``init_distributed`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs, gloo on CPUs;
each process uses the GPU of its *local* rank. ``wrap_model`` applies the chosen plugin to a plain model.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError

PLUGINS = ("ddp", "zero2", "fsdp")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(flag: str, local_rank: int) -> torch.device:
    if flag == "cpu" or (flag == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"local rank {local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                        "lower --nproc_per_node")
    return torch.device("cuda", local_rank)


def init_distributed(device_flag: str = "auto") -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_flag, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
    return t


def broadcast_object(obj, env: DistEnv, src: int = 0):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_ranks_agree(ok: bool, env: DistEnv) -> bool:
    """True on every rank iff ``ok`` is True on every rank."""
    if not env.distributed:
        return ok
    t = torch.tensor([0 if ok else 1], device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def check_plugin(plugin: str) -> None:
    if plugin not in PLUGINS:
        raise UserError(f"unknown --plugin {plugin!r}; choose from {', '.join(PLUGINS)}")
    if plugin != "ddp":
        raise UserError(f"--plugin {plugin} (sharded training) is not available yet; use --plugin ddp")


def wrap_model(model: torch.nn.Module, plugin: str, env: DistEnv) -> torch.nn.Module:
    """Apply the data-parallel plugin. ``ddp``: gradients all-reduced (averaged) in buckets during backward."""
    check_plugin(plugin)
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


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
