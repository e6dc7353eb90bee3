"""Flow matching (opendit.transport): losses against closed forms, samplers against a toy with an exact velocity field,
the guidance interval, the timestep shift."""

import math
import sys

import numpy as np
import pytest
import torch

from opendit.models import DiT_models
from opendit.sampling.generate import GuidedModel, generate, guidance_time, noise_level
from opendit.transport import Sampler, create_transport, shift_times, time_grid

# ----------------------------------------------------------------------------- closed forms, written independently


def coefficients(path: str, t: np.ndarray):
    """(alpha, d alpha, sigma, d sigma) in float64 numpy, straight from the papers' definitions."""
    if path == "Linear":
        return t, np.ones_like(t), 1 - t, -np.ones_like(t)
    if path == "GVP":
        h = np.pi / 2
        return np.sin(h * t), h * np.cos(h * t), np.cos(h * t), -h * np.sin(h * t)
    bmin, bmax = 0.1, 20.0  # VP: alpha = exp(-(1-t)^2 (bmax-bmin)/4 - (1-t) bmin/2)
    log_a = -0.25 * (1 - t) ** 2 * (bmax - bmin) - 0.5 * (1 - t) * bmin
    a = np.exp(log_a)
    da = a * (0.5 * (1 - t) * (bmax - bmin) + 0.5 * bmin)
    s = np.sqrt(1 - a ** 2)
    return a, da, s, -a * da / s


def toy_model(x, t, y=None):
    """A fixed nonlinear 'network' (float64): any function of (x, t) will do for checking the loss arithmetic."""
    te = t.reshape(-1, 1, 1, 1).to(x.dtype)
    return torch.tanh(0.7 * x) * (1 + te) - 0.3 * te


@pytest.mark.parametrize("path", ["Linear", "GVP", "VP"])
@pytest.mark.parametrize("prediction,weight", [("velocity", None), ("noise", None), ("noise", "velocity"),
                                               ("noise", "likelihood"), ("score", None), ("score", "likelihood")])
def test_flow_loss_equals_the_closed_form(path, prediction, weight):
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    x0 = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.2, 0.4, 0.5, 0.75, 0.95], dtype=torch.float64)
    tr = create_transport(path, prediction, weight)
    got = tr.training_losses(toy_model, x1, t=t, noise=x0)["loss"]

    a, da, s, ds = (v.reshape(-1, 1, 1, 1) for v in coefficients(path, t.numpy()))
    xt = a * x1.numpy() + s * x0.numpy()
    out = toy_model(torch.from_numpy(xt), t).numpy()
    if prediction == "velocity":
        err = out - (da * x1.numpy() + ds * x0.numpy())
    elif prediction == "noise":
        err = out - x0.numpy()
    else:
        err = out * s + x0.numpy()
    drift_var = da / a * s ** 2 - s * ds  # the diffusion coefficient of the path's SDE
    w = {None: 1.0, "velocity": (drift_var / s) ** 2, "likelihood": drift_var / s ** 2}[weight]
    want = (w * err ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)


def test_learn_sigma_output_uses_the_first_half_and_cosine_loss_adds_its_term():
    g = torch.Generator().manual_seed(1)
    x1, x0 = torch.randn(2, 4, 6, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    junk = torch.randn(4, 6, 4, 4, generator=g, dtype=torch.float64)

    def doubled(x, t):  # a learn_sigma DiT's 2C channels: the prediction, then unused ones
        return torch.cat([toy_model(x, t), junk], dim=1)

    plain = create_transport().training_losses(toy_model, x1, t=t, noise=x0)["loss"]
    assert torch.equal(create_transport().training_losses(doubled, x1, t=t, noise=x0)["loss"], plain)

    terms = create_transport(cosine_loss=0.5).training_losses(toy_model, x1, t=t, noise=x0)
    xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    v, u = toy_model(xt, t), x1 - x0
    cos = (v * u).sum(1) / (v.norm(dim=1) * u.norm(dim=1))  # over channels, per position
    want_cos = (1 - cos).mean(dim=(1, 2))
    torch.testing.assert_close(terms["cos"], want_cos, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["loss"], plain + 0.5 * want_cos, rtol=1e-12, atol=1e-12)
    # one channel: the cosine is +-1 everywhere (no gradient; infinite near a zero prediction): refused
    with pytest.raises(ValueError, match="with 1 channel"):
        create_transport(cosine_loss=1.0).training_losses(toy_model, x1[:, :1], t=t, noise=x0[:, :1])


def test_time_sampling_interval_and_logit_normal():
    assert create_transport().train_interval() == (0.0, 1.0)
    assert create_transport(prediction="noise").train_interval() == (1e-3, 1 - 1e-3)
    assert create_transport("VP").train_interval() == (0.0, 1 - 1e-5)
    g = torch.Generator().manual_seed(0)
    t = create_transport(time_sampling="logit_normal", time_mean=0.5, time_std=0.8).sample_timesteps(200_000, g)
    logit = torch.log(t / (1 - t)).double()
    # logit(t) ~ N(0.5, 0.8^2): mean and std within 5 standard errors (0.8 / sqrt(2e5) = 0.0018)
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.8) < 0.01
    u = create_transport(prediction="noise").sample_timesteps(100_000, g)
    assert u.min() >= 1e-3 and u.max() <= 1 - 1e-3 and abs(u.mean().item() - 0.5) < 0.005


@pytest.mark.parametrize("bad", [dict(path_type="Cosine"), dict(prediction="eps"), dict(loss_weight="snr"),
                                 dict(prediction="noise", cosine_loss=1.0), dict(train_eps=0.7)])
def test_create_transport_refuses_unknown_settings(bad):
    with pytest.raises(ValueError):
        create_transport(**bad)


# ----------------------------------------------------------------------------- samplers on an exact toy
# data x1 ~ N(m, s^2) (1-d, as a (N, 1, 1, 1) image); on the Linear path x_t ~ N(t m, t^2 s^2 + (1 - t)^2) and the
# probability-flow ODE maps z to exactly m + s z.
M, S = 1.5, 0.5


def exact_velocity(x, t, y=None):
    te = t.reshape(-1, 1, 1, 1).to(x.dtype)
    var = te ** 2 * S ** 2 + (1 - te) ** 2
    e_x1 = M + te * S ** 2 * (x - te * M) / var
    e_x0 = (1 - te) * (x - te * M) / var
    return e_x1 - e_x0


def exact_noise(x, t, y=None):  # E[x0 | x_t]
    te = t.reshape(-1, 1, 1, 1).to(x.dtype)
    return (1 - te) * (x - te * M) / (te ** 2 * S ** 2 + (1 - te) ** 2)


def ode_error(method: str, points: int, z: torch.Tensor) -> float:
    x = Sampler(create_transport()).sample_ode(sampling_method=method, num_steps=points).final(z, exact_velocity)
    return (x - (M + S * z)).abs().max().item()


def test_euler_is_first_order_and_heun_second_order():
    z = torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    euler = [ode_error("euler", n + 1, z) for n in (32, 64, 128)]
    heun = [ode_error("heun", n + 1, z) for n in (32, 64, 128)]
    # halving the step halves Euler's error and quarters Heun's (asymptotic ratios 2 and 4; +-15%)
    for e in (euler, heun):
        assert e[0] > e[1] > e[2]
    assert all(1.7 < euler[i] / euler[i + 1] < 2.3 for i in range(2)), euler
    assert all(3.4 < heun[i] / heun[i + 1] < 4.6 for i in range(2)), heun
    assert ode_error("heun2", 33, z) == heun[0]  # torchdiffeq's name for the same method


def test_trajectory_convention():
    z = torch.randn(8, 1, 1, 1, dtype=torch.float64)
    sampler = Sampler(create_transport())
    ode = sampler.sample_ode(sampling_method="euler", num_steps=5)(z, exact_velocity)
    assert len(ode) == 5 and ode[0] is z  # the grid's points, from the noise
    sde = sampler.sample_sde(diffusion_form="sigma", num_steps=5)(z, exact_velocity)
    assert len(sde) == 5  # 4 SDE steps and the last step, as published
    torch.manual_seed(0)
    a = sampler.sample_sde(diffusion_form="sigma", num_steps=5)(z, exact_velocity)[-1]
    torch.manual_seed(0)
    b = sampler.sample_sde(diffusion_form="sigma", num_steps=5).final(z, exact_velocity)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method,calls", [("Euler", 4 + 1), ("Heun", 2 * 4 + 1)])
def test_sde_evaluates_the_model_once_per_drift(method, calls):
    n = {"calls": 0}

    def counted(x, t, y=None):
        n["calls"] += 1
        return exact_velocity(x, t)

    z = torch.randn(8, 1, 1, 1, dtype=torch.float64)
    Sampler(create_transport()).sample_sde(sampling_method=method, diffusion_form="sigma", num_steps=5).final(z, counted)
    assert n["calls"] == calls  # 4 steps (Heun: 2 drifts each) and the Mean last step; velocity and score share one


@pytest.mark.parametrize("method", ["Euler", "Heun"])
def test_sde_reproduces_the_data_mean_and_variance(method):
    torch.manual_seed(0)
    z = torch.randn(20_000, 1, 1, 1, dtype=torch.float64)
    x = Sampler(create_transport()).sample_sde(sampling_method=method, diffusion_form="sigma",
                                               num_steps=200).final(z, exact_velocity)
    # standard errors: mean S/sqrt(N) = 0.0035, std S/sqrt(2N) = 0.0025; allow ~4 of them plus the O(dt) bias
    assert abs(x.mean().item() - M) < 0.02 and abs(x.std().item() - S) < 0.02


def test_noise_prediction_samples_through_the_score():
    tr = create_transport(prediction="noise")  # sample_eps 1e-3: the grid stops short of the singular ends
    z = torch.randn(512, 1, 1, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = Sampler(tr).sample_ode(sampling_method="heun", num_steps=401).final(z, exact_noise)
    # starting at t0 = 1e-3 instead of 0 and ending at 1 - 1e-3 moves the map by O(1e-3)
    assert (x - (M + S * z)).abs().max().item() < 5e-3


def test_dopri5_matches_a_fine_heun_solution():
    pytest.importorskip("torchdiffeq")
    z = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sampler = Sampler(create_transport())
    heun = sampler.sample_ode(sampling_method="heun", num_steps=1025).final(z, exact_velocity)
    dopri = sampler.sample_ode(sampling_method="dopri5", num_steps=2, atol=1e-9, rtol=1e-9).final(z, exact_velocity)
    # fine Heun's own error here is ~1e-6 (second order from ~2e-3 at 33 points)
    torch.testing.assert_close(dopri, heun, rtol=0, atol=1e-5)
    loose = sampler.sample_ode(sampling_method="dopri5", num_steps=2).final(z, exact_velocity)  # published tolerances
    assert (loose - heun).abs().max() < 0.05


def test_torchdiffeq_method_without_torchdiffeq_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    with pytest.raises(ImportError, match="pip install torchdiffeq"):
        Sampler(create_transport()).sample_ode(sampling_method="dopri5", num_steps=2)


def test_sbdm_at_pure_noise_is_refused():
    with pytest.raises(ValueError, match="sample_eps"):
        Sampler(create_transport()).sample_sde(diffusion_form="SBDM")
    Sampler(create_transport(sample_eps=0.04)).sample_sde(diffusion_form="SBDM")  # fine with a margin


def test_timestep_shift():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = shift_times(t, 0.3)
    torch.testing.assert_close(s, 0.3 * t / (1 - 0.7 * t))
    assert s[0] == 0 and s[-1] == 1 and torch.all(s <= t)  # the grid moves towards noise, the ends stay
    assert torch.equal(time_grid(0, 1, 11, 1.0), t)
    with pytest.raises(ValueError):
        time_grid(0, 1, 1)


# ----------------------------------------------------------------------------- guidance interval

def tiny_dit():
    torch.manual_seed(0)
    m = DiT_models["DiT-N/2"](input_size=8, in_channels=1, num_classes=10).double().eval()
    for p in m.parameters():  # away from the zero-initialized output, so that guidance changes something
        p.data.add_(0.05 * torch.randn_like(p))
    return m


def test_cfg_interval_guides_inside_only():
    m = tiny_dit()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    xx, y = torch.cat([x, x]), torch.tensor([1, 2, 3, 10, 10, 10])
    flow = create_transport()
    guided = GuidedModel(m, flow, 2.0, None, (0.3, 0.6))
    for tv in (0.3, 0.45, 0.6):  # inside (ends included): plain guidance
        t = torch.full((6,), tv)
        assert torch.equal(guided(xx, t, y), m.forward_with_cfg(xx, t, y, 2.0))
    calls, forward = [], m.forward
    m.forward = lambda x, t, y, **kw: (calls.append(len(x)), forward(x, t, y, **kw))[1]  # count each forward's batch
    for tv in (0.0, 0.29, 0.61, 1.0):  # outside: the conditional prediction, for both halves, from the half batch
        t = torch.full((6,), tv)
        cond = m(xx, t, y)[:3]  # what the doubled batch gives its conditional half
        # the same per-sample arithmetic on a batch of 3 instead of 6 (float64; only BLAS blocking may differ)
        torch.testing.assert_close(guided(xx, t, y), torch.cat([cond, cond]), rtol=1e-12, atol=1e-14)
    assert calls == [6, 3] * 4  # one forward of 3 samples per unguided call (the 6 are the reference's)
    # a diffusion timestep k (0..999) is at 1 - k/1000 on the same axis
    assert guidance_time(None, torch.tensor([999.0])) == pytest.approx(0.001)
    assert guidance_time(flow, torch.tensor([0.25])) == 0.25


@pytest.mark.parametrize("sampler,objective", [("ode", "flow"), ("sde", "flow"), ("dpm-solver++", None),
                                               ("ddim", None), ("ddpm", None)])
def test_cfg_interval_covering_everything_is_plain_guidance(sampler, objective):
    m = tiny_dit()
    obj = create_transport() if objective == "flow" else None
    y, z = torch.tensor([0, 5]), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    kw = dict(sampler=sampler, steps=6, cfg_scale=3.0, objective=obj)
    torch.manual_seed(1)
    plain = generate(m, y, z, **kw)
    for interval in (dict(cfg_interval=(0.0, 1.0)), dict(cfg_interval_sigma=(0.0, math.inf))):  # either axis
        torch.manual_seed(1)
        assert torch.equal(generate(m, y, z, **interval, **kw), plain), interval
    torch.manual_seed(1)
    empty = generate(m, y, z, cfg_interval=(0.0, 0.0) if objective else (1.0, 1.0), **kw)
    assert not torch.allclose(empty, plain)  # guidance at (almost) no step: different samples


# ----------------------------------------------------------------------------- guidance interval on the sigma axis

def dit_sigmas() -> np.ndarray:
    """sqrt(1 / abar_k - 1) of DiT's schedule, written out: 1000 linear betas from 1e-4 to 0.02, float64."""
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    return np.sqrt(1.0 / abar - 1.0)


def recorded_calls(m, fn):
    """[(batch, t of the call)] of every model forward while fn() runs."""
    calls, forward = [], m.forward
    m.forward = lambda x, t, y, **kw: (calls.append((len(x), float(t.reshape(-1)[0]))), forward(x, t, y, **kw))[1]
    try:
        fn()
    finally:
        m.forward = forward
    return calls


@pytest.mark.parametrize("sampler,objective,steps", [("ode", "flow", 9), ("sde", "flow", 9), ("ddpm", None, 25),
                                                     ("dpm-solver++", None, 12)])
def test_cfg_interval_sigma_guides_exactly_the_calls_whose_noise_level_is_inside(sampler, objective, steps):
    m = tiny_dit()
    obj = create_transport() if objective == "flow" else None
    y, z = torch.tensor([0, 5]), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    lo, hi = (0.5, 4.0) if objective == "flow" else (0.5, 20.0)
    calls = recorded_calls(m, lambda: generate(m, y, z, sampler=sampler, steps=steps, cfg_scale=3.0, objective=obj,
                                               cfg_interval_sigma=(lo, hi)))
    if objective == "flow":
        sigma = [math.inf if t == 0 else (1 - t) / t for _, t in calls]  # Linear path: x_t = t x1 + (1 - t) x0
    else:
        sigma = [dit_sigmas()[int(t)] for _, t in calls]
    assert all(min(abs(s - lo), abs(s - hi)) > 1e-3 for s in sigma)  # no call on an edge: the test is exact
    guided = [n == 4 for n, _ in calls]  # a guided call runs the doubled batch, an unguided one the conditional half
    assert guided == [lo <= s <= hi for s in sigma]
    assert 0 < sum(guided) < len(guided)  # both kinds occur


def test_the_two_interval_axes_are_one_line_errors():
    from opendit.errors import UserError
    from opendit.sampling.generate import guidance_interval

    with pytest.raises(UserError, match="both give the guidance interval"):
        guidance_interval((0.0, 1.0), (0.0, 1.0))
    with pytest.raises(UserError, match="need 0 <= LO <= HI"):
        guidance_interval(None, (3.0, 2.0))
    with pytest.raises(UserError, match="need 0 <= LO <= HI"):
        guidance_interval((0.7, 0.3), None)
    # the axes in numbers: t = 0.3 is sigma 7/3 on the Linear path and sigma 12.0 at DiT's step 700
    assert noise_level(create_transport(), torch.tensor([0.3], dtype=torch.float64)) == pytest.approx(7 / 3)
    assert noise_level(None, torch.tensor([700.0])) == pytest.approx(dit_sigmas()[700], rel=1e-6)
    assert noise_level(None, torch.tensor([700.0])) == pytest.approx(12.02, abs=0.01)
