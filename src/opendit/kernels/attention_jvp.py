"""Attention with its forward-mode derivative (JVP) in one Triton pass: the fast path of MeanFlow's d/dt u, which the
fused SDPA kernels cannot give (no forward-mode AD in flash / memory-efficient attention).

For one query row, with S = scale q k^T, P = softmax(S), O = P v and tangents (dq, dk, dv):

    dS = scale (dq k^T + q dk^T),   dP = P * (dS - sum_j P_j dS_j),   dO = dP v + P dv
       = (sum_j p_j dS_j v_j + sum_j p_j dv_j) / l  -  (sum_j p_j dS_j / l) O,     p_j = exp(S_j - m), l = sum_j p_j

so the three extra sums ride along the online softmax of flash attention (one pass over the keys, each accumulator
rescaled with the running maximum). ``attention_jvp_reference`` is the same in plain torch (torch.func.jvp through
softmax(q k^T) v), the path the kernel is tested against (interpreter mode on CPU).
"""

from __future__ import annotations

import math

import torch

from .norm_modulate import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _attn_jvp_fwd(Q, K, V, DQ, DK, DV, O, DO, T, D, scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        base = bh * T * D
        qmask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
        q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=qmask, other=0.0).to(tl.float32)
        dq = tl.load(DQ + base + offs_m[:, None] * D + offs_d[None, :], mask=qmask, other=0.0).to(tl.float32)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        b_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j p_j dS_j
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum_j p_j v_j
        acc_a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum_j p_j dS_j v_j
        acc_c = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum_j p_j dv_j
        for start in range(0, T, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            kmask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
            k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kmask, other=0.0).to(tl.float32)
            dk = tl.load(DK + base + offs_n[:, None] * D + offs_d[None, :], mask=kmask, other=0.0).to(tl.float32)
            v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kmask, other=0.0).to(tl.float32)
            dv = tl.load(DV + base + offs_n[:, None] * D + offs_d[None, :], mask=kmask, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            ds = (tl.dot(dq, tl.trans(k)) + tl.dot(q, tl.trans(dk))) * scale
            s = tl.where(offs_n[None, :] < T, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            pds = p * ds
            l_i = l_i * alpha + tl.sum(p, 1)
            b_i = b_i * alpha + tl.sum(pds, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            acc_a = acc_a * alpha[:, None] + tl.dot(pds, v)
            acc_c = acc_c * alpha[:, None] + tl.dot(p, dv)
            m_i = m_new
        o = acc / l_i[:, None]
        do = (acc_a + acc_c) / l_i[:, None] - (b_i / l_i)[:, None] * o
        tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=qmask)
        tl.store(DO + base + offs_m[:, None] * D + offs_d[None, :], do.to(DO.dtype.element_ty), mask=qmask)


def attention_jvp_reference(q, k, v, dq, dk, dv):
    """(O, dO) of softmax(q k^T / sqrt(d)) v along (dq, dk, dv), by torch.func.jvp through the explicit formula."""
    def attn(q, k, v):
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v

    return torch.func.jvp(attn, (q, k, v), (dq, dk, dv))


def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                  dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, dO) for (N, H, T, D) inputs and tangents, in one Triton pass (fp32 accumulation)."""
    if triton is None:
        raise RuntimeError("attention_jvp needs Triton")
    N, H, T, D = q.shape
    args = [t.reshape(N * H, T, D).contiguous() for t in (q, k, v, dq, dk, dv)]
    o, do = torch.empty_like(args[0]), torch.empty_like(args[0])
    block_m = block_n = 16 if T <= 16 else 32
    grid = (N * H, triton.cdiv(T, block_m))
    _attn_jvp_fwd[grid](*args, o, do, T, D, 1.0 / math.sqrt(D), BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_D=max(16, triton.next_power_of_2(D)))
    return o.reshape(N, H, T, D), do.reshape(N, H, T, D)


class JvpAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v whose forward-mode derivative is the Triton kernel above (forward AD only: the
    primal through SDPA, the tangent through ``attention_jvp``). No backward: it serves MeanFlow's no-grad JVP pass."""

    @staticmethod
    def forward(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(ctx, dq, dk, dv):
        q, k, v = ctx.saved_tensors
        zeros = [torch.zeros_like(t) if d is None else d for t, d in zip((q, k, v), (dq, dk, dv))]
        return attention_jvp(q, k, v, *zeros)[1]
