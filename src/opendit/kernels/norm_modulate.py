"""LayerNorm (no affine) fused with the per-sample adaLN modulation, in Triton, with its torch reference.

    y[b, t] = (x[b, t] - mean) / sqrt(var + eps) * (1 + scale[b]) + shift[b]        x: (B, T, D); shift, scale: (B, D)

Statistics are computed in fp32 whatever the input dtype. Each program handles ROWS consecutive tokens of one sample
b, so the per-sample scale/shift are indexed by b explicitly (the defect of an earlier implementation was indexing them
as if the batch were 1) and the backward accumulates dscale/dshift for its rows in registers. Without modulation the
same kernels are a plain LayerNorm. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None


def norm_modulate_reference(x, shift=None, scale=None, eps: float = 1e-6):
    """The same function in plain torch (fp32 statistics), the path every kernel is tested against."""
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    if scale is not None:
        y = y * (1 + scale.float().unsqueeze(1)) + shift.float().unsqueeze(1)
    return y.to(x.dtype)


def kernels_available(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else the reason they cannot."""
    import os

    if triton is None:
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"the Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for tests); this run is on {device.type}"


if triton is not None:

    @triton.jit
    def _fwd_kernel(X, Y, SHIFT, SCALE, MEAN, RSTD, T, D, stride_mod, eps,
                    HAS_MOD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        t0 = tl.program_id(1) * ROWS
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        if HAS_MOD:
            sc = tl.load(SCALE + b * stride_mod + cols, mask=cmask, other=0.0).to(tl.float32)
            sh = tl.load(SHIFT + b * stride_mod + cols, mask=cmask, other=0.0).to(tl.float32)
        for r in range(ROWS):
            t = t0 + r
            row = b * T + t
            m = cmask & ((cols * 0 + t) < T)
            x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / D
            xc = tl.where(cmask, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / D
            rstd = 1.0 / tl.sqrt(var + eps)
            y = xc * rstd
            if HAS_MOD:
                y = y * (1.0 + sc) + sh
            tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=m)
            tl.store(MEAN + row, mean, mask=t < T)
            tl.store(RSTD + row, rstd, mask=t < T)

    @triton.jit
    def _bwd_kernel(DY, X, SCALE, MEAN, RSTD, DX, DSCALE_P, DSHIFT_P, T, D, stride_mod,
                    HAS_MOD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        blk = tl.program_id(1)
        t0 = blk * ROWS
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        if HAS_MOD:
            sc = tl.load(SCALE + b * stride_mod + cols, mask=cmask, other=0.0).to(tl.float32)
        dsc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dsh = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r in range(ROWS):
            t = t0 + r
            row = b * T + t
            m = cmask & ((cols * 0 + t) < T)
            x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * D + cols, mask=m, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row, mask=t < T, other=0.0)
            rstd = tl.load(RSTD + row, mask=t < T, other=0.0)
            xhat = tl.where(m, (x - mean) * rstd, 0.0)
            if HAS_MOD:
                dsc += dy * xhat
                dsh += dy
                g = dy * (1.0 + sc)
            else:
                g = dy
            c1 = tl.sum(g * xhat, axis=0) / D
            c2 = tl.sum(g, axis=0) / D
            dx = (g - c2 - xhat * c1) * rstd
            tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=m)
        if HAS_MOD:
            nblk = tl.num_programs(1)
            tl.store(DSCALE_P + (b * nblk + blk) * D + cols, dsc, mask=cmask)
            tl.store(DSHIFT_P + (b * nblk + blk) * D + cols, dsh, mask=cmask)


def _rows_per_program(T: int) -> int:
    return 16 if T >= 16 else max(1, T)


class _NormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        B, T, D = x.shape
        x = x.contiguous()
        has_mod = scale is not None
        if has_mod:
            shift = shift if shift.stride(-1) == 1 else shift.contiguous()
            scale = scale if scale.stride(-1) == 1 else scale.contiguous()
            if shift.stride(0) != scale.stride(0):
                shift, scale = shift.contiguous(), scale.contiguous()
        y = torch.empty_like(x)
        mean = torch.empty(B * T, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        rows = _rows_per_program(T)
        block = triton.next_power_of_2(D)
        grid = (B, triton.cdiv(T, rows))
        _fwd_kernel[grid](x, y, shift if has_mod else x, scale if has_mod else x, mean, rstd, T, D,
                          scale.stride(0) if has_mod else 0, eps, HAS_MOD=has_mod, ROWS=rows, BLOCK_D=block,
                          num_warps=4 if block <= 1024 else 8)
        ctx.save_for_backward(x, scale if has_mod else None, mean, rstd)
        ctx.has_mod, ctx.rows, ctx.block = has_mod, rows, block
        ctx.mod_dtype = scale.dtype if has_mod else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        B, T, D = x.shape
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        nblk = triton.cdiv(T, ctx.rows)
        if ctx.has_mod:
            dsc_p = torch.empty(B, nblk, D, device=x.device, dtype=torch.float32)
            dsh_p = torch.empty_like(dsc_p)
        else:
            dsc_p = dsh_p = mean  # unused
        _bwd_kernel[(B, nblk)](dy, x, scale if ctx.has_mod else x, mean, rstd, dx, dsc_p, dsh_p, T, D,
                               scale.stride(0) if ctx.has_mod else 0, HAS_MOD=ctx.has_mod, ROWS=ctx.rows,
                               BLOCK_D=ctx.block, num_warps=4 if ctx.block <= 1024 else 8)
        if not ctx.has_mod:
            return dx, None, None, None
        return dx, dsh_p.sum(1).to(ctx.mod_dtype), dsc_p.sum(1).to(ctx.mod_dtype), None


def norm_modulate(x: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                  eps: float = 1e-6) -> torch.Tensor:
    """Fused LayerNorm (+ modulation when shift/scale are given). x: (B, T, D); shift, scale: (B, D)."""
    if (shift is None) != (scale is None):
        raise ValueError("give both shift and scale, or neither")
    if x.dim() != 3:
        raise ValueError(f"norm_modulate expects (B, T, D) inputs, got {tuple(x.shape)}")
    if triton is None:
        raise RuntimeError("Triton is not installed")
    return _NormModulate.apply(x, shift, scale, eps)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine parameters through the same kernel."""
    return norm_modulate(x, None, None, eps)
