import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from opendit.diffusion import (
    GaussianDiffusion,
    ModelVarType,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    dpm_solver_timesteps,
    normal_kl,
    space_timesteps,
)


def hand_schedule(T: int = 1000):
    """betas, alphas_cumprod and alphas_cumprod_prev with numpy float64, from the facts file."""
    scale = 1000 / T
    betas = np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    return betas, abar, np.append(1.0, abar[:-1])


# ----------------------------------------------------------------------------- schedule and respacing

def test_linear_schedule_and_tables_match_hand_values():
    d = create_diffusion("")
    betas, abar, _ = hand_schedule()
    assert d.num_timesteps == 1000
    assert d.betas[0].item() == pytest.approx(1e-4, rel=1e-9) and d.betas[-1].item() == pytest.approx(0.02, rel=1e-9)
    # the unspaced process still recomputes betas from alphas_cumprod: float64 rounding only
    np.testing.assert_allclose(d.betas.numpy(), betas, rtol=1e-9)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), abar, rtol=1e-12)
    d500 = create_diffusion("", diffusion_steps=500)
    assert d500.betas[-1].item() == pytest.approx(0.04, rel=1e-9)


def hand_section(start: int, size: int, count: int) -> set:
    """Evenly strided indices computed exactly (Fraction, round-half-even)."""
    if count == 1:
        return {start}
    return {start + round(Fraction(i * (size - 1), count - 1)) for i in range(count)}


def test_respacing_index_sets_computed_by_hand():
    assert space_timesteps(1000, "250") == hand_section(0, 1000, 250)
    assert len(space_timesteps(1000, "250")) == 250
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    # 1000 = 334 + 333 + 333 (the remainder goes to the first section)
    expected = hand_section(0, 334, 10) | hand_section(334, 333, 20) | hand_section(667, 333, 30)
    got = space_timesteps(1000, "10,20,30")
    assert got == expected and len(got) == 60
    assert min(got) == 0 and max(got) == 999 and {333, 334, 666, 667} <= got
    assert space_timesteps(1000, [1000]) == set(range(1000))
    # First indices of "250" by hand: stride 999/249 = 4.01205 -> 0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 84, 88, 92, 96, 100, 104, 108, 112, 116, 120, 124, 128, 132, 136, 140, 144, 148, 152, 156, 160, 164, 168, 172, 176, 181 (i=45: 180.54)
    assert sorted(space_timesteps(1000, "250"))[:3] == [0, 4, 8]
    assert sorted(space_timesteps(1000, "250"))[45] == 181


def test_respacing_follows_published_float_accumulation_at_ties():
    # 21 steps: stride 999/20 = 49.95; step 10 sits exactly on 499.5, where the exact closed form
    # rounds half-to-even (500) but the published sampler's float accumulation lands just below.
    acc, pos = [], 0.0
    for _ in range(21):
        acc.append(round(pos))
        pos += 999 / 20
    assert sorted(space_timesteps(1000, "21")) == acc
    assert acc[10] == 499 and round(Fraction(10 * 999, 20)) == 500


def test_bad_respacing_is_an_error():
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim600")
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


def test_respaced_betas_recomputed_from_alphas_cumprod():
    base = create_diffusion("")
    for spec in ("250", "ddim50", "10,20,30"):
        d = create_diffusion(spec)
        kept = sorted(space_timesteps(1000, spec))
        assert d.timestep_map.tolist() == kept
        np.testing.assert_allclose(d.alphas_cumprod.numpy(), base.alphas_cumprod[kept].numpy(), rtol=1e-12)
        abar = base.alphas_cumprod[kept].numpy()
        np.testing.assert_allclose(d.betas.numpy(), 1 - abar / np.append(1.0, abar[:-1]), rtol=1e-12)


def test_model_is_called_with_original_scale_steps():
    d = create_diffusion("10")
    seen = []

    def model(x, t, **kw):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    d.p_sample_loop(model, (2, 1, 2, 2), progress=False)
    assert [s[0] for s in seen] == sorted(space_timesteps(1000, "10"), reverse=True)


def test_tables_are_built_once_per_device_and_dtype():
    d = create_diffusion("")
    a = d.tables("cpu", torch.float32)
    assert d.tables("cpu", torch.float32) is a
    assert a["alphas_cumprod"].dtype == torch.float32
    x = torch.randn(2, 1, 2, 2)
    d.training_losses(lambda x, t, **k: torch.zeros(2, 2, 2, 2), x, torch.tensor([0, 5]))
    d.q_sample(x, torch.tensor([1, 2]))
    assert list(d._tables) == [(torch.device("cpu"), torch.float32)]


# ----------------------------------------------------------------------------- closed forms

def test_q_sample_moments():
    d = create_diffusion("")
    _, abar, _ = hand_schedule()
    torch.manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    for step in (0, 300, 999):
        xt = d.q_sample(x0, torch.full((n,), step))
        mean, var = xt.mean().item(), xt.var().item()
        se = math.sqrt((1 - abar[step]) / n)  # standard error of the mean
        assert abs(mean - math.sqrt(abar[step]) * 0.7) < 5 * se
        # the variance estimate's relative standard error is sqrt(2/n) ~ 0.3%
        assert var == pytest.approx(1 - abar[step], rel=0.015)
    m, v, lv = d.q_mean_variance(x0[:2], torch.tensor([10, 10]))
    assert m[0].item() == pytest.approx(math.sqrt(abar[10]) * 0.7, rel=1e-6)
    assert v[0].item() == pytest.approx(1 - abar[10], rel=1e-6)
    assert lv[0].item() == pytest.approx(math.log(1 - abar[10]), rel=1e-6)


def test_posterior_matches_gaussian_conditioning():
    # Independent derivation: x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1-abar_{t-1}) e1,
    # x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e2. Condition the joint Gaussian on x_t.
    d = create_diffusion("")
    betas, abar, abar_prev = hand_schedule()
    x0 = torch.tensor([[0.3], [-0.8], [0.1]], dtype=torch.float64)
    xt = torch.tensor([[1.2], [0.4], [-2.0]], dtype=torch.float64)
    steps = [1, 250, 999]
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, torch.tensor(steps))
    for i, s in enumerate(steps):
        m1, v1 = math.sqrt(abar_prev[s]) * x0[i, 0].item(), 1 - abar_prev[s]
        m2, v2 = math.sqrt(abar[s]) * x0[i, 0].item(), 1 - abar[s]
        cov = math.sqrt(1 - betas[s]) * v1
        assert mean[i, 0].item() == pytest.approx(m1 + cov / v2 * (xt[i, 0].item() - m2), rel=1e-10)
        assert var[i, 0].item() == pytest.approx(v1 - cov**2 / v2, rel=1e-10)
    # at t=0 the posterior variance is 0 and its log is clipped to the t=1 value
    _, var0, lv0 = d.q_posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    assert var0.item() == 0
    assert lv0.item() == pytest.approx(math.log(betas[1] * (1 - abar[0]) / (1 - abar[1])), rel=1e-10)


def test_normal_kl():
    m = torch.tensor([0.3, -1.0])
    lv = torch.tensor([0.5, -2.0])
    assert torch.all(normal_kl(m, lv, m, lv) == 0)
    # KL(N(0,1) || N(1,4)) = ln 2 + (1 + 1) / 8 - 1/2
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.log(4.0)))
    assert kl.item() == pytest.approx(math.log(2) + 0.25 - 0.5, rel=1e-6)


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)[:, None]
    for mu, log_scale in ((0.1, -2.0), (-0.95, -4.0), (0.5, 0.0)):
        lp = discretized_gaussian_log_likelihood(
            bins, means=torch.full_like(bins, mu), log_scales=torch.full_like(bins, log_scale)
        )
        # bin probabilities telescope to cdf(+inf) - cdf(-inf) = 1 (the edge bins extend to infinity)
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # a middle bin against the exact normal CDF (the tanh approximation is good to ~1e-3)
    x, mu, sd = torch.tensor([[0.0]]), 0.01, 0.02
    p = discretized_gaussian_log_likelihood(x, means=torch.tensor([[mu]]), log_scales=torch.tensor([[math.log(sd)]])).exp().item()
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    exact = phi((1 / 255 - mu) / sd) - phi((-1 / 255 - mu) / sd)
    assert p == pytest.approx(exact, abs=2e-3)


def test_learned_range_variance_interpolates_between_posterior_and_beta():
    d = create_diffusion("")
    betas, abar, abar_prev = hand_schedule()
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 40, 999])
    for v, expect in ((1.0, np.log(betas)), (-1.0, None)):
        model = lambda x, t, v=v: torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        out = d.p_mean_variance(model, x, t, clip_denoised=False)
        lv = out["log_variance"][:, 0, 0, 0].numpy()
        if expect is None:
            post = betas * (1 - abar_prev) / (1 - abar)
            expect = np.log(np.append(post[1], post[1:]))
        np.testing.assert_allclose(lv, expect[t.numpy()], rtol=1e-12)


def test_training_losses_hybrid():
    d = create_diffusion("")
    betas, abar, abar_prev = hand_schedule()
    torch.manual_seed(0)
    x0 = torch.rand(4, 2, 3, 3, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 500, 999])
    eps_pred = torch.randn_like(x0, requires_grad=True)
    v_pred = (torch.rand_like(x0) * 2 - 1).requires_grad_(True)
    model = lambda x, t: torch.cat([eps_pred, v_pred], dim=1)
    terms = d.training_losses(model, x0, t, noise=noise)
    mse = ((noise - eps_pred) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"], mse)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # vb by hand for t > 0: KL between true posterior and p with the model's (detached) mean, in bits
    xt = d.q_sample(x0, t, noise)
    for i in (1, 2, 3):
        s = t[i].item()
        x0_hat = (xt[i] - math.sqrt(1 - abar[s]) * eps_pred[i].detach()) / math.sqrt(abar[s])
        c1 = betas[s] * math.sqrt(abar_prev[s]) / (1 - abar[s])
        c2 = (1 - abar_prev[s]) * math.sqrt(1 - betas[s]) / (1 - abar[s])
        post_var = np.append(betas[1] * (1 - abar[0]) / (1 - abar[1]), betas[1:] * (1 - abar_prev[1:]) / (1 - abar[1:]))
        min_log, max_log = math.log(post_var[s]), math.log(betas[s])
        frac = (v_pred[i].detach() + 1) / 2
        p_logvar = frac * max_log + (1 - frac) * min_log
        kl = 0.5 * (-1 + p_logvar - min_log + math.exp(min_log) / p_logvar.exp()
                    + ((c1 * x0[i] + c2 * xt[i]) - (c1 * x0_hat + c2 * xt[i])) ** 2 / p_logvar.exp())
        assert terms["vb"][i].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-9)
    # the vb term trains only the variance half
    terms["vb"].sum().backward()
    assert eps_pred.grad is None or torch.all(eps_pred.grad == 0)
    assert v_pred.grad.abs().sum() > 0


def test_kl_loss_type_and_fixed_variance():
    d = create_diffusion("", learn_sigma=False, use_kl=True)
    assert d.model_var_type == ModelVarType.FIXED_LARGE
    x0 = torch.rand(3, 1, 2, 2, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 10, 999])
    noise = torch.randn_like(x0)
    # the exact posterior mean as the model's prediction: only the variance mismatch remains
    terms = d.training_losses(lambda x, tt: noise, x0, t, noise=noise)
    assert terms["loss"].shape == (3,) and torch.all(terms["loss"][1:] >= 0)
    # with sigma_small the reverse variance equals the posterior one: KL exactly 0 for t > 0
    d_small = create_diffusion("", learn_sigma=False, sigma_small=True, use_kl=True)
    terms = d_small.training_losses(lambda x, tt: noise, x0, t, noise=noise)
    assert terms["loss"][1:].abs().max().item() < 1e-9


def test_prior_bpd_is_small_for_linear_schedule():
    d = create_diffusion("")
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    assert d._prior_bpd(x0).max().item() < 1e-4  # abar_T ~ 4e-5: q(x_T) is almost N(0, I)


# ----------------------------------------------------------------------------- samplers on a toy

MU, STD = 0.3, 0.5  # 1-D Gaussian data


def exact_eps_model(diffusion: GaussianDiffusion):
    """E[eps | x_t] for data ~ N(MU, STD^2), indexed by the original-scale step the model is given."""
    abar_orig = create_diffusion("").alphas_cumprod

    def model(x, t):
        a = abar_orig[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * STD**2 + 1 - a)
        if diffusion.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            return torch.cat([eps, torch.zeros_like(eps)], dim=1)
        return eps

    return model


def sample_stats(samples: torch.Tensor):
    return samples.mean().item(), samples.std().item()


N_TOY = 20_000
# With 20k samples the standard error of the mean is 0.5/sqrt(2e4) = 0.0035 and of the std ~0.0025;
# tolerances are ~4 standard errors plus the discretisation error of each sampler.


def test_ddpm_recovers_gaussian_data():
    torch.manual_seed(0)
    d = create_diffusion("", learn_sigma=False, sigma_small=True)
    s = d.p_sample_loop(exact_eps_model(d), (N_TOY, 1), noise=torch.randn(N_TOY, 1, dtype=torch.float64), clip_denoised=False)
    m, sd = sample_stats(s)
    assert m == pytest.approx(MU, abs=0.015) and sd == pytest.approx(STD, abs=0.015)


def test_ddpm_respaced_with_learned_range_recovers_gaussian_data():
    # v = 0 (midway log-variance) on a 250-step respaced process, as the published sampler runs
    torch.manual_seed(1)
    d = create_diffusion("250")
    s = d.p_sample_loop(exact_eps_model(d), (N_TOY, 1), noise=torch.randn(N_TOY, 1, dtype=torch.float64), clip_denoised=False)
    m, sd = sample_stats(s)
    assert m == pytest.approx(MU, abs=0.015) and sd == pytest.approx(STD, abs=0.02)


def test_ddim_recovers_gaussian_data():
    # DDIM is first order: with 50 strided steps it under-disperses this toy (std 0.477: each step's
    # posterior-mean shrinkage is not undone), with 250 it is within sampling error.
    torch.manual_seed(2)
    d = create_diffusion("ddim250")
    s = d.ddim_sample_loop(exact_eps_model(d), (N_TOY, 1), noise=torch.randn(N_TOY, 1, dtype=torch.float64), clip_denoised=False)
    m, sd = sample_stats(s)
    assert m == pytest.approx(MU, abs=0.015) and sd == pytest.approx(STD, abs=0.015)


@pytest.mark.parametrize("skip_type,steps", [("logSNR", 20), ("time_quadratic", 25), ("time_uniform", 50)])
def test_dpm_solver_recovers_gaussian_data(skip_type, steps):
    # tolerance: 4 standard errors plus ~0.013 of solver error at these step counts (measured
    # against a 1000-step DDIM solve of the same ODE)
    torch.manual_seed(3)
    d = create_diffusion("")
    s = d.dpm_solver_sample_loop(
        exact_eps_model(d), (N_TOY, 1), noise=torch.randn(N_TOY, 1, dtype=torch.float64), num_steps=steps, skip_type=skip_type
    )
    m, sd = sample_stats(s)
    assert m == pytest.approx(MU, abs=0.015) and sd == pytest.approx(STD, abs=0.025)


def test_dpm_solver_converges_to_the_ode_solution():
    # DPM-Solver++ and DDIM solve the same probability-flow ODE; a 1000-step DDIM solve is the reference.
    d = create_diffusion("")
    model = exact_eps_model(d)
    noise = torch.randn(2000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = d.ddim_sample_loop(model, noise.shape, noise=noise, clip_denoised=False)
    err = {}
    for order in (1, 2):
        for steps in (10, 40):
            out = d.dpm_solver_sample_loop(model, noise.shape, noise=noise, num_steps=steps, order=order)
            err[order, steps] = (out - ref).abs().max().item()
    assert err[2, 10] < 0.25 * err[1, 10]  # second order pays off at few steps
    assert err[2, 40] < 0.5 * err[2, 10] and err[2, 40] < 0.02


def test_dpm_solver_timesteps():
    abar = create_diffusion("").alphas_cumprod
    ts = dpm_solver_timesteps(abar, 20, "time_uniform")
    assert len(ts) == 20 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    ts = dpm_solver_timesteps(abar, 20, "logSNR")
    assert ts[0] == 999 and ts[-1] == 0 and len(set(ts)) == len(ts)
    lam = 0.5 * torch.log(abar / (1 - abar))
    targets = np.linspace(lam[999].item(), lam[0].item(), 20)  # uniform in log-SNR
    for step, target in zip(ts, targets):  # each step is the discrete one nearest its target
        neighbours = [s for s in (step - 1, step, step + 1) if 0 <= s < 1000]
        assert min(neighbours, key=lambda s: abs(lam[s].item() - target)) == step
    assert dpm_solver_timesteps(abar, 1000, "time_uniform") == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        dpm_solver_timesteps(abar, 0)


def test_dpm_solver_with_guided_dit():
    from opendit.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3).eval()
    d = create_diffusion("")
    z = torch.randn(2, 2, 4, 4)
    kw = dict(y=torch.tensor([0, 1, 3, 3]), cfg_scale=4.0)
    out = d.dpm_solver_sample_loop(model.forward_with_cfg, (4, 2, 4, 4), noise=torch.cat([z, z]), model_kwargs=kw, num_steps=5)
    # a freshly initialised DiT predicts eps = 0, so every solver step is a scalar multiple of x (x0 = x / alpha_t):
    # the output must be the initial noise times one constant, and guidance must not break that
    assert out.shape == (4, 2, 4, 4) and torch.isfinite(out).all()
    ratio = out / torch.cat([z, z])
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)


def test_p_sample_loop_draws_noise_like_the_published_sampler():
    # given the initial noise, each of the T steps draws one randn_like(x) (also at t = 0)
    d = create_diffusion("5", learn_sigma=False)
    model = lambda x, t: 0.1 * x
    noise = torch.randn(3, 1, 2, 2)
    torch.manual_seed(7)
    got = d.p_sample_loop(model, noise.shape, noise=noise, clip_denoised=False)
    torch.manual_seed(7)
    x = noise
    for i in reversed(range(5)):
        out = d.p_mean_variance(model, x, torch.full((3,), i), clip_denoised=False)
        z = torch.randn_like(x)
        x = out["mean"] + (i > 0) * torch.exp(0.5 * out["log_variance"]) * z
    torch.testing.assert_close(got, x, rtol=0, atol=0)


def test_ddim_inversion_round_trip():
    # reverse DDIM (x_t -> x_{t+1}, via alphas_cumprod_next) up to T, then DDIM back down: both are first-order solves
    # of the same ODE, so the round-trip error shrinks linearly with the step count (measured 0.077 at 100, 0.0092 at 1000)
    x0 = MU + STD * torch.randn(500, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    err = {}
    for spec in ("ddim100", ""):
        d = create_diffusion(spec, learn_sigma=False)
        model = exact_eps_model(d)
        x = x0
        for i in range(d.num_timesteps):
            x = d.ddim_reverse_sample(model, x, torch.full((500,), i), clip_denoised=False)["sample"]
        assert abs(x.std().item() - 1.0) < 0.1  # near the N(0, 1) prior
        back = d.ddim_sample_loop(model, x.shape, noise=x, clip_denoised=False)
        err[spec] = (back - x0).abs().max().item()
    assert err[""] < 0.02
    assert 4 < err["ddim100"] / err[""] < 16  # first-order convergence: 10x the steps, ~10x less error
