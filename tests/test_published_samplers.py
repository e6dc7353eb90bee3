"""Every shipped recipe's [sample] section runs the published sampler of its model family. For each recipe: the settings
it gives the sampling programs (parsed by sample_ddp.py's own parser) are pinned to the published ones, and a few steps
of opendit's sampler with those settings are compared with the published procedure written out here from the released
code, independently of opendit's samplers:

- DiT (facebookresearch/DiT sample.py + diffusion/gaussian_diffusion.py): ancestral DDPM on 250 respaced steps, learned
  variance interpolated in log space, the guidance of ``forward_with_cfg`` on the first 3 channels.
- SiT (willisma/SiT sample.py --mode SDE, transport/integrators.py sde.__Euler_Maruyama_step): Euler-Maruyama on
  linspace(0, 0.96, 250), noise drawn before the drift, drift v + w score with w = sigma_t = 1 - t, then one "Mean" step
  of 0.04; guidance on the first 3 channels.
- REPA (sihyun-yu/REPA generate.py --mode sde, samplers.py euler_maruyama_sampler): in their time (1 = noise),
  linspace(1, 0.04, 250) then 0, drift v - t score guided on every channel where t <= 0.7, noise sqrt(2 t) dW, the last
  step noise-free; applied to our model through the time reversal t' = 1 - t, v' = -v.
- LightningDiT (hustvl/LightningDiT inference.py, transport/integrators.py ode, models/lightningdit.py): torchdiffeq's
  fixed-grid Euler on linspace(0, 1, 250) mapped by the shift s t / (1 + (s - 1) t), s = 0.3; ``forward_with_cfg``
  guides the first 3 channels, and only where t >= cfg_interval_start (0.10 in the 64-epoch reproduction config).
- The digits recipes' own documented samplers: DPM-Solver++(2M) 20 steps (Lu et al. 2022, data prediction, first order
  at the last step), and Heun on an 11-point grid (torchdiffeq's heun2 on linspace(0, 1, 11)).
"""

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import REPO, shell_commands
from opendit.diffusion.dpm_solver import dpm_solver_timesteps
from opendit.models import DiT
from opendit.cli.flags import parse_argv
from opendit.config import FolderConfig, GridConfig, TrainConfig
from opendit.objectives import DEFAULT_METHOD, as_objective, build_objective
from opendit.cli.recipes import config_argv
from opendit.cli.sample_ddp import build_parser as ddp_parser
from opendit.sampling.generate import generate
from opendit.sampling.load import sampler_settings
from opendit.cli.train import build_parser as train_parser

NULL = 10  # the tiny models' null label (10 classes)


def recipe(name: str, *extra: str):
    """(generate's settings, the parsed sampling flags, the objective) of recipes/NAME as sample_ddp.py reads them."""
    path = os.path.join(REPO, "recipes", name)
    parser = ddp_parser()
    cfg = parse_argv(FolderConfig, [*config_argv(parser, path, "sample"), "--ckpt", "x.pt", *extra])
    train = parse_argv(TrainConfig, config_argv(train_parser(), path, "train"))
    objective = build_objective(train.flat())
    loaded = SimpleNamespace(objective=objective, source=name, objective_note="", in_channels=4)
    settings = sampler_settings(cfg, loaded)
    defaults = objective.options  # what generate uses for an option not given
    return {**defaults, **settings}, cfg, objective


def tiny(in_channels=4, learn_sigma=True, seed=0):
    torch.manual_seed(seed)
    m = DiT(input_size=8, patch_size=2, in_channels=in_channels, hidden_size=64, depth=2, num_heads=2, num_classes=10,
            learn_sigma=learn_sigma).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from adaLN-Zero's identity start, so that every term matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def release_cfg(model, x, t, y, scale, channels):
    """The conditional half of the release's forward_with_cfg: one forward of [x; x] with [y; null], the first
    ``channels`` output channels guided, the other channels (and a learned variance) the conditional output."""
    n = len(x)
    out = model.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)]))
    cond, uncond = out[:n], out[n:]
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


def close(got, want, tol=1e-5):
    # fp32 network, the reference's arithmetic in another order (float64 tables and solvers, other batch shapes): a
    # few steps differ by up to 1.2e-6 here (measured); anything procedural (a step, a channel, a sign, an interval
    # end) is O(1e-2) or more (the `far` controls)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol)


def far(a, b):
    """Outside ``close``'s tolerance by a margin (the control that shows a setting matters at these few steps)."""
    return float((a - b).abs().max()) > 5e-3


# ----------------------------------------------------------------------------- DiT: DDPM 250, 3 channels


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """ADM's respacing for one section: round(i * (T - 1) / (count - 1)), the stride accumulated in float."""
    stride, cur, taken = (num_timesteps - 1) / (count - 1), 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


def release_ddpm(model, z, y, steps, scale, channels, noise_rng_seed):
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar_full = np.cumprod(1.0 - betas)
    kept = space_timesteps(1000, steps)
    new_betas, last = [], 1.0
    for k in kept:
        new_betas.append(1 - abar_full[k] / last)
        last = abar_full[k]
    b = np.array(new_betas)
    abar = np.cumprod(1 - b)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = b * (1 - abar_prev) / (1 - abar)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef1, coef2 = b * np.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * np.sqrt(1 - b) / (1 - abar)
    f = lambda a, i: float(np.float32(a[i]))  # noqa: E731  (ADM's _extract_into_tensor: the table entry as float32)
    torch.manual_seed(noise_rng_seed)
    x, n, c = z.clone(), len(z), z.shape[1]
    for i in reversed(range(len(kept))):
        out = release_cfg(model, x, torch.full((n,), float(kept[i])), y, scale, channels)
        eps, var = out[:, :c], out[:, c:]
        frac = (var + 1) / 2
        logvar = frac * f(np.log(b), i) + (1 - frac) * f(post_logvar, i)
        x0 = f(np.sqrt(1 / abar), i) * x - f(np.sqrt(1 / abar - 1), i) * eps
        mean = f(coef1, i) * x0 + f(coef2, i) * x
        noise = torch.randn(2 * n, *x.shape[1:])[:n]  # randn_like of the doubled batch, after the model call
        x = mean + (i != 0) * torch.exp(0.5 * logvar) * noise
    return x


def test_dit_recipe_is_the_published_ddpm_sampler():
    settings, args, _ = recipe("dit-xl-2-imagenet256.toml")
    assert (settings["sampler"], settings["steps"], settings["cfg_scale"], settings["guidance_channels"]) == \
        ("ddpm", 250, 1.5, 3)
    assert settings["cfg_interval"] is None and settings["cfg_interval_sigma"] is None
    m = tiny()
    y, z = torch.tensor([1, 7]), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    few = {**settings, "steps": 6}
    torch.manual_seed(11)
    got = generate(m, y, z, **few)
    close(got, release_ddpm(m, z, y, 6, 1.5, 3, noise_rng_seed=11))


# ----------------------------------------------------------------------------- SiT: SDE Euler-Maruyama, 3 channels


def sit_velocity_score(out_v, x, t):
    """SiT's Linear path (alpha_t = t, sigma_t = 1 - t): score from velocity, get_score_from_velocity."""
    reverse_alpha_ratio = t / 1.0
    var = (1 - t) ** 2 - reverse_alpha_ratio * (-1.0) * (1 - t)
    return (reverse_alpha_ratio * out_v - x) / var


def release_sit_sde(model, z, y, points, scale, channels, seed, last_step_size=0.04):
    torch.manual_seed(seed)
    grid = torch.linspace(0.0, 1.0 - last_step_size, points, dtype=torch.float64).tolist()
    x, n = z.clone(), len(z)
    dt = grid[1] - grid[0]

    def sde_drift(x, t):
        v = release_cfg(model, x, torch.full((n,), t), y, scale, channels)[:, :x.shape[1]]  # learn_sigma: first half
        return v + (1 - t) * sit_velocity_score(v, x, t)

    for t in grid[:-1]:
        dw = torch.randn(2 * n, *x.shape[1:])[:n] * math.sqrt(dt)  # drawn before the drift, doubled batch
        x = x + sde_drift(x, t) * dt + math.sqrt(2 * (1 - t)) * dw
    return x + sde_drift(x, grid[-1]) * last_step_size  # last step "Mean"


def test_sit_recipe_is_the_published_sde_sampler():
    settings, _, objective = recipe("sit-xl-2-imagenet256.toml")
    assert (settings["sampler"], settings["steps"], settings["cfg_scale"], settings["guidance_channels"]) == \
        ("sde", 250, 1.5, 3)
    assert (settings["sampling_method"], settings["diffusion_form"], settings["last_step"],
            settings["last_step_size"]) == ("Euler", "sigma", "Mean", 0.04)
    assert settings["cfg_interval"] is None and objective.transport.path.name == "Linear"
    m = tiny()
    y, z = torch.tensor([1, 7]), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    got = generate(m, y, z, **{**settings, "steps": 6})
    close(got, release_sit_sde(m, z, y, 6, 1.5, 3, seed=5))


# ----------------------------------------------------------------------------- REPA: their SDE in their time


def release_repa_sde(repa_model, z, y, num_steps, scale, guidance_low, guidance_high, noise):
    """samplers.py euler_maruyama_sampler, in float64 with the model called in the latents' dtype; ``noise()`` gives
    each step's standard normal draw (theirs: randn_like(x))."""
    t_steps = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = z.to(torch.float64)
    y_null = torch.full_like(y, NULL)

    def drift(x, t):
        guided = scale > 1.0 and guidance_low <= t <= guidance_high
        inp, yy = (torch.cat([x, x]), torch.cat([y, y_null])) if guided else (x, y)
        tt = torch.full((len(inp),), float(t), dtype=torch.float64)
        v = repa_model(inp.to(z.dtype), tt.to(z.dtype), yy).to(torch.float64)
        # get_score_from_velocity, linear: alpha = 1 - t, d alpha = -1, sigma = t, d sigma = 1
        alpha, d_alpha, sigma, d_sigma = 1 - t, -1.0, t, 1.0
        ratio = alpha / d_alpha
        score = (ratio * v - inp) / (sigma ** 2 - ratio * d_sigma * sigma)
        d = v - 0.5 * (2 * t) * score
        if guided:
            c, u = d.chunk(2)
            d = u + scale * (c - u)
        return d

    for t_cur, t_next in zip(t_steps[:-2].tolist(), t_steps[1:-1].tolist()):
        dt = t_next - t_cur
        deps = noise().to(torch.float64) * math.sqrt(abs(dt))
        x = x + drift(x, t_cur) * dt + math.sqrt(2 * t_cur) * deps
    t_cur, t_next = t_steps[-2].item(), t_steps[-1].item()
    return x + (t_next - t_cur) * drift(x, t_cur)


def repa_view(model):
    """Our flow model (t = 0 noise, velocity data - noise) as REPA's network sees time: t' = 1 - t, v' = -v."""
    return lambda x, t, y: -model.forward(x, 1 - t, y)[:, :x.shape[1]]


def test_repa_recipe_is_the_published_sde_sampler():
    settings, _, objective = recipe("repa-sit-xl-2-imagenet256.toml")
    assert (settings["sampler"], settings["steps"], settings["cfg_scale"], settings["guidance_channels"]) == \
        ("sde", 250, 1.8, None)  # REPA guides every channel
    assert (settings["sampling_method"], settings["diffusion_form"], settings["diffusion_norm"], settings["last_step"],
            settings["last_step_size"], settings["cfg_interval"]) == ("Euler", "sigma", 1.0, "Mean", 0.04, (0.3, 1.0))
    assert objective.transport.path.name == "Linear"
    m = tiny()
    y, z = torch.tensor([1, 7]), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    got = generate(m, y, z, **{**settings, "steps": 6})
    # the same Brownian increments: ours draws for the doubled batch, whose first half is the sample
    torch.manual_seed(5)
    want = release_repa_sde(repa_view(m), z, y, 6, 1.8, 0.0, 0.7, noise=lambda: torch.randn(4, 4, 8, 8)[:2])
    close(got, want)
    # their grid 1, 0.808, 0.616, ...: guided from the third step on, so the interval's edge is inside the test
    assert (torch.linspace(1.0, 0.04, 6) <= 0.7).tolist() == [False, False, True, True, True, True]
    torch.manual_seed(5)
    assert far(generate(m, y, z, **{**settings, "steps": 6, "cfg_interval": None}), got)


# ----------------------------------------------------------------------------- LightningDiT: Euler ODE, shift, 3 channels


def release_lightningdit_ode(model, z, y, points, scale, start, shift, channels):
    t = torch.linspace(0.0, 1.0, points)
    t = torch.tensor([shift * tn / (1 + (shift - 1) * tn) for tn in t])  # their compute_tm, element by element
    x, n = z.clone(), len(z)
    for t0, t1 in zip(t[:-1].tolist(), t[1:].tolist()):
        tt = torch.full((n,), t0)
        if t0 < start:  # forward_with_cfg: half_eps = cond_eps below the interval start
            v = model.forward(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, NULL)]))[:n]
        else:
            v = release_cfg(model, x, tt, y, scale, channels)
        x = x + (t1 - t0) * v
    return x


@pytest.mark.parametrize("epochs,cfg,start", [(64, 10.0, 0.10), (800, 6.7, 0.125)])
def test_lightningdit_recipe_is_the_published_ode_sampler(epochs, cfg, start):
    extra = [] if epochs == 64 else ["--cfg_scale", "6.7", "--cfg_interval", "0.125", "1"]  # the recipe's comment
    settings, _, objective = recipe("lightningdit-xl-1-imagenet256.toml", *extra)
    assert (settings["sampler"], settings["steps"], settings["sampling_method"], settings["timestep_shift"],
            settings["guidance_channels"]) == ("ode", 250, "euler", 0.3, 3)
    assert (settings["cfg_scale"], settings["cfg_interval"]) == (cfg, (start, 1.0))
    assert objective.transport.path.name == "Linear" and objective.transport.time_sampling == "logit_normal"
    m = tiny(in_channels=6, learn_sigma=False)  # LightningDiT: no variance channels; 3 of 6 guided
    y, z = torch.tensor([1, 7]), torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(3))
    points = 12  # shifted grid 0, 0.040, 0.085, 0.136, ...: both sides of the interval start
    got = generate(m, y, z, **{**settings, "steps": points})
    close(got, release_lightningdit_ode(m, z, y, points, cfg, start, 0.3, 3))
    # guiding all 6 channels (the recipe before this fix) is a different sampler, far outside the tolerance
    assert far(generate(m, y, z, **{**settings, "steps": points, "guidance_channels": None}), got)


# ----------------------------------------------------------------------------- the digits recipes


def dpm_solver_2m(model, z, y, steps, scale):
    """DPM-Solver++(2M), data prediction (Lu et al. 2022, Algorithm 2), on opendit's documented logSNR-uniform discrete
    steps, first order into the last step; the model's first C channels are epsilon."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    ts = dpm_solver_timesteps(abar.float(), steps)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = torch.log(alpha / sigma)
    x, n, c = z.double(), len(z), z.shape[1]
    prev = None

    def x0(x, k):
        eps = release_cfg(model, x.float(), torch.full((n,), float(k)), y, scale, c)[:, :c].double()
        return (x - sigma[k] * eps) / alpha[k]

    d = x0(x, ts[0])
    for i in range(1, len(ts)):
        s, t = ts[i - 1], ts[i]
        h = lam[t] - lam[s]
        if prev is None or i == len(ts) - 1:
            dd = d
        else:
            r = (lam[s] - lam[prev[0]]) / h
            dd = d + (d - prev[1]) / (2 * r)
        x = (sigma[t] / sigma[s]) * x - alpha[t] * torch.expm1(-h) * dd
        prev = (s, d)
        d = x0(x, t)
    return d  # the x0 prediction at t = 0


def heun_grid(model, z, y, points, scale):
    t = torch.linspace(0.0, 1.0, points).tolist()
    x, n = z.clone(), len(z)
    f = lambda x, tv: release_cfg(model, x, torch.full((n,), tv), y, scale, x.shape[1])[:, :x.shape[1]]  # noqa: E731
    for t0, t1 in zip(t[:-1], t[1:]):
        k1 = f(x, t0)
        k2 = f(x + (t1 - t0) * k1, t1)
        x = x + (t1 - t0) / 2 * (k1 + k2)
    return x


def test_digits_demo_recipe_is_dpm_solver_20():
    settings, _, _ = recipe("digits-demo.toml")
    assert (settings["sampler"], settings["steps"], settings["cfg_scale"], settings["guidance_channels"],
            settings["cfg_interval"]) == ("dpm-solver++", 20, 1.5, None, None)
    m = tiny(in_channels=1)
    y, z = torch.tensor([1, 7]), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    got = generate(m, y, z, **{**settings, "steps": 8})
    # the returned x0 prediction divides by alpha_999 = 0.0064 in its first step: fp32 rounding (~1e-6) grows ~156x
    # (measured 1.8e-4 against the float64 reference)
    close(got, dpm_solver_2m(m, z, y, 8, 1.5), tol=5e-4)


@pytest.mark.parametrize("name", ["digits-flow.toml", "digits-repa.toml", "digits-lightning.toml", "digits-fast.toml"])
def test_digits_flow_recipes_are_heun_on_11_points(name):
    settings, _, objective = recipe(name)
    assert (settings["sampler"], settings["steps"], settings["sampling_method"], settings["cfg_scale"],
            settings["guidance_channels"], settings["cfg_interval"]) == ("ode", 11, "heun", 1.5, None, None)
    assert objective.transport.path.name == "Linear"
    m = tiny(in_channels=1)
    y, z = torch.tensor([1, 7]), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    close(generate(m, y, z, **settings), heun_grid(m, z, y, 11, 1.5))


@pytest.mark.parametrize("name", ["meanflow-xl-2-imagenet256.toml", "digits-meanflow.toml"])
def test_meanflow_recipes_are_the_released_settings_sampled_in_one_call_at_guidance_1(name):
    """The released configs/default.py method settings (Gsunshine/meanflow; the digits recipe: its guidance), its
    1-step sampler, guidance 1; the
    sampler is the grid formula x_1 = x_0 + u(x_0, 0, 1) (tests/test_meanflow.py)."""
    settings, cfg, objective = recipe(name)
    # the digits recipe trains in the demo's guidance 1.5 (omega / (1 - kappa)) where the release trains in 2.0
    kappa = 0.333333 if name.startswith("digits") else 0.5
    assert objective.record() == {"objective": "meanflow", "p_mean": -0.4, "p_std": 1.0, "data_proportion": 0.75,
                                  "omega": 1.0, "kappa": kappa, "t_start": 0.0, "t_end": 1.0, "norm_p": 1.0,
                                  "norm_eps": 0.01}
    assert (settings["sampler"], settings["steps"], settings["cfg_scale"]) == ("meanflow", 1, 1.0)
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10,
            learn_sigma=False, mean_flow=True).eval()
    y, z = torch.tensor([1, 7]), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    want = z + m(z, torch.zeros(2), y, r=torch.ones(2))
    close(generate(m, y, z, **settings), want)


def test_every_shipped_recipe_has_a_pinned_sampler():
    pinned = {"dit-xl-2-imagenet256.toml", "sit-xl-2-imagenet256.toml", "repa-sit-xl-2-imagenet256.toml",
              "lightningdit-xl-1-imagenet256.toml", "digits-demo.toml", "digits-flow.toml", "digits-repa.toml",
              "digits-lightning.toml", "meanflow-xl-2-imagenet256.toml", "digits-meanflow.toml", "digits-fast.toml"}
    assert set(os.listdir(os.path.join(REPO, "recipes"))) == pinned


# ----------------------------------------------------------------------------- commands for published checkpoints

# what each published checkpoint's own sampler does (beyond the recipes above): guided channels, interval, and for the
# guidance-interval models the scale that goes with it
PUBLISHED_SAMPLER = {
    "DiT-XL-2-256x256.pt": dict(sampler="ddpm", steps=250, guidance_channels=3, cfg_interval=None),
    "DiT-XL-2-512x512.pt": dict(sampler="ddpm", steps=250, guidance_channels=3, cfg_interval=None),
    "SiT-XL-2-256x256.pt": dict(sampler="sde", steps=250, guidance_channels=3, cfg_interval=None,
                                sampling_method="Euler", diffusion_form="sigma", last_step="Mean", last_step_size=0.04),
    "REPA-SiT-XL-2-256x256.pt": dict(sampler="sde", steps=250, guidance_channels=None, cfg_interval=(0.3, 1.0),
                                     cfg_scale=1.8, sampling_method="Euler", diffusion_form="sigma"),
    "lightningdit-xl-imagenet256-64ep.pt": dict(sampler="ode", steps=250, guidance_channels=3,
                                                cfg_interval=(0.1, 1.0), cfg_scale=10.0, timestep_shift=0.3),
    "lightningdit-xl-imagenet256-800ep.pt": dict(sampler="ode", steps=250, guidance_channels=3,
                                                 cfg_interval=(0.125, 1.0), cfg_scale=6.7, timestep_shift=0.3),
}


def published_commands() -> list[tuple[str, str]]:
    """(command, published name) of every README command and `opendit models` command that samples a published
    checkpoint."""
    from opendit.published import PUBLISHED

    docs = [open(os.path.join(REPO, *path)).read() for path in (["README.md"], ["docs", "lightningdit.md"])]
    cmds = [c for text in docs for c in shell_commands(text) if ("sample_dit.py" in c or "sample_ddp.py" in c) and "--ckpt" in c]
    cmds += [p.command for p in PUBLISHED.values()]
    found = []
    for c in cmds:
        words = c.split()
        name = os.path.basename(words[words.index("--ckpt") + 1])
        if name in PUBLISHED:
            found.append((c, name))
    return found


@pytest.mark.parametrize("command,name", published_commands())
def test_every_command_for_a_published_checkpoint_runs_its_published_sampler(command, name, monkeypatch):
    from opendit.published import PUBLISHED
    from opendit.cli.recipes import parse_with_config
    from opendit.cli.sample import build_parser as grid_parser
    from opendit.transport import create_transport

    monkeypatch.chdir(REPO)  # the commands name recipes/ relative to the checkout
    words = command.split()
    script = next(i for i, w in enumerate(words) if w.endswith((".py")))
    parser = ddp_parser() if words[script].endswith("sample_ddp.py") else grid_parser()
    args, _ = parse_with_config(parser, words[script + 1:], section="sample")
    cfg = (FolderConfig if words[script].endswith("sample_ddp.py") else GridConfig).from_flat(vars(args))
    kind = PUBLISHED[name].objective
    objective = as_objective(create_transport()) if kind == "flow" else build_objective({"objective": "diffusion"})
    loaded = SimpleNamespace(objective=objective, source=name, objective_note="", in_channels=4)
    settings = sampler_settings(cfg, loaded)
    settings = {**objective.options, **settings}
    if kind == "flow" and settings["sampling_method"] is None:
        settings["sampling_method"] = DEFAULT_METHOD[settings["sampler"]]
    want = PUBLISHED_SAMPLER[name]
    assert {k: settings.get(k) for k in want} == want, command
    assert cfg.checkpoint.objective in ("auto", kind)


def test_the_published_commands_cover_every_published_checkpoint():
    from opendit.published import PUBLISHED

    assert {name for _, name in published_commands()} == set(PUBLISHED) == set(PUBLISHED_SAMPLER)
