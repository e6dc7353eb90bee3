"""DiT: a Diffusion Transformer with adaLN-Zero conditioning, in one file.

Module and parameter names are those of the published DiT checkpoints, so a published
state dict (e.g. ``DiT-XL-2-256x256.pt``) loads with ``strict=True``.

Shapes used in comments:
    N  batch            C  input channels        H, W  input grid (latent or pixels)
    p  patch size       h, w = H/p, W/p          T = h*w tokens
    D  hidden size      nh heads, hd = D/nh head dim

A DiT is built from a ``DiTConfig`` (opendit.models.config: architecture and block options; ``DiT(**fields)`` builds
the config of those keyword arguments, the published signature). Speed switches are set from outside
(``set_attention_impl``, ``set_norm_impl``, ``set_grad_checkpoint``; opendit.parallelize applies them); the default
path is plain PyTorch with ``F.scaled_dot_product_attention``. Attention ``"eager"`` is the explicit
softmax(QK^T/sqrt(hd))V reference used in tests.

Block options of the LightningDiT lineage, each off by default (off: the published DiT, bit for bit), with that
lineage's keyword names and parameter names, so a LightningDiT state dict loads with ``strict=True`` too:
    use_rmsnorm   RMSNorm (learnable weight, eps 1e-6) in place of the blocks' and final layer's LayerNorm
    use_swiglu    SwiGLU feed-forward ``mlp.w12`` (D -> 2h), ``mlp.w3`` (h -> D), h = int(2/3 * mlp_ratio * D)
    use_rope      2-D rotary embedding of q and k (``feat_rope``): half of each head rotates with the token's row,
                  half with its column, frequencies 1/10000^(2i/(hd/2)), interleaved pairs (EVA-02's layout)
    use_qknorm    per-head norm of q and k (``attn.q_norm`` / ``attn.k_norm``: RMSNorm with use_rmsnorm, else
                  LayerNorm with affine weights, as published)
    wo_shift      adaLN modulation without the shift terms (4 D modulation outputs per block, not 6)
    wo_pos_embed  no absolute sin-cos embedding added (positions from RoPE alone; needs use_rope)
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


from .config import MODEL_NAMES, DiTConfig, _pair, swiglu_hidden


class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot run here (e.g. flash attention without a GPU)."""


# ----------------------------------------------------------------------------- embeddings

def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim) float64: [sin(pos * omega), cos(pos * omega)],
    omega_k = 10000^(-k / (dim/2)), k = 0 .. dim/2 - 1."""
    assert dim % 2 == 0
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(pos.reshape(-1).astype(np.float64), omega)  # (M, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> np.ndarray:
    """Fixed 2-D sin-cos table for an (h, w) token grid, tokens row-major -> (h*w, dim) float64.
    The first dim/2 channels encode the column (w) index, the last dim/2 the row (h) index."""
    assert dim % 4 == 0, "hidden size must be a multiple of 4 for the 2-D sin-cos embedding"
    h, w = grid
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # each (h, w)
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0, dtype=torch.float32,
                      freq_shift: int = 0) -> torch.Tensor:
    """(N,) timesteps (may be fractional) -> (N, dim) [cos(t*f), sin(t*f)], f_k = exp(-ln(max_period) * k / (dim/2 - s)).
    s = 0 in the DiT release; diffusers' DiTTransformer2DModel uses s = 1 (``freq_shift``).
    Computed in float32 like the published model (float64 only when asked, for float64 models)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / (half - freq_shift))
    args = t[:, None].to(dtype) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a stride-p convolution; tokens row-major (h, then w)."""

    def __init__(self, input_size, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.img_size = _pair(input_size)
        self.patch_size = patch_size
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"input size {self.img_size} is not divisible by patch size {patch_size}")
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"DiT was built for inputs of size {self.img_size}, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, D): 256-dim sinusoid followed by Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = 0  # 1 reproduces diffusers' DiTTransformer2DModel (see timestep_sinusoid)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        wdtype = self.mlp[0].weight.dtype
        t_freq = timestep_sinusoid(t, self.frequency_embedding_size, freq_shift=self.freq_shift,
                                   dtype=torch.float64 if wdtype == torch.float64 else torch.float32)
        return self.mlp(t_freq.to(wdtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D). Row ``num_classes`` is the null class used for classifier-free
    guidance; in training, labels are replaced by it with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def drop_labels(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.bool()
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.drop_labels(labels, force_drop_ids)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------- transformer

ATTENTION_IMPLS = ("sdpa", "eager", "flash", "jvp_kernel")


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention: softmax(q k^T / sqrt(hd)) v, computed explicitly. (N, nh, T, hd) each."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, nh, T, T)
    return scores.softmax(dim=-1) @ v


try:  # optional: used by the "flash" attention when installed (resolved once, outside any traced code)
    from flash_attn import flash_attn_func as _FLASH_ATTN_FUNC
except Exception:
    _FLASH_ATTN_FUNC = None


def flash_attention_problem(device, dtype: torch.dtype | None) -> str | None:
    """Why flash attention cannot run on ``device`` with activations of ``dtype`` (None: fp32), or None when it can.
    The one check behind the "flash" attention: the programs call it before they start, the attention at run time."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"flash attention needs a CUDA GPU (flash / cuDNN kernels); this runs on {device.type}; the default "
                f"SDPA attention runs anywhere")
    if dtype not in (torch.float16, torch.bfloat16):
        name = {None: "fp32", torch.float32: "fp32"}.get(dtype, str(dtype).replace("torch.", ""))
        return f"flash attention needs fp16 or bf16 activations, not {name}"
    return None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention restricted to fused flash kernels: ``flash_attn`` when installed, otherwise
    SDPA limited to its flash and cuDNN backends. Raises AttentionBackendError where none can run."""
    if (problem := flash_attention_problem(q.device, q.dtype)) is not None:
        raise AttentionBackendError(problem)
    if _FLASH_ATTN_FUNC is not None:  # flash_attn takes (N, T, nh, hd)
        return _FLASH_ATTN_FUNC(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)
    except RuntimeError as e:  # "No available kernel"
        raise AttentionBackendError(f"flash attention: no flash or cuDNN attention kernel for this input ({e})") from e


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) over the last dimension (computed in fp32), times a learnable weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d): each interleaved pair (a, b) becomes (-b, a), a 90-degree rotation of every pair."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rope_2d_table(head_dim: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, hd) of the 2-D rotary embedding for an (h, w) token grid, tokens row-major: channels
    [0, hd/2) rotate with the row index, [hd/2, hd) with the column index; in each half, pair i (channels 2i, 2i+1)
    turns by position * 10000^(-2i/(hd/2)). The table of LightningDiT's (EVA-02's) ``VisionRotaryEmbeddingFast``."""
    assert head_dim % 4 == 0, "a rotated pair per frequency on each of the two axes (block_options_problem says so)"
    half = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, half, 2).float() / half)  # (hd/4,)
    h, w = grid
    rows = torch.outer(torch.arange(h).float(), freqs).repeat_interleave(2, dim=-1)  # (h, hd/2)
    cols = torch.outer(torch.arange(w).float(), freqs).repeat_interleave(2, dim=-1)  # (w, hd/2)
    angles = torch.cat([rows[:, None, :].expand(h, w, half), cols[None, :, :].expand(h, w, half)], dim=-1)
    angles = angles.reshape(h * w, head_dim)
    return angles.cos(), angles.sin()


class RotaryEmbedding2D(nn.Module):
    """2-D RoPE for q or k (N, nh, T, hd): x * cos + rotate_pairs(x) * sin, in fp32. The tables are (persistent)
    buffers ``freqs_cos`` / ``freqs_sin`` as in the published LightningDiT state dicts."""

    def __init__(self, head_dim: int, grid: tuple[int, int]):
        super().__init__()
        cos, sin = rope_2d_table(head_dim, grid)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The standalone form (LightningDiT's ``feat_rope(q)``); the blocks take the tables themselves."""
        return apply_rope(x, (self.freqs_cos, self.freqs_sin))


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate q or k (N, nh, T, hd) by the (cos, sin) tables (T, hd); computed in fp32, returned in x's dtype."""
    cos, sin = rope
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    return (xf * cos.to(dtype) + rotate_pairs(xf) * sin.to(dtype)).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention; qkv laid out [q | k | v], then heads. Optionally q and k normalized per head
    (``qk_norm``: "rmsnorm" or "layernorm") and rotated by a 2-D RoPE (``forward(x, rope)``)."""

    def __init__(self, dim: int, num_heads: int, impl: str = "sdpa", qk_norm: str | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if qk_norm is not None:  # LightningDiT's: RMSNorm with use_rmsnorm, else a LayerNorm with affine weights
            norm = partial(RMSNorm, eps=1e-6) if qk_norm == "rmsnorm" else nn.LayerNorm
            self.q_norm, self.k_norm = norm(self.head_dim), norm(self.head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.proj = nn.Linear(dim, dim, bias=True)
        self.impl = impl

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, nh, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if self.q_norm is not None or rope is not None:
            q, k = q.to(v.dtype), k.to(v.dtype)  # a norm's fp32 weight promotes; the attention kernels want one dtype
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.impl == "eager":
            out = eager_attention(q, k, v)
        elif self.impl == "flash":
            out = flash_attention(q, k, v)
        elif self.impl == "jvp_kernel":  # forward-mode AD through a Triton kernel (MeanFlow's JVP pass)
            from ..kernels.attention_jvp import JvpAttention

            out = JvpAttention.apply(q, k, v)
        else:
            raise ValueError(f"unknown attention implementation {self.impl!r}; choose from {ATTENTION_IMPLS}")
        return self.proj(out.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward: w3(silu(a) * b) with [a | b] = w12(x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=True)
        self.w3 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """Per-sample affine modulation: (N, T, D), (N, D) or None, (N, D) -> x * (1 + scale) + shift."""
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


NORM_IMPLS = ("torch", "layernorm_kernel", "modulate_kernel")
RMSNORM_KERNEL_PROBLEM = ("the layernorm and modulate kernels are Triton LayerNorm kernels; a use_rmsnorm model "
                          "compiles instead (Inductor fuses RMSNorm with the modulation)")


def norm_and_modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor,
                      impl: str) -> torch.Tensor:
    """modulate(norm(x), shift, scale) through torch, the Triton LayerNorm, or the fused Triton LayerNorm+modulate
    (the kernels implement LayerNorm only: ``DiT.set_norm_impl`` refuses them for an RMSNorm model)."""
    if shift is None and impl != "torch":
        shift = torch.zeros_like(scale)
    if impl == "modulate_kernel":
        from ..kernels import norm_modulate

        return norm_modulate(x, shift, scale, norm.eps)
    if impl == "layernorm_kernel":
        from ..kernels import layer_norm

        return modulate(layer_norm(x, norm.eps), shift, scale)
    return modulate(norm(x), shift, scale)


def block_norm(hidden_size: int, use_rmsnorm: bool) -> nn.Module:
    """The pre-modulation norm: DiT's LayerNorm without affine weights, or LightningDiT's RMSNorm with a weight."""
    if use_rmsnorm:
        return RMSNorm(hidden_size, eps=1e-6)
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c (N, D); the block options are DiT's keyword arguments."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attention_impl: str = "sdpa", *,
                 use_rmsnorm: bool = False, use_swiglu: bool = False, use_qknorm: bool = False,
                 wo_shift: bool = False):
        super().__init__()
        self.norm_impl = "torch"
        self.wo_shift = wo_shift
        self.norm1 = block_norm(hidden_size, use_rmsnorm)
        qk_norm = ("rmsnorm" if use_rmsnorm else "layernorm") if use_qknorm else None
        self.attn = Attention(hidden_size, num_heads, impl=attention_impl, qk_norm=qk_norm)
        self.norm2 = block_norm(hidden_size, use_rmsnorm)
        if use_swiglu:
            self.mlp = SwiGLU(hidden_size, swiglu_hidden(hidden_size, mlp_ratio))
        else:
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        n_mod = 4 if wo_shift else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_mod * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = self.residual(x, gate_msa, self.attn(norm_and_modulate(self.norm1, x, shift_msa, scale_msa, self.norm_impl),
                                                 rope))
        x = self.residual(x, gate_mlp, self.mlp(norm_and_modulate(self.norm2, x, shift_mlp, scale_mlp, self.norm_impl)))
        return x

    def residual(self, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + gate * y (per sample); one fused Triton pass with the modulate kernel."""
        if self.norm_impl == "modulate_kernel":
            from ..kernels import gated_residual

            return gated_residual(x, gate, y)
        return x + gate.unsqueeze(1) * y


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm (or RMSNorm) and a linear map to p*p*out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = False):
        super().__init__()
        self.norm_final = block_norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        self.norm_impl = "torch"

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(norm_and_modulate(self.norm_final, x, shift, scale, self.norm_impl))


# ----------------------------------------------------------------------------- DiT

# Parts a training run may attach to a DiT that are trained but never sampled: REPA's projectors (``model.projectors``,
# opendit.alignment). They are kept out of the EMA and of the weights a sampler loads.
TRAINING_ONLY = ("projectors.",)


def sampling_weights(sd: dict) -> dict:
    """A state dict without the training-only parts."""
    return {k: v for k, v in sd.items() if not k.startswith(TRAINING_ONLY)}


class DiT(nn.Module):
    """Diffusion Transformer. forward(x (N, C, H, W), t (N,), y (N,)) -> (N, out_C, H, W),
    out_C = 2C with learn_sigma (epsilon, then the variance interpolation v), else C."""

    def __init__(self, config: DiTConfig | None = None, /, **fields):
        """``DiT(config)``, or ``DiT(input_size=..., patch_size=..., ...)``: the DiTConfig of those fields."""
        super().__init__()
        if config is None:
            config = DiTConfig(**fields)
        elif fields:
            raise TypeError("DiT(config) takes no other arguments; use config.replace(...)")
        self.config = config
        self.input_size = config.input_size
        self.patch_size = config.patch_size
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.learn_sigma = config.learn_sigma
        self.num_classes = config.num_classes
        self.num_heads = config.num_heads
        self.hidden_size = config.hidden_size
        self.mlp_ratio = config.mlp_ratio
        self.grad_checkpoint = False
        self.options = config.block_options
        hidden_size, num_heads, mlp_ratio = config.hidden_size, config.num_heads, config.mlp_ratio

        self.x_embedder = PatchEmbed(self.input_size, config.patch_size, config.in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # MeanFlow: a second time, embedded as the interval h = r - t and added to the conditioning (the released
        # MeanFlow DiT's h_embedder); absent otherwise, so the published state dict is unchanged
        self.h_embedder = TimestepEmbedder(hidden_size) if config.mean_flow else None
        self.y_embedder = LabelEmbedder(config.num_classes, hidden_size, config.class_dropout_prob)
        # Fixed sin-cos table; a (frozen) Parameter so that it is part of the published state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        if config.use_rope:  # the head dimension must hold a rotated pair per frequency on each axis
            self.feat_rope = RotaryEmbedding2D(hidden_size // num_heads, self.x_embedder.grid_size)
        else:
            self.feat_rope = None
        block_options = dict(use_rmsnorm=config.use_rmsnorm, use_swiglu=config.use_swiglu,
                             use_qknorm=config.use_qknorm, wo_shift=config.wo_shift)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, **block_options)
                                     for _ in range(config.depth)])
        self.final_layer = FinalLayer(hidden_size, config.patch_size, self.out_channels,
                                      use_rmsnorm=config.use_rmsnorm)
        self.initialize_weights()

    # -- options applied from outside
    @property
    def attention_impl(self) -> str:
        return self.blocks[0].attn.impl if len(self.blocks) else "sdpa"

    def set_attention_impl(self, impl: str) -> "DiT":
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {impl!r}; choose from {ATTENTION_IMPLS}")
        for block in self.blocks:
            block.attn.impl = impl
        return self

    def set_grad_checkpoint(self, enabled: bool = True) -> "DiT":
        """Recompute each block in the backward pass (activation checkpointing) instead of keeping its activations."""
        self.grad_checkpoint = bool(enabled)
        return self

    def set_norm_impl(self, impl: str) -> "DiT":
        """"torch", "layernorm_kernel" (Triton LayerNorm) or "modulate_kernel" (Triton LayerNorm fused with modulate,
        and the fused gated residual)."""
        if impl not in NORM_IMPLS:
            raise ValueError(f"unknown norm implementation {impl!r}; choose from {NORM_IMPLS}")
        if impl != "torch" and self.options["use_rmsnorm"]:
            raise ValueError(RMSNORM_KERNEL_PROBLEM)
        for m in [*self.blocks, self.final_layer]:
            m.norm_impl = impl
        return self

    def initialize_weights(self) -> None:
        def _linear_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_linear_init)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(self.hidden_size, self.x_embedder.grid_size)).float()[None])
        # Patch embedding as a linear map from a flattened patch.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.h_embedder is not None:
            nn.init.normal_(self.h_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.h_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); the channel is the fastest index inside a patch."""
        p, c = self.patch_size, self.out_channels
        h, w = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None,
                return_hidden: tuple[int, ...] = (), r: torch.Tensor | None = None):
        """``force_drop_ids`` (N,) bool/0-1, optional: which labels to replace by the null class, instead of the
        random class dropout of training mode (a trainer passes it to control the randomness itself).
        ``return_hidden``: block numbers k (1 = the first block) whose output tokens (N, T, D) are wanted too (for
        auxiliary losses); then the result is (output, {k: tokens}). ``r`` (N,): a MeanFlow model's second time (the
        end of the interval whose average velocity it predicts; default t)."""
        x = self.x_embedder(x)  # (N, T, D); fp32 residual stream under autocast
        if not self.options["wo_pos_embed"]:
            x = x + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        if self.h_embedder is not None:  # MeanFlow: u(x, t, r) sees t and h = r - t (r = t when not given)
            c = c + self.h_embedder(r - t if r is not None else torch.zeros_like(t))
        elif r is not None:
            raise ValueError("this DiT takes one time (built without mean_flow); r is for MeanFlow models")
        rope = (self.feat_rope.freqs_cos, self.feat_rope.freqs_sin) if self.feat_rope is not None else None
        use_ckpt = self.grad_checkpoint and torch.is_grad_enabled()
        hidden = {}
        for k, block in enumerate(self.blocks, start=1):
            x = checkpoint(block, x, c, rope, use_reentrant=False) if use_ckpt else block(x, c, rope)
            if k in return_hidden:
                hidden[k] = x
        x = self.final_layer(x, c)  # (N, T, p*p*out_C)
        out = self.unpatchify(x)
        if return_hidden:
            if missing := sorted(set(return_hidden) - set(hidden)):
                raise ValueError(f"return_hidden: no block {missing[0]} (blocks are numbered 1..{len(self.blocks)})")
            return out, hidden
        return out

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, guidance_channels: int | None = None,
        **kwargs
    ) -> torch.Tensor:
        """Classifier-free guidance. The batch is [conditional half; the same inputs with null labels];
        only the first half of x is used. eps = uncond + cfg_scale * (cond - uncond) on the first
        ``guidance_channels`` output channels (None: every epsilon channel; 3 reproduces the published
        sampler); the other channels (and the variance half) are the conditional model's output."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y, **kwargs)  # kwargs: a MeanFlow model's r
        g = self.in_channels if guidance_channels is None else int(guidance_channels)
        if not 0 < g <= self.out_channels:
            raise ValueError(f"guidance_channels must be in 1..{self.out_channels}, got {guidance_channels}")
        guided, rest = out[:, :g], out[:, g:]
        cond, uncond = guided.chunk(2, dim=0)
        mixed = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([mixed, mixed], dim=0), rest], dim=1)


# ----------------------------------------------------------------------------- registry

# the registry of the DiT release: name -> a factory taking the remaining DiTConfig fields (input_size, ...)
def _make(name: str, **fields) -> DiT:
    return DiT(DiTConfig.from_name(name, **fields))


DiT_models = {name: partial(_make, name) for name in MODEL_NAMES}
