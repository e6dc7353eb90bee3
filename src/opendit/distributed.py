"""Processes: the device of each, the process group, and the few collectives the programs use.

``init_distributed`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs, gloo on CPUs;
each process uses the GPU of its *local* rank. Every helper is a no-op (or the identity) in one process. The whole
(unsharded) model and optimizer states are gathered to / scattered from rank 0 here for checkpoints.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


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


def all_reduce_(t: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) across ranks; a no-op in one process."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def on_rank0(fn, env: DistEnv):
    """``fn()`` on global rank 0 only, its result there (None elsewhere). A UserError it raises is raised on every rank
    with the same message, so no rank waits forever for a rank that gave up."""
    result, problem = None, None
    if env.is_main:
        try:
            result = fn()
        except UserError as e:
            problem = str(e)
    problem = broadcast_object(problem, env)
    if problem:
        raise UserError(problem)
    return result


def broadcast_object(obj, env: DistEnv, src: int = 0):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def tensor_bytes(tensors) -> int:
    """Bytes held by this rank (local shards of sharded tensors)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def full_model_state(module: torch.nn.Module, env: DistEnv) -> dict:
    """The whole (unsharded) fp32 state dict on rank 0's CPU; {} on other ranks. Collective."""
    if not env.distributed:
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if env.is_main else {}


def full_optimizer_state(module: torch.nn.Module, opt: torch.optim.Optimizer, env: DistEnv) -> dict:
    """The optimizer state keyed by parameter name, unsharded, on rank 0's CPU: any plugin and world size can load it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return osd if env.is_main else {}


def load_full_model_state(module: torch.nn.Module, sd: dict, env: DistEnv) -> None:
    """Load a whole state dict held by rank 0 (others pass {}) into a plain, replicated or sharded module."""
    if not env.distributed:
        module.load_state_dict(sd, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def load_full_optimizer_state(module: torch.nn.Module, opt: torch.optim.Optimizer, osd: dict, env: DistEnv) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, opt, osd,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=env.distributed))


