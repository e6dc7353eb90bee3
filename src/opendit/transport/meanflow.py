"""MeanFlow (Geng et al. 2025): a network u(x_t, t, r) trained to predict the *average* velocity over [t, r], so that
one network evaluation crosses the whole path: x_r = x_t + (r - t) u(x_t, t, r).

On opendit's flow axis (SiT's: x_t = t x1 + (1 - t) x0, x0 noise, x1 data, v = x1 - x0, t = 0 noise, r >= t):

    u(x_t, t, r) = v + (r - t) * d/dt u(x_t, t, r),     d/dt u = (du/dx) v + du/dt     (r held fixed)

so the target is sg(v + (r - t) * jvp(u, (x_t, t, r), (v, 1, 0))). The released code (JAX, Gsunshine/meanflow) writes
the same on the reversed axis, t' = 1 - t with t' = 1 noise: z_t' = (1 - t') x + t' e, v' = e - x = -v, the sampler
z_r' = z_t' - (t' - r') u', tangents (v', 1, 0), and u' = -u. Its network takes (t', h = t' - r'); h = r - t here is
the same number, so opendit's DiT takes (t, h = r - t) with a second timestep embedder (``h_embedder``).

What follows the released code (meanflow.py, configs/default.py): t' and r' each logit-normal (P_mean -0.4, P_std
1.0) on its axis, sorted so that t' >= r'; a fraction ``data_proportion`` (0.75) of the batch has r = t (plain flow
matching); the per-sample loss is the *sum* over the non-batch dimensions of (u - u_tgt)^2, divided by
sg((loss + norm_eps)^norm_p) (norm_p 1.0, norm_eps 0.01); guidance is trained in: where t' lies in [t_start, t_end],
v is replaced by omega v + (1 - omega - kappa) v_uncond + kappa v_cond, the network's own predictions at r = t (no
gradient) with the null label and with the label (omega 1.0, kappa 0.5); a sample whose label was dropped keeps v.
Samples are drawn at guidance 1 (it is in the weights).

The JVP is taken on the plain module in its own forward without autograd (``torch.autograd.forward_ad`` with tangents
on x_t and t only; attention through the Triton kernel that computes its JVP on a GPU, else SDPA's math path, which
has forward-mode AD), then the ordinary forward and backward run through the wrapper (DDP, FSDP2): forward AD never
meets the wrappers' hooks on the backward pass.
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD

from .transport import prediction_of


def unwrap(model):
    """The plain module under a DistributedDataParallel wrapper (FSDP2 shards in place: the module itself)."""
    return getattr(model, "module", model)


def jvp_attention_kernel_usable(device) -> bool:
    """Whether the Triton attention-with-JVP kernel can run for ``device`` (a CUDA GPU with Triton)."""
    from ..kernels import kernels_available

    return torch.device(device).type == "cuda" and kernels_available(torch.device(device)) is None


@contextlib.contextmanager
def forward_ad_attention(model=None, device=None):
    """Attention that forward-mode AD can pass: on a GPU with Triton, the model's attention switched to the Triton
    kernel that computes the JVP with the output (``kernels.attention_jvp``); elsewhere SDPA restricted to its math
    path (the fused flash / memory-efficient kernels have no forward-mode AD)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    blocks = getattr(model, "blocks", None)
    if blocks is not None and device is not None and jvp_attention_kernel_usable(device):
        before = [b.attn.impl for b in blocks]
        for b in blocks:
            b.attn.impl = "jvp_kernel"
        try:
            yield
        finally:
            for b, impl in zip(blocks, before):
                b.attn.impl = impl
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


class MeanFlow:
    """The MeanFlow objective: ``sample_timesteps`` (t and r, stacked), ``training_losses`` and ``sample``."""

    def __init__(self, *, p_mean: float = -0.4, p_std: float = 1.0, data_proportion: float = 0.75,
                 omega: float = 1.0, kappa: float = 0.5, t_start: float = 0.0, t_end: float = 1.0,
                 norm_p: float = 1.0, norm_eps: float = 0.01):
        if p_std <= 0:
            raise ValueError(f"p_std must be positive, got {p_std}")
        if not 0.0 <= data_proportion <= 1.0:
            raise ValueError(f"data_proportion must be in [0, 1], got {data_proportion}")
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(f"need 0 <= t_start <= t_end <= 1, got {t_start}, {t_end}")
        if norm_eps <= 0 or norm_p < 0:
            raise ValueError(f"need norm_eps > 0 and norm_p >= 0, got {norm_eps}, {norm_p}")
        self.p_mean, self.p_std, self.data_proportion = float(p_mean), float(p_std), float(data_proportion)
        self.omega, self.kappa, self.t_start, self.t_end = float(omega), float(kappa), float(t_start), float(t_end)
        self.norm_p, self.norm_eps = float(norm_p), float(norm_eps)

    def __repr__(self) -> str:
        return (f"MeanFlow(t, r logit-normal({self.p_mean:g}, {self.p_std:g}) on the released axis, r = t for "
                f"{self.data_proportion:g}, omega {self.omega:g}, kappa {self.kappa:g}, adaptive weight p "
                f"{self.norm_p:g}, eps {self.norm_eps:g})")

    @property
    def guided(self) -> bool:
        """Guidance is trained in (omega != 1 or kappa != 0): sample at guidance 1."""
        return self.omega != 1.0 or self.kappa != 0.0

    # ------------------------------------------------------------------ training

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(n, 2) float32: [t, r] on opendit's axis (t <= r; r = t for int(n * data_proportion) samples, at random
        positions of the batch)."""
        a = torch.sigmoid(self.p_mean + self.p_std * torch.randn(n, generator=generator, device=device))
        b = torch.sigmoid(self.p_mean + self.p_std * torch.randn(n, generator=generator, device=device))
        t_rel, r_rel = torch.maximum(a, b), torch.minimum(a, b)  # the released axis: t' >= r'
        same = torch.zeros(n, dtype=torch.bool, device=device)
        same[torch.randperm(n, generator=generator, device=device)[:int(n * self.data_proportion)]] = True
        r_rel = torch.where(same, t_rel, r_rel)
        return torch.stack([1.0 - t_rel, 1.0 - r_rel], dim=1)

    def guided_velocity(self, model, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, model_kwargs: dict):
        """The velocity of the target with guidance trained in (the released ``guidance_fn`` and ``cond_drop``)."""
        if not self.guided:
            return v
        y = model_kwargs["y"]
        drop = model_kwargs.get("force_drop_ids")
        inside = ((1.0 - t) >= self.t_start) & ((1.0 - t) <= self.t_end)  # the released axis
        plain, keep = unwrap(model), torch.zeros_like(y, dtype=torch.bool)  # no random label dropout in these calls
        with torch.no_grad():
            null = torch.full_like(y, plain.num_classes)
            v_uncond = prediction_of(plain(x_t, t, y=null, r=t, force_drop_ids=keep), x_t).to(v.dtype)
            v_cond = prediction_of(plain(x_t, t, y=y, r=t, force_drop_ids=keep), x_t).to(v.dtype) if self.kappa else 0.0
        shape = (-1,) + (1,) * (v.ndim - 1)
        omega = torch.where(inside, self.omega, 1.0).reshape(shape).to(v.dtype)
        kappa = torch.where(inside, self.kappa, 0.0).reshape(shape).to(v.dtype)
        v_g = omega * v + (1 - omega - kappa) * v_uncond + kappa * v_cond
        if drop is not None:  # a dropped label trains the unconditional velocity: plain v
            v_g = torch.where(drop.reshape(shape).bool(), v, v_g)
        return v_g

    def training_losses(self, model, x1: torch.Tensor, model_kwargs: dict | None = None, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, r: torch.Tensor | None = None) -> dict:
        """Per-sample {"loss" (adaptive-weighted), "mse" (mean square error to the target), "sum"} of ``model`` (called
        as ``model(x_t, t, r=r, **model_kwargs)``) on data ``x1``. ``t``: (N,) with ``r``, or (N, 2) [t, r] as
        ``sample_timesteps`` draws them; drawn (global RNG) when None."""
        kw = dict(model_kwargs or {})
        if t is None:
            t = self.sample_timesteps(x1.shape[0], device=x1.device)
        if r is None:  # as sample_timesteps draws them (r >= t by construction: no check, no host sync per step)
            if t.ndim != 2:
                raise ValueError("MeanFlow needs two times: t (N, 2) = [t, r], or t and r")
            t, r = t[:, 0], t[:, 1]
        elif torch.any(r < t):  # given separately (the Python API): checked
            raise ValueError("MeanFlow: r < t for some samples; the interval runs from t (noisier) to r >= t")
        x0 = torch.randn_like(x1) if noise is None else noise
        plain = unwrap(model)
        dropout = getattr(getattr(plain, "y_embedder", None), "dropout_prob", 0.0)
        if "y" in kw and kw.get("force_drop_ids") is None and plain.training and dropout > 0:
            # the model would drop labels at random in each of the calls below: draw the drops once, for all of them
            kw["force_drop_ids"] = torch.rand(len(kw["y"]), device=x1.device) < dropout
        shape = (-1,) + (1,) * (x1.ndim - 1)
        tt = t.to(x1.dtype).reshape(shape)
        x_t = tt * x1 + (1 - tt) * x0
        v = x1 - x0
        v_g = self.guided_velocity(model, x_t, t, v, kw)
        with torch.no_grad(), forward_ad_attention(plain, x1.device), fwAD.dual_level():  # d/dt u along (v_g, 1, 0)
            out = plain(fwAD.make_dual(x_t, v_g), fwAD.make_dual(t, torch.ones_like(t)), r=r, **kw)
            du_dt = fwAD.unpack_dual(prediction_of(out, x_t)).tangent
        u = prediction_of(model(x_t, t, r=r, **kw), x_t)
        u_tgt = (v_g + (r - t).to(v_g.dtype).reshape(shape) * du_dt.to(v_g.dtype)).detach()
        err = (u.float() - u_tgt.float()) ** 2
        total = err.flatten(1).sum(1)
        loss = total / (total.detach() + self.norm_eps) ** self.norm_p
        return {"loss": loss, "mse": err.flatten(1).mean(1), "sum": total}

    # ------------------------------------------------------------------ sampling

    @staticmethod
    def grid(steps: int, device=None) -> torch.Tensor:
        """The times of a ``steps``-call sampler: uniform from 0 (noise) to 1 (data), float64 (1 step: [0, 1], the
        released default; 2 steps: [0, 0.5, 1])."""
        if steps < 1:
            raise ValueError(f"MeanFlow sampling needs at least 1 step, got {steps}")
        return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=device)

    @torch.no_grad()
    def sample(self, model, noise: torch.Tensor, model_kwargs: dict | None = None, steps: int = 1) -> torch.Tensor:
        """x_{k+1} = x_k + (r_k - t_k) u(x_k, t_k, r_k) on ``grid(steps)``, from ``noise``: ``steps`` network calls."""
        x = noise
        grid = self.grid(steps).tolist()
        for t0, t1 in zip(grid[:-1], grid[1:]):
            t = torch.full((x.shape[0],), t0, device=x.device, dtype=torch.float32)
            r = torch.full((x.shape[0],), t1, device=x.device, dtype=torch.float32)
            u = prediction_of(model(x, t, r=r, **(model_kwargs or {})), x)
            x = x + (t1 - t0) * u.to(x.dtype)
        return x


def create_meanflow(*, p_mean: float = -0.4, p_std: float = 1.0, data_proportion: float = 0.75, omega: float = 1.0,
                    kappa: float = 0.5, t_start: float = 0.0, t_end: float = 1.0, norm_p: float = 1.0,
                    norm_eps: float = 0.01) -> MeanFlow:
    """MeanFlow with the released code's names and defaults (configs/default.py of Gsunshine/meanflow): ``p_mean``,
    ``p_std``, ``t_start`` and ``t_end`` are on the released axis (t = 1 noise); see the module doc."""
    return MeanFlow(p_mean=p_mean, p_std=p_std, data_proportion=data_proportion, omega=omega, kappa=kappa,
                    t_start=t_start, t_end=t_end, norm_p=norm_p, norm_eps=norm_eps)
