"""The one place that turns a plain DiT into the model a run trains: speed features and data parallelism are applied
from outside, in torchtitan's order, each a small function with a reference path it is tested against.

    1. kernels and attention backend   SDPA (default), flash / cuDNN only, eager; Triton LayerNorm (+ modulate)
    2. activation checkpointing        recompute each block in the backward pass
    3. compile                         torch.compile of each block (small graphs, no graph break inside a block)
    4. data parallelism                ddp, or FSDP2 fully_shard (zero2 / fsdp); one process: no wrapper

    options = ModelOptions(attention="flash", grad_checkpoint=True, compile=True, plugin="zero2")
    check_model_options(options, device, precision)       # one line for what cannot run here, before anything starts
    train_model = parallelize_dit(model, options, env, precision)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .distributed import DistEnv
from .errors import UserError
from .precision import Precision

PLUGINS = ("ddp", "zero2", "fsdp")


@dataclass(frozen=True)
class ModelOptions:
    attention: str = "sdpa"  # sdpa | flash | eager (see opendit.models.ATTENTION_IMPLS)
    norm: str = "torch"  # torch | layernorm_kernel | modulate_kernel (Triton)
    grad_checkpoint: bool = False
    compile: bool = False
    plugin: str = "ddp"  # ddp | zero2 | fsdp
    grad_reduce_dtype: str = "fp32"  # fp32 | bf16

    @classmethod
    def from_config(cls, machine) -> "ModelOptions":
        """The options of a program's machine settings (``enable_flashattn``, ``enable_layernorm_kernel``,
        ``enable_modulate_kernel``, ``grad_checkpoint``, ``compile``, ``plugin``, ``grad_reduce_dtype``; a setting the
        program does not have keeps the default)."""
        g = lambda name, default=False: getattr(machine, name, default)  # noqa: E731
        norm = "modulate_kernel" if g("enable_modulate_kernel") else "layernorm_kernel" if g("enable_layernorm_kernel") \
            else "torch"
        return cls(attention="flash" if g("enable_flashattn") else "sdpa", norm=norm,
                   grad_checkpoint=bool(g("grad_checkpoint")), compile=bool(g("compile")),
                   plugin=g("plugin", "ddp"), grad_reduce_dtype=g("grad_reduce_dtype", "fp32"))


def check_model_options(options: ModelOptions, device: torch.device, precision: Precision | None = None) -> None:
    """A UserError (one line) for an option that cannot run on ``device`` at ``precision``."""
    from .models.dit import flash_attention_problem

    check_plugin(options.plugin)
    if options.grad_reduce_dtype not in ("fp32", "bf16"):
        raise UserError(f"unknown gradient reduce dtype {options.grad_reduce_dtype!r}; choose fp32 or bf16")
    if options.attention == "flash":
        problem = flash_attention_problem(device, precision.dtype if precision is not None else None)
        if problem is not None:
            raise UserError(f"--enable_flashattn: {problem}; use --mixed_precision bf16 or fp16 on a GPU, or drop the "
                            f"flag (the default SDPA attention runs anywhere)")
    if options.norm != "torch":
        from .kernels import kernels_available

        if (why := kernels_available(torch.device(device))) is not None:
            raise UserError(f"--enable_layernorm_kernel / --enable_modulate_kernel: {why}")


def apply_kernels(model, options: ModelOptions):
    """Step 1: the attention backend and the norm implementation of every block."""
    model.set_attention_impl(options.attention)
    model.set_norm_impl(options.norm)
    return model


def apply_activation_checkpointing(model, options: ModelOptions):
    """Step 2 (the keys of the state dict stay the published ones: the model recomputes its blocks itself)."""
    model.set_grad_checkpoint(options.grad_checkpoint)
    return model


def apply_compile(model, options: ModelOptions):
    """Step 3: compile each transformer block in place (its parameters and state dict keys are unchanged)."""
    if options.compile:
        for block in model.blocks:
            block.compile()
    return model


def parallelize_dit(model, options: ModelOptions, env: DistEnv, precision: Precision | None = None):
    """Apply steps 1-4 to a plain DiT already on its device; returns the module to call in training (``model`` itself,
    sharded in place, or its DistributedDataParallel wrapper). Load weights before, build the optimizer after."""
    apply_kernels(model, options)
    apply_activation_checkpointing(model, options)
    apply_compile(model, options)
    return apply_data_parallel(model, options.plugin, env, precision, options.grad_reduce_dtype)


def check_plugin(plugin: str) -> None:
    if plugin not in PLUGINS:
        raise UserError(f"unknown --plugin {plugin!r}; choose from {', '.join(PLUGINS)}")


def apply_data_parallel(model: torch.nn.Module, plugin: str, env: DistEnv, precision: "Precision | None" = None,
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
    """FSDP2 ``fully_shard`` of each block (and REPA projector), then of the root (zero2: weights kept gathered until
    backward)."""
    from torch.distributed.fsdp import fully_shard

    blocks_mp, root_mp = fsdp_precision_policies(dtype, reduce_dtype)
    reshard = plugin == "fsdp"
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=blocks_mp)
    # REPA's projectors (opendit.alignment) run after the model's forward has returned, when the root's weights may be
    # resharded already (fsdp): each is its own unit, gathered by its own forward
    for projector in getattr(model, "projectors", ()):
        fully_shard(projector, mesh=mesh, reshard_after_forward=reshard, mp_policy=root_mp)
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


