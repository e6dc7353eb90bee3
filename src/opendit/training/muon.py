"""Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks") for the transformer blocks'
2-D weight matrices, AdamW for every other parameter, as one optimizer (one state dict, one learning-rate schedule).

Muon's update of a weight matrix W with gradient G (momentum mu, Nesterov), as the released code and torch.optim.Muon
compute it:

    B <- lerp(B, G, 1 - mu)          U <- lerp(G, B, mu)   (Nesterov; U = B without)
    O <- NS5(U)                      the quintic Newton-Schulz iteration (a, b, c) = (3.4445, -4.7750, 2.0315), 5 steps,
                                     in bf16, on U / ||U||_F (transposed when taller than wide): ~ the orthogonal
                                     factor of U
    W <- W - lr * 0.2 * sqrt(max(rows, cols)) * O

The scale 0.2 sqrt(max(A, B)) is Moonshot's ("Muon is Scalable for LLM Training", 2025; torch's
``adjust_lr_fn="match_rms_adamw"``): it gives the update AdamW's RMS, so AdamW's learning rate and schedule carry over
unchanged -- one ``--lr`` for both parts. Weight decay 0 (as the DiT recipes' AdamW).

Which parameters: the 2-D weights inside ``blocks`` (attention, MLP and adaLN-modulation matrices); the patch and
label embedders, the timestep MLP, the final layer, biases and norm gains go to AdamW (Muon is for hidden layers).

Sharded parameters (FSDP2 / zero2: DTensors sharded along rows): each rank gathers the whole momentum-updated matrix,
orthogonalizes it (the same arithmetic on every rank) and keeps its own rows of the update -- the result is the one a
single process computes.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def muon_parameter(name: str, p: torch.Tensor) -> bool:
    """Whether Muon updates this parameter: a 2-D weight matrix of a transformer block."""
    return p.ndim == 2 and name.startswith("blocks.")


def newton_schulz(u: torch.Tensor, steps: int = NS_STEPS, coefficients=NS_COEFFICIENTS,
                  eps: float = NS_EPS) -> torch.Tensor:
    """The quintic Newton-Schulz iteration towards the orthogonal factor of the 2-D ``u`` (in bf16, as released)."""
    a, b, c = coefficients
    x = u.bfloat16()
    tall = u.size(0) > u.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):  # x <- a x + (b G + c G^2) x, G = x x^T (as torch.optim.Muon: two fused addmm)
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def rms_matching_scale(shape) -> float:
    """Moonshot's scale: an orthogonalized update times 0.2 sqrt(max(A, B)) has AdamW's typical RMS."""
    return 0.2 * math.sqrt(max(shape[0], shape[1]))


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every rank) as ``param`` holds it: this rank's shard of a DTensor, else itself."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on ``muon_params``, AdamW (decoupled weight decay 0) on ``adamw_params``: two parameter groups
    (``use_muon`` True / False) sharing ``lr``."""

    def __init__(self, muon_params, adamw_params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 momentum: float = 0.95, nesterov: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov)
        super().__init__([dict(params=list(muon_params), use_muon=True),
                          dict(params=list(adamw_params), use_muon=False)], defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["use_muon"] else self._adamw)(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - mu)
        u = p.grad.lerp(buf, mu) if group["nesterov"] else buf
        update = _like(newton_schulz(_whole(u)).to(p.dtype), p)
        p.add_(update, alpha=-group["lr"] * rms_matching_scale(p.shape))

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        (beta1, beta2), g = group["betas"], p.grad
        state["step"] += 1
        step = state["step"].item()
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)
