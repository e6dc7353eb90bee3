"""The sync-free training step (bad steps skipped on the device: the fused AdamW's found_inf, the EMA times the flag,
the flags read one step late) against the host guard it replaces: the same steps skipped, and after every step the
same parameters, optimizer state, EMA and loss scale, bit for bit (the two paths run the same kernels on good steps,
so there is nothing to round differently). Two processes with a NaN on one rank: test_reliability."""

import pytest
import torch

from opendit.diffusion import create_diffusion
from opendit.distributed import DistEnv
from opendit.models import DiT
from opendit.precision import Precision
from opendit.training.ema import EMA
from opendit.training.optim import build_optimizer
from opendit.training.step import StepBatch, train_step, updates_on_device

from helpers import perturbed

CPU = torch.device("cpu")


def tiny() -> DiT:
    torch.manual_seed(0)  # perturbed off adaLN-Zero's identity start, so that every weight gets a gradient
    return perturbed(DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                         num_classes=10))


def batch(step: int, poison: str | None = None, scale: float = 1.0) -> StepBatch:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(6, 1, 8, 8, generator=g) * scale
    if poison == "nan":
        x[0, 0, 0, 0] = float("nan")
    drop = torch.rand(6, generator=g) < 0.2  # given: the model draws none from the global RNG
    return StepBatch(x, torch.randint(0, 10, (6,), generator=g), torch.randint(0, 1000, (6,), generator=g), drop,
                     torch.randn(6, 1, 8, 8, generator=g))


class Run:
    """A model, its fused AdamW, EMA and precision, stepped along a script of batches."""

    def __init__(self, precision: str = "fp32", init_scale: float | None = None):
        self.model = tiny()
        self.opt = build_optimizer(self.model, 1e-2, CPU, impl="fused")
        self.ema = EMA(self.model)
        self.precision = Precision(precision, CPU)
        if init_scale is not None:
            self.precision.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)

    def step(self, b: StepBatch, on_device: bool, n: int, poison_grad: bool = False):
        """``poison_grad``: one weight's gradient made infinite in the backward pass (the loss stays finite)."""
        hook = None
        if poison_grad:
            hook = self.model.final_layer.linear.weight.register_hook(lambda g: g + float("inf"))
        try:
            return train_step(self.model, self.model, self.opt, create_diffusion(""), b, lr=1e-2, grad_clip=1.0,
                              precision=self.precision, ema=self.ema, ema_decay=0.9, env=DistEnv(), step_number=n,
                              on_device=on_device)
        finally:
            if hook is not None:
                hook.remove()


def assert_same_state(a: Run, b: Run, where: str) -> None:
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), (where, "param", name)
    for p, q in zip(a.ema.shadow, b.ema.shadow):
        assert torch.equal(p, q), (where, "ema")
    sa, sb = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    for k in sa.keys() | sb.keys():
        # the one difference allowed: a skipped first step leaves AdamW's state uncreated on the host path and created
        # at its starting value (step 0, zero moments) on the device path (the kernel runs, then undoes the count):
        # the next update is the same from both
        fresh = {key: torch.zeros_like(v) for key, v in (sa.get(k) or sb[k]).items()}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa.get(k, fresh)[key], sb.get(k, fresh)[key]), (where, k, key)
    if a.precision.scaler is not None:
        assert a.precision.scaler.get_scale() == b.precision.scaler.get_scale(), where


def test_the_fused_optimizer_is_the_one_that_updates_on_the_device():
    assert updates_on_device(build_optimizer(tiny(), 1e-3, CPU, impl="fused"))
    assert not updates_on_device(build_optimizer(tiny(), 1e-3, CPU, impl="foreach"))
    assert not updates_on_device(build_optimizer(tiny(), 1e-3, CPU))  # auto on a CPU: foreach, as before
    model = tiny()
    with pytest.raises(ValueError, match="fused"):
        train_step(model, model, build_optimizer(model, 1e-3, CPU), create_diffusion(""), batch(1), lr=1e-3,
                   grad_clip=1.0, precision=Precision("fp32", CPU), ema=EMA(model), ema_decay=0.9, env=DistEnv(),
                   on_device=True)


def test_a_nan_loss_is_skipped_on_the_device_exactly_as_on_the_host():
    """Steps 1, 3, 5 good; 2 a NaN loss; 4 a finite loss with an infinite gradient (only the norm's flag is set)."""
    script = [(batch(1), False), (batch(2, "nan"), False), (batch(3), False), (batch(4), True), (batch(5), False)]
    host, device = Run(), Run()
    for n, (b, poison) in enumerate(script, 1):
        before = [p.detach().clone() for p in device.model.parameters()]
        rh, rd = host.step(b, False, n, poison), device.step(b, True, n, poison)
        assert rd.flags.on_host is False  # nothing read yet: no host sync in the step
        assert (rh.nonfinite_loss, rh.nonfinite_grad) == (rd.nonfinite_loss, rd.nonfinite_grad) == \
            {2: (True, True), 4: (False, True)}.get(n, (False, False)), n
        assert (rh.updated, rh.skipped) == (rd.updated, rd.skipped), n
        assert_same_state(host, device, f"after step {n}")
        changed = any(not torch.equal(p, q) for p, q in zip(before, device.model.parameters()))
        assert changed == (n in (1, 3, 5)) == rd.updated, n
    assert host.opt.state_dict()["state"][0]["step"] == 3  # two of the five steps were not counted


def test_fp16_overflow_backs_off_alike_on_the_device_and_on_the_host():
    """A loss scale of 2^24 overflows fp16 gradients: the scaler skips and halves until they fit, updates, grows the
    scale again after two good steps (and may overflow again). The device path takes the same steps, with the same
    scale after each."""
    host, device = Run("fp16", init_scale=2.0**24), Run("fp16", init_scale=2.0**24)
    overflows = []
    for n in range(1, 13):
        b = batch(n)
        rh, rd = host.step(b, False, n), device.step(b, True, n)
        assert (rh.overflow, rh.updated, rh.skipped) == (rd.overflow, rd.updated, rd.skipped), n
        overflows.append(rh.overflow)
        assert_same_state(host, device, f"after step {n}")
    assert overflows[0] and overflows.count(False) >= 3, overflows  # both kinds of step were exercised


def test_the_torch_private_hooks_still_do_what_the_step_relies_on():
    """The two private hooks (opendit.training.torch_private) against this torch: a fused AdamW skips its update and
    keeps its step count where found_inf is 1; a GradScaler takes the flags set after unscale_, skips and backs off.
    A torch that changes either fails here (and the step says what to do instead) rather than training wrongly."""
    from opendit.training.torch_private import optimizer_found_inf, set_scaler_found_inf

    def fresh():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 3))
        opt = torch.optim.AdamW([w], lr=0.1, fused=True)
        w.grad = torch.ones_like(w)
        return w, opt

    w, opt = fresh()
    before = w.detach().clone()
    with optimizer_found_inf(opt, torch.tensor(1.0)):
        opt.step()
    assert torch.equal(w, before) and float(opt.state[w]["step"]) == 0 and not hasattr(opt, "found_inf")
    with optimizer_found_inf(opt, torch.tensor(0.0)):
        opt.step()
    w2, opt2 = fresh()
    opt2.step()
    assert torch.equal(w, w2) and float(opt.state[w]["step"]) == 1  # a 0 flag: exactly the plain step

    w, opt = fresh()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    w.grad = None
    scaler.scale((w * 1.0).sum()).backward()  # gradients of 8: finite
    scaler.unscale_(opt)
    set_scaler_found_inf(scaler, opt, torch.tensor(1.0))  # finite gradients, flagged as bad: skipped all the same
    before = w.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w, before) and scaler.get_scale() == 4.0

    class ChangedScaler:  # what a torch without the private state looks like
        pass

    with pytest.raises(RuntimeError, match="no longer has"):
        set_scaler_found_inf(ChangedScaler(), opt, torch.tensor(1.0))
