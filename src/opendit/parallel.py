"""Process groups, data parallelism and precision.

``init_distributed`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs, gloo on CPUs;
each process uses the GPU of its *local* rank. ``wrap_model`` applies the chosen plugin to a plain model.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import RankError, TrainingFailed, UserError

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


def run_main(fn, args) -> int:
    """Run a program's body ``fn(args)`` alone or under torchrun: a UserError is one line (``error: ...``) from global
    rank 0 (or from the rank that raised a RankError) and exit code 2; TrainingFailed is one line and exit code 1;
    Ctrl-C is 130. The process group is always shut down."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        return fn(args)
    except UserError as e:
        if rank0 or isinstance(e, RankError):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        shutdown()


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


def check_plugin(plugin: str) -> None:
    if plugin not in PLUGINS:
        raise UserError(f"unknown --plugin {plugin!r}; choose from {', '.join(PLUGINS)}")


def wrap_model(model: torch.nn.Module, plugin: str, env: DistEnv, precision: "Precision | None" = None,
               reduce_dtype: str = "fp32") -> torch.nn.Module:
    """Apply the data-parallel plugin to a plain DiT (in place for the sharded ones); one process: no wrapper.

    ddp    replicated weights, gradients all-reduced in buckets during backward (DistributedDataParallel)
    zero2  FSDP2 ``fully_shard`` per block and at the root with reshard_after_forward=False: weights, gradients and
           optimizer state sharded; each block's weights gathered once per step and kept until backward
    fsdp   the same with reshard_after_forward=True (ZeRO-3): weights gathered again for backward
    With a low-precision policy the blocks' gathered weights are cast to it; gradients are reduced in fp32 unless
    ``reduce_dtype`` is "bf16" (half the gradient traffic, a bf16 rounding of every reduced gradient). The sharded
    plugins compute what DDP under autocast computes (see ``fsdp_precision_policies``).
    """
    check_plugin(plugin)
    if reduce_dtype not in ("fp32", "bf16"):
        raise UserError(f"unknown gradient reduce dtype {reduce_dtype!r}; choose fp32 or bf16")
    if not env.distributed:
        return model
    if plugin == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if reduce_dtype == "bf16":
            ddp.register_comm_hook(env.world_size, _bf16_allreduce_hook)
        return ddp
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    shard_model(model, mesh, plugin, precision.dtype if precision is not None else None, reduce_dtype)
    return model


def fsdp_precision_policies(dtype: torch.dtype | None, reduce_dtype: str = "fp32"):
    """(blocks' policy, root's policy) for FSDP2 so that a sharded model computes what DDP computes under autocast.

    The blocks' weights are gathered in ``dtype``: autocast would cast them to it for every matmul anyway, so this is
    the same arithmetic at half the all-gather traffic. Two things of FSDP2's default policy are not: it casts every
    floating forward input to ``dtype`` (the timesteps t: bf16 rounds t = 999 to 1000, steps of 4 above 512) and the
    root's parameters too (the fixed pos_embed), which makes the residual stream bf16 where autocast keeps it fp32.
    So no input is cast, and the root's small parameters (embedders, pos_embed, final layer: <1% of DiT-XL/2's) stay
    fp32; autocast then does the same casts as with DDP, and outputs and gradients equal DDP's (tested).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    reduce = torch.bfloat16 if reduce_dtype == "bf16" else torch.float32
    blocks = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce, cast_forward_inputs=False)
    root = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce, cast_forward_inputs=False)
    return blocks, root


def shard_model(model: torch.nn.Module, mesh, plugin: str, dtype: torch.dtype | None = None,
                reduce_dtype: str = "fp32") -> torch.nn.Module:
    """FSDP2 ``fully_shard`` of each block, then of the root (zero2: weights kept gathered until backward)."""
    from torch.distributed.fsdp import fully_shard

    blocks_mp, root_mp = fsdp_precision_policies(dtype, reduce_dtype)
    reshard = plugin == "fsdp"
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=blocks_mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=root_mp)
    return model


def _bf16_allreduce_hook(world_size: int, bucket):
    """DDP communication hook: average a gradient bucket in bf16 (NCCL and gloo alike), back to fp32 after."""
    buf = bucket.buffer()
    low = buf.to(torch.bfloat16).div_(world_size)
    fut = dist.all_reduce(low, async_op=True).get_future()

    def back(f):
        buf.copy_(f.value()[0])
        return buf

    return fut.then(back)


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
