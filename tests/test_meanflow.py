"""MeanFlow (opendit.transport.meanflow, objectives.MeanFlowObjective) against independent references: the identity's
target by central finite differences in float64, the stop-gradient's place, the sampler's grid formula, the closed-form
average velocity of Gaussian data, one-step samples of a network trained on it, the JVP through attention, the CLIs."""

import contextlib
import math
import os

import pytest
import torch
import torch.nn as nn

from helpers import TINY, only_run_dir, read_metrics, run_train
from opendit.models import DiT, DiTConfig
from opendit.transport import create_meanflow


class Toy(nn.Module):
    """u(x, t, r, y): non-linear in x, t and r, with a class embedding (num_classes + the null row)."""

    num_classes = 3

    def __init__(self, dim=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(dim, dim, generator=g, dtype=torch.float64) / 2)
        self.a = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.emb = nn.Parameter(torch.randn(self.num_classes + 1, dim, generator=g, dtype=torch.float64) / 3)

    def forward(self, x, t, y=None, r=None, force_drop_ids=None):
        r = t if r is None else r
        if force_drop_ids is not None:
            y = torch.where(force_drop_ids.bool(), torch.full_like(y, self.num_classes), y)
        c = self.emb[y] if y is not None else 0.0
        h = torch.tanh(x @ self.w * (1 + self.a * t[:, None]) + self.b * (r - t)[:, None] ** 2 + c)
        return h * torch.cos(r)[:, None] + x * t[:, None]


def reference_loss(net, x1, x0, t, r, y, drop, mf, detach_target=True):
    """The released loss, written out: central differences for d/dt u along (v_g, 1, 0), float64."""
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    v = x1 - x0
    if mf.omega != 1.0 or mf.kappa != 0.0:
        keep = torch.zeros_like(y, dtype=torch.bool)
        with torch.no_grad():
            v_u = net(x_t, t, y=torch.full_like(y, net.num_classes), r=t, force_drop_ids=keep)
            v_c = net(x_t, t, y=y, r=t, force_drop_ids=keep)
        inside = ((1 - t >= mf.t_start) & (1 - t <= mf.t_end))[:, None]
        om = torch.where(inside, torch.tensor(mf.omega, dtype=v.dtype), torch.tensor(1.0, dtype=v.dtype))
        ka = torch.where(inside, torch.tensor(mf.kappa, dtype=v.dtype), torch.tensor(0.0, dtype=v.dtype))
        v_g = om * v + (1 - om - ka) * v_u + ka * v_c
        v_g = torch.where(drop[:, None], v, v_g)
    else:
        v_g = v
    h = 1e-6
    with torch.no_grad() if detach_target else contextlib.nullcontext():  # without: the target carries gradients
        du = (net(x_t + h * v_g, t + h, y=y, r=r, force_drop_ids=drop)
              - net(x_t - h * v_g, t - h, y=y, r=r, force_drop_ids=drop)) / (2 * h)
    target = v_g + (r - t)[:, None] * du
    u = net(x_t, t, y=y, r=r, force_drop_ids=drop)
    err = ((u - (target.detach() if detach_target else target)) ** 2).sum(1)
    return err / (err.detach() + mf.norm_eps) ** mf.norm_p


@pytest.mark.parametrize("guided", [False, True])
def test_loss_and_gradients_equal_the_identity_written_out(guided):
    mf = create_meanflow(omega=1.0 if not guided else 1.5, kappa=0.0 if not guided else 0.5, t_start=0.1, t_end=0.9)
    net = Toy()
    g = torch.Generator().manual_seed(1)
    n = 16
    x1, x0 = torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g, dtype=torch.float64)
    tr = mf.sample_timesteps(n, generator=g).double()
    t, r = tr[:, 0], tr[:, 1]
    y, drop = torch.randint(0, 3, (n,), generator=g), torch.rand(n, generator=g) < 0.3
    assert torch.all(r >= t) and (r == t).sum() == int(n * 0.75)
    got = mf.training_losses(net, x1, model_kwargs=dict(y=y, force_drop_ids=drop), t=t, r=r, noise=x0)
    want = reference_loss(net, x1, x0, t, r, y, drop, mf)
    torch.testing.assert_close(got["loss"].double(), want, rtol=1e-7, atol=1e-9)
    g_got = torch.autograd.grad(got["loss"].mean(), list(net.parameters()))
    g_want = torch.autograd.grad(want.mean(), list(net.parameters()))
    for a, b in zip(g_got, g_want):  # central differences: ~1e-10 rounding, times the weight 1 / (loss + eps) <= 100
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)
    # the stop-gradient sits on the target: without it the gradients differ (the test can fail)
    leak = reference_loss(net, x1, x0, t, r, y, drop, mf, detach_target=False)
    g_leak = torch.autograd.grad(leak.mean(), list(net.parameters()))
    assert any((a.double() - b).abs().max() > 1e-4 for a, b in zip(g_got, g_leak))


def test_r_before_t_is_refused():
    mf, net = create_meanflow(kappa=0.0), Toy()
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="r < t"):
        mf.training_losses(net, x, model_kwargs=dict(y=torch.tensor([0, 1])), t=torch.tensor([0.5, 0.5]),
                           r=torch.tensor([0.7, 0.2]))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_sampler_is_the_grid_formula(steps):
    mf, net = create_meanflow(), Toy()
    z = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0, 1])
    x = z.clone()
    for k in range(steps):  # x_{k+1} = x_k + (1/n) u(x_k, k/n, (k+1)/n)
        t = torch.full((5,), k / steps, dtype=torch.float32)
        r = torch.full((5,), (k + 1) / steps, dtype=torch.float32)
        x = x + (1 / steps) * net(x, t, y=y, r=r)
    torch.testing.assert_close(mf.sample(net, z, dict(y=y), steps=steps), x, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- Gaussian data: known in closed form

MU, SIGMA = 2.0, 0.5


def gaussian_average_velocity(x, t, r):
    """Gaussian data N(MU, SIGMA^2), noise N(0, 1), x_t = t x1 + (1 - t) x0: the flow map is affine, x_s = m_s + s_s
    (x_t - m_t) / s_t with m_s = s MU, s_s = sqrt(s^2 SIGMA^2 + (1 - s)^2); u = (x_r - x_t) / (r - t)."""
    m = lambda s: s * MU  # noqa: E731
    sd = lambda s: torch.sqrt(s**2 * SIGMA**2 + (1 - s) ** 2)  # noqa: E731
    x_r = m(r) + sd(r) * (x - m(t)) / sd(t)
    return (x_r - x) / (r - t)


def test_the_exact_average_velocity_of_gaussian_data_satisfies_the_identity():
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(64, dtype=torch.float64, generator=g), torch.rand(64, dtype=torch.float64, generator=g) * 0.8
    r = t + (1 - t) * torch.rand(64, dtype=torch.float64, generator=g) * 0.9 + 1e-3
    m_dot, sd = MU, lambda s: torch.sqrt(s**2 * SIGMA**2 + (1 - s) ** 2)  # noqa: E731
    sd_dot = (t * SIGMA**2 - (1 - t)) / sd(t)
    v = m_dot + sd_dot / sd(t) * (x - t * MU)  # the marginal (instantaneous) velocity
    _, du_dt = torch.func.jvp(gaussian_average_velocity, (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    torch.testing.assert_close(gaussian_average_velocity(x, t, r), v + (r - t) * du_dt, rtol=1e-10, atol=1e-10)


class AffineInX(nn.Module):
    """u(x, t, r) = a(t, r) + b(t, r) x, a and b a small MLP of the two times: the exact average velocity of Gaussian
    data has this form, so what is measured is the objective, not the network's capacity."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

    def forward(self, x, t, r=None):
        ab = self.net(torch.stack([t, t if r is None else r], dim=1))
        return ab[:, :1] + ab[:, 1:] * x


@pytest.mark.slow
def test_a_network_trained_on_gaussian_data_draws_one_step_samples_with_its_mean_and_std():
    """N(2, 0.5^2) from N(0, 1) in one step (exactly: u(x, 0, 1) = 2 - x / 2). Times wider than the released
    logit-normal (std 2) reach the ends, where one step starts; measured here: mean 1.95, std 0.502 at one step. The
    tolerances (0.1 = 0.2 sigma on the mean, 10% on the std) leave room for the optimizer's noise, not for a wrong
    identity: a sign error in the JVP or a target without its (r - t) term gives std > 0.9 or < 0.2."""
    torch.manual_seed(0)
    mf, net = create_meanflow(kappa=0.0, p_mean=0.0, p_std=2.0, data_proportion=0.5), AffineInX()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3000)
    g = torch.Generator().manual_seed(4)
    for _ in range(3000):
        x1 = MU + SIGMA * torch.randn(1024, 1, generator=g)
        tr = mf.sample_timesteps(1024, generator=g)
        loss = mf.training_losses(net, x1, t=tr, noise=torch.randn(1024, 1, generator=g))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    z = torch.randn(20000, 1, generator=torch.Generator().manual_seed(5))
    for steps in (1, 2):
        x = mf.sample(net, z, steps=steps)
        assert float(x.mean()) == pytest.approx(MU, abs=0.1) and float(x.std()) == pytest.approx(SIGMA, rel=0.1), steps


# ----------------------------------------------------------------------------- the DiT and its JVP

def small_meanflow_dit():
    """A 2-block MeanFlow DiT in eval mode, its weights moved off adaLN-Zero's identity start (every term matters)."""
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                    learn_sigma=False, mean_flow=True)
    model = DiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_the_jvp_through_math_attention_equals_the_jvp_through_plain_attention():
    from opendit.transport.meanflow import forward_ad_attention

    model = small_meanflow_dit()
    x, t, r, y = torch.randn(3, 1, 8, 8), torch.rand(3) * 0.5, 0.5 + torch.rand(3) * 0.5, torch.tensor([1, 2, 3])
    v = torch.randn_like(x)
    import torch.autograd.forward_ad as fwAD

    with torch.no_grad(), forward_ad_attention(), fwAD.dual_level():  # the training step's path: SDPA's math kernel
        out = model(fwAD.make_dual(x, v), fwAD.make_dual(t, torch.ones_like(t)), y, r=r)
        got = fwAD.unpack_dual(out).tangent
    model.set_attention_impl("eager")  # softmax(q k^T) v written out
    _, want = torch.func.jvp(lambda x, t: model(x, t, y, r=r), (x, t), (v, torch.ones_like(t)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert want.abs().max() > 1e-3


def test_a_meanflow_dit_records_its_second_time():
    cfg = DiTConfig.from_name("DiT-N/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, mean_flow=True)
    sd = DiT(cfg).state_dict()
    plain = DiT(cfg.replace(mean_flow=False)).state_dict()
    assert set(sd) - set(plain) == {f"h_embedder.mlp.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")}
    assert DiTConfig.from_state_dict(sd) == cfg
    with pytest.raises(ValueError, match="takes one time"):
        DiT(cfg.replace(mean_flow=False))(torch.randn(1, 1, 8, 8), torch.rand(1), torch.tensor([1]), r=torch.ones(1))


# ----------------------------------------------------------------------------- training and sampling programs

MF_STEPS = ["--objective", "meanflow", "--max_steps", "4", "--log_every", "1", "--ckpt_every", "4"]


@pytest.fixture(scope="module")
def mf_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("meanflow")
    out = {}
    for plugin in ("ddp", "zero2", "fsdp"):
        r = run_train(*TINY, *MF_STEPS, "--batch_size", "16", "--plugin", plugin, "--outputs", str(root / plugin),
                      nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]
        out[plugin] = only_run_dir(root / plugin)
    r = run_train(*TINY, *MF_STEPS, "--batch_size", "32", "--final_samples", "1", "--outputs", str(root / "single"))
    assert r.returncode == 0, r.stderr[-3000:]
    out["single"] = only_run_dir(root / "single")
    return out


@pytest.mark.slow
def test_ddp_zero2_and_fsdp_train_meanflow_as_one_process_does(mf_runs):
    from safetensors.torch import load_file

    ref = read_metrics(mf_runs["single"])
    w_ref = load_file(os.path.join(mf_runs["single"], "epoch0-global_step4", "model", "model.safetensors"))
    for plugin in ("ddp", "zero2", "fsdp"):
        got = read_metrics(mf_runs[plugin])
        for s in range(1, 5):  # fp32, same global batch and draws: only reduction order differs
            assert got[s]["mse_loss"] == pytest.approx(ref[s]["mse_loss"], rel=1e-5), (plugin, s)
            assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), (plugin, s)
        w = load_file(os.path.join(mf_runs[plugin], "epoch0-global_step4", "model", "model.safetensors"))
        assert max((w[k] - w_ref[k]).abs().max().item() for k in w_ref) < 1e-5, plugin


@pytest.mark.slow
def test_a_meanflow_run_samples_in_one_step_and_refuses_what_does_not_fit(mf_runs, tmp_path):
    import json

    from opendit.cli.sample import main as sample_main
    from opendit.cli.sample_ddp import main as ddp_main

    run = mf_runs["single"]
    rec = json.load(open(os.path.join(run, "config.json")))
    assert rec["objective"] == "meanflow" and rec["dit"]["mean_flow"] and not rec["dit"]["learn_sigma"]
    assert os.path.isfile(os.path.join(run, "samples.png"))
    assert ddp_main(["--ckpt", run, "--num_samples", "4", "--per_proc_batch_size", "4", "--device", "cpu",
                     "--sample_dir", str(tmp_path / "s")]) == 0
    settings = json.load(open(tmp_path / "s" / "samples.json"))
    assert (settings["sampler"], settings["num_sampling_steps"], settings["cfg_scale"]) == ("meanflow", 1, 1.0)
    base = ["--ckpt", run, "--device", "cpu", "--out", str(tmp_path / "g.png")]
    assert sample_main([*base, "--num_sampling_steps", "2"]) == 0
    for bad in (["--sampler", "ode"], ["--sampler", "ddpm"], ["--cfg_scale", "2"], ["--objective", "flow"],
                ["--objective", "diffusion"]):
        assert sample_main([*base, *bad]) == 2, bad
    ema = os.path.join(run, "epoch0-global_step4", "ema.pt")  # a bare file: the weights say meanflow
    assert sample_main(["--ckpt", ema, "--device", "cpu", "--out", str(tmp_path / "b.png"), "--objective", "flow"]) == 2
    assert sample_main(["--ckpt", ema, "--device", "cpu", "--out", str(tmp_path / "b.png")]) == 0


@pytest.mark.parametrize("argv,message", [
    (["--omega", "2"], "add --objective meanflow"),
    (["--objective", "meanflow", "--final_cfg_scale", "4"], "drawn at guidance 1"),
    (["--objective", "meanflow", "--eval_every", "1", "--eval_cfg_scale", "2"], "drawn at guidance 1"),
])
def test_meanflow_settings_that_do_not_fit_are_one_line(argv, message, tmp_path):
    r = run_train(*TINY, *argv, "--max_steps", "1", "--batch_size", "8", "--outputs", str(tmp_path / "o"))
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr[-2000:]


def test_the_objective_is_the_third_implementation():
    from opendit.objectives import MeanFlowObjective, Objective, build_objective

    obj = build_objective({"objective": "meanflow", "omega": 1.0, "kappa": 0.0})
    assert isinstance(obj, MeanFlowObjective) and isinstance(obj, Objective) and not obj.guidance_trained_in
    assert build_objective(obj.record()).record() == obj.record()
    assert build_objective({"objective": "meanflow"}).guidance_trained_in  # the released defaults: kappa 0.5
    assert obj.noise_level(torch.tensor([0.25])) == pytest.approx(3.0) and math.isinf(obj.noise_level(torch.zeros(1)))


@pytest.mark.parametrize("shape", [(2, 2, 16, 32), (1, 3, 20, 72), (2, 1, 64, 16)])
def test_the_triton_attention_jvp_equals_torch_func_jvp_through_plain_attention(shape):
    """The kernel (Triton interpreter on the CPU; set in conftest) against torch.func.jvp of softmax(q k^T / sqrt(d)) v:
    token counts off the block size, a head dimension padded to a power of two (72, DiT-XL/2's)."""
    from opendit.kernels import attention_jvp, attention_jvp_reference

    g = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(*shape, generator=g) for _ in range(6))
    o, do = attention_jvp(q, k, v, dq, dk, dv)
    ro, rdo = attention_jvp_reference(q, k, v, dq, dk, dv)
    torch.testing.assert_close(o, ro, rtol=1e-5, atol=1e-5)  # fp32, accumulation order: ~1e-6 measured
    torch.testing.assert_close(do, rdo, rtol=1e-5, atol=1e-5)


def test_the_dit_jvp_through_the_triton_kernel_equals_the_plain_one():
    """The model's attention switched to the kernel (what MeanFlow's JVP pass does on a GPU) under forward AD."""
    import torch.autograd.forward_ad as fwAD

    model = small_meanflow_dit()
    x, t, r, y = torch.randn(2, 1, 8, 8), torch.rand(2) * 0.5, 0.5 + torch.rand(2) * 0.5, torch.tensor([1, 2])
    v = torch.randn_like(x)
    model.set_attention_impl("jvp_kernel")
    with torch.no_grad(), fwAD.dual_level():
        got = fwAD.unpack_dual(model(fwAD.make_dual(x, v), fwAD.make_dual(t, torch.ones_like(t)), y, r=r)).tangent
    model.set_attention_impl("eager")
    _, want = torch.func.jvp(lambda x, t: model(x, t, y, r=r), (x, t), (v, torch.ones_like(t)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")
def test_the_triton_attention_jvp_on_a_gpu_and_a_meanflow_step_through_it():
    from opendit.kernels import attention_jvp, attention_jvp_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    args = [torch.randn(4, 16, 256, 72, device="cuda", generator=g) for _ in range(6)]  # DiT-XL/2's heads at 256 px
    o, do = attention_jvp(*args)
    ro, rdo = attention_jvp_reference(*[a.double() for a in args])
    torch.testing.assert_close(o.double(), ro, rtol=1e-3, atol=1e-3)  # TF32 dots inside the kernel
    torch.testing.assert_close(do.double(), rdo, rtol=1e-3, atol=1e-3)
    cfg = DiTConfig.from_name("DiT-S/2", input_size=16, in_channels=4, num_classes=10, learn_sigma=False, mean_flow=True)
    model = DiT(cfg).cuda()
    mf = create_meanflow()
    x, y = torch.randn(8, 4, 16, 16, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = mf.training_losses(model, x, dict(y=y))["loss"].mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_meanflow_model_without_trained_in_guidance_samples_with_cfg():
    """omega 1, kappa 0: nothing trained in, so sampling may guide; the guided average velocity is uncond + s (cond -
    uncond) of u(x, 0, 1), written out."""
    from opendit.objectives import build_objective
    from opendit.sampling.generate import generate

    model = small_meanflow_dit()
    obj = build_objective({"objective": "meanflow", "omega": 1.0, "kappa": 0.0})
    y, z = torch.tensor([1, 2]), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t0, t1 = torch.zeros(2), torch.ones(2)
    with torch.no_grad():
        cond, uncond = model(z, t0, y, r=t1), model(z, t0, torch.full_like(y, 10), r=t1)
        got = generate(model, y, z, objective=obj, sampler="meanflow", steps=1, cfg_scale=2.0)
    torch.testing.assert_close(got, z + uncond + 2.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
