"""The adaLN-Zero gated residual x + gate[b] * y in one pass, in Triton, with its torch reference.

    z[b, t] = x[b, t] + gate[b] * y[b, t]        x, y: (B, T, D); gate: (B, D)

One read of x and y and one write of z instead of a temporary for gate * y; the backward writes dy = gate * dz and
reduces dgate[b] = sum_t dz * y per program (ROWS tokens of one sample), finished by a small sum over programs.
"""

from __future__ import annotations

import torch

from .norm_modulate import _rows_per_program, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gres_fwd(X, Y, GATE, Z, T, D, stride_g, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        t0 = tl.program_id(1) * ROWS
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        g = tl.load(GATE + b * stride_g + cols, mask=cmask, other=0.0).to(tl.float32)
        for r in range(ROWS):
            row = b * T + t0 + r
            m = cmask & ((cols * 0 + t0 + r) < T)
            x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
            y = tl.load(Y + row * D + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(Z + row * D + cols, (x + g * y).to(Z.dtype.element_ty), mask=m)

    @triton.jit
    def _gres_bwd(DZ, Y, GATE, DY, DGATE_P, T, D, stride_g, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        blk = tl.program_id(1)
        t0 = blk * ROWS
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        g = tl.load(GATE + b * stride_g + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r in range(ROWS):
            row = b * T + t0 + r
            m = cmask & ((cols * 0 + t0 + r) < T)
            dz = tl.load(DZ + row * D + cols, mask=m, other=0.0).to(tl.float32)
            y = tl.load(Y + row * D + cols, mask=m, other=0.0).to(tl.float32)
            acc += dz * y
            tl.store(DY + row * D + cols, (g * dz).to(DY.dtype.element_ty), mask=m)
        tl.store(DGATE_P + (b * tl.num_programs(1) + blk) * D + cols, acc, mask=cmask)


def gated_residual_reference(x, gate, y):
    return x + gate.unsqueeze(1) * y


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        B, T, D = y.shape
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, gate.dtype), y.dtype)
        x, y = x.contiguous(), y.contiguous()
        gate = gate if gate.stride(-1) == 1 else gate.contiguous()
        z = torch.empty(B, T, D, device=y.device, dtype=out_dtype)
        rows = _rows_per_program(T)
        block = triton.next_power_of_2(D)
        _gres_fwd[(B, triton.cdiv(T, rows))](x, y, gate, z, T, D, gate.stride(0), ROWS=rows, BLOCK_D=block)
        ctx.save_for_backward(y, gate)
        ctx.rows, ctx.block, ctx.x_dtype = rows, block, x.dtype
        return z

    @staticmethod
    def backward(ctx, dz):
        y, gate = ctx.saved_tensors
        B, T, D = y.shape
        dz = dz.contiguous()
        dy = torch.empty_like(y)
        nblk = triton.cdiv(T, ctx.rows)
        dgate_p = torch.empty(B, nblk, D, device=y.device, dtype=torch.float32)
        _gres_bwd[(B, nblk)](dz, y, gate, dy, dgate_p, T, D, gate.stride(0), ROWS=ctx.rows, BLOCK_D=ctx.block)
        return dz.to(ctx.x_dtype), dgate_p.sum(1).to(gate.dtype), dy


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate[:, None] * y in one pass. x, y: (B, T, D); gate: (B, D)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    if y.dim() != 3 or x.shape != y.shape or gate.shape != (y.shape[0], y.shape[2]):
        raise ValueError(f"gated_residual expects x, y (B, T, D) and gate (B, D), got {tuple(x.shape)}, {tuple(gate.shape)}, {tuple(y.shape)}")
    return _GatedResidual.apply(x, gate, y)
