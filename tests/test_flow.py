"""Flow matching through the programs: training with --objective flow, every sampling entry point picking the flow
samplers by itself, SiT-style bare checkpoints, recipes as TOML files, and the one-line errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, TINY, only_run_dir, read_metrics, run_train
from opendit.images import labelled_grid, to_uint8
from opendit.models import DiT_models
from opendit.objectives import build_objective
from opendit.cli.recipes import config_argv
from opendit.cli.sample import build_parser as sample_parser
from opendit.cli.sample import main as sample_main
from opendit.cli.sample_ddp import build_parser as ddp_parser
from opendit.cli.sample_ddp import main as ddp_main
from opendit.sampling.folder import batch_seed
from opendit.objectives import trained_kind
from opendit.cli.flags import parse_argv
from opendit.config import TrainConfig
from opendit.models import config_from_state_dict
from opendit.cli.train import build_parser as train_parser
from opendit.checkpoint import list_checkpoints
from opendit.transport import Sampler, create_transport
from helpers import perturbed

FLOW = ["--objective", "flow"]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """A real 4-step flow run of DiT-N/2 on digits, with FID during training and the final grid."""
    out = tmp_path_factory.mktemp("flow")
    r = run_train(*TINY, *FLOW, "--time_sampling", "logit_normal", "--batch_size", "16",
                  "--max_steps", "4", "--ckpt_every", "2", "--log_every", "1", "--eval_every", "4",
                  "--eval_samples", "20", "--final_samples", "1", "--final_cfg_scale", "2.0", "--outputs", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return only_run_dir(out)


def reference_flow_samples(ema_state: dict, labels: list[int], z: torch.Tensor, cfg: float, points: int,
                           method: str = "euler", guidance_channels=None, sde: bool = False) -> torch.Tensor:
    """The published SiT sampling procedure, spelled out: doubled batch with null labels, forward_with_cfg, the
    sampler's trajectory, its last element, the conditional half."""
    rng = torch.get_rng_state()  # building the model draws its initialization: keep the caller's RNG stream
    model = DiT_models["DiT-N/2"](input_size=8, in_channels=z.shape[1], num_classes=10).eval()
    torch.set_rng_state(rng)
    model.load_state_dict(ema_state)
    y = torch.tensor(labels)
    if sde:
        fn = Sampler(create_transport()).sample_sde(sampling_method=method, diffusion_form="sigma", num_steps=points)
    else:
        fn = Sampler(create_transport()).sample_ode(sampling_method=method, num_steps=points)
    if cfg == 1.0:
        return fn(z, model.forward, y=y)[-1]
    traj = fn(torch.cat([z, z]), lambda x, t, y: model.forward_with_cfg(x, t, y, cfg, guidance_channels),
              y=torch.cat([y, torch.full_like(y, 10)]))
    return traj[-1][: len(labels)]


def test_flow_run_records_its_objective_and_trains(flow_run):
    cfg = json.load(open(os.path.join(flow_run, "config.json")))
    assert cfg["objective"] == "flow" and cfg["path_type"] == "Linear" and cfg["prediction"] == "velocity"
    assert cfg["time_sampling"] == "logit_normal" and cfg["cosine_loss"] == 0.0 and cfg["train_eps"] == 0.0
    m = read_metrics(flow_run)
    assert sorted(k for k in m if "loss" in m[k]) == [1, 2, 3, 4] and np.isfinite(m[4]["fid"])
    assert os.path.isfile(os.path.join(flow_run, "samples.png"))
    log = open(os.path.join(flow_run, "log.txt")).read()
    assert "objective flow (Linear path, velocity prediction, t logit_normal(0, 1))" in log
    assert "flow ODE heun, 11-point grid" in log
    ema = torch.load(os.path.join(list_checkpoints(flow_run)[-1], "ema.pt"), weights_only=True)
    assert trained_kind(ema, config_from_state_dict(ema)) == "flow"  # the variance half is never trained


def test_flow_checkpoint_samples_through_every_entry_point(flow_run, tmp_path):
    ckpt = list_checkpoints(flow_run)[-1]
    ema = torch.load(os.path.join(ckpt, "ema.pt"), weights_only=True)
    # sample_ddp on the run directory, no sampler flags: the flow ODE (euler) from config.json
    d = tmp_path / "ddp"
    assert ddp_main(["--ckpt", flow_run, "--num_samples", "6", "--per_proc_batch_size", "3", "--device", "cpu",
                     "--num_sampling_steps", "5", "--cfg_scale", "2.0", "--sample_dir", str(d)]) == 0
    got = np.load(str(d) + ".npz")["arr_0"]
    for b in range(2):
        torch.manual_seed(batch_seed(0, b))
        labels = [i % 10 for i in range(3 * b, 3 * b + 3)]
        z = torch.randn(3, 1, 8, 8)
        want = to_uint8(reference_flow_samples(ema, labels, z, 2.0, 5))
        assert np.array_equal(got[3 * b:3 * b + 3], want.reshape(got[3 * b:3 * b + 3].shape)), b
    settings = json.load(open(d / "samples.json"))
    assert settings["objective"] == "flow" and settings["sampler"] == "ode" and settings["sampling_method"] == "euler"

    # sample_dit.py on the bare ema.pt copied away from its run: the weights say flow
    bare = tmp_path / "ema.pt"
    shutil.copy(os.path.join(ckpt, "ema.pt"), bare)
    out = tmp_path / "grid.png"
    assert sample_main(["--ckpt", str(bare), "--labels", "3,1", "--num_sampling_steps", "5", "--cfg_scale", "2.0",
                        "--seed", "7", "--device", "cpu", "--out", str(out)]) == 0
    torch.manual_seed(7)
    z = torch.randn(2, 1, 8, 8)
    x = reference_flow_samples(ema, [3, 1], z, 2.0, 5)
    expected = np.asarray(labelled_grid(x.clamp(-1, 1), [3, 1], [str(i) for i in range(10)]))
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected)

    # Heun and the SDE (its noise from the global RNG after z, as in the published loop) through the same program
    for method, extra, sde in (("heun", ["--sampling_method", "heun"], False), ("Euler", ["--sampler", "sde"], True),
                               ("Heun", ["--sampler", "sde", "--sampling_method", "Heun"], True)):
        o = tmp_path / f"{method}{sde}.png"
        assert sample_main(["--ckpt", str(bare), "--labels", "3,1", "--seed", "7", "--device", "cpu", "--out", str(o),
                            "--num_sampling_steps", "5", "--cfg_scale", "2.0", *extra]) == 0
        torch.manual_seed(7)
        z = torch.randn(2, 1, 8, 8)
        x = reference_flow_samples(ema, [3, 1], z, 2.0, 5, method=method, sde=sde)
        expected = np.asarray(labelled_grid(x.clamp(-1, 1), [3, 1], [str(i) for i in range(10)]))
        assert np.array_equal(np.asarray(Image.open(o).convert("RGB")), expected), (method, sde)


def test_sit_style_bare_checkpoint_samples_as_published(tmp_path, capsys):
    """A DiT-layout state dict with 8 output channels whose variance half is untouched (as in SiT-XL-2-256x256.pt):
    --objective flow (or nothing) samples it with the published procedure (guidance on the first 3 channels)."""
    torch.manual_seed(0)
    model = perturbed(DiT_models["DiT-N/2"](input_size=8, in_channels=4, num_classes=10), seed=0, std=0.05)
    sd = model.state_dict()
    rows = torch.arange(sd["final_layer.linear.weight"].shape[0]) % 8 >= 4
    sd["final_layer.linear.weight"][rows] = 0
    sd["final_layer.linear.bias"][rows] = 0
    ckpt = tmp_path / "SiT-N-2.pt"
    torch.save(sd, ckpt)
    for extra in (["--objective", "flow"], []):
        d = tmp_path / f"s{len(extra)}"
        assert ddp_main(["--ckpt", str(ckpt), "--vae", "none", "--num_samples", "4", "--per_proc_batch_size", "4",
                         "--device", "cpu", "--num_sampling_steps", "6", "--cfg_scale", "4.0", "--guidance_channels",
                         "3", "--sample_dir", str(d), *extra]) == 0
        assert "objective flow" in capsys.readouterr().out
    torch.manual_seed(batch_seed(0, 0))
    z = torch.randn(4, 4, 8, 8)
    x = reference_flow_samples(sd, [0, 1, 2, 3], z, 4.0, 6, guidance_channels=3)
    want = to_uint8(x)  # --vae none: the 4 latent channels as they are
    for d in ("s2", "s0"):
        assert np.array_equal(np.load(str(tmp_path / d) + ".npz")["arr_0"], want)
    # sampled as a diffusion: refused, one line
    rc = ddp_main(["--ckpt", str(ckpt), "--vae", "none", "--objective", "diffusion", "--num_samples", "2",
                   "--device", "cpu", "--sample_dir", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--objective flow" in err and not (tmp_path / "bad").exists()


def test_flow_resume_gives_the_same_losses(tmp_path):
    common = [*TINY, *FLOW, "--time_sampling", "logit_normal", "--batch_size", "32", "--log_every", "1",
              "--max_steps", "4", "--ckpt_keep", "0"]
    full = run_train(*common, "--ckpt_every", "2", "--outputs", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]
    full_dir = only_run_dir(tmp_path / "full")
    part = tmp_path / "part" / "000-DiT-N-2"
    part.mkdir(parents=True)
    shutil.copytree(list_checkpoints(full_dir)[0], part / os.path.basename(list_checkpoints(full_dir)[0]))
    shutil.copy(os.path.join(full_dir, "config.json"), part / "config.json")
    resumed = run_train("--load", str(part), "--log_every", "1", "--device", "cpu")  # the objective comes with the run
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read_metrics(full_dir), read_metrics(str(part))
    assert sorted(b) == [3, 4] and all(a[s]["loss"] == b[s]["loss"] for s in (3, 4))
    changed = run_train("--load", str(part), "--objective", "diffusion", "--max_steps", "6", "--device", "cpu")
    assert changed.returncode == 2 and "--objective diffusion: the run" in changed.stderr


# ----------------------------------------------------------------------------- one-line errors

@pytest.fixture(scope="module")
def diffusion_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("diff")
    r = run_train(*TINY, "--batch_size", "16", "--max_steps", "1", "--outputs", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return os.path.join(list_checkpoints(only_run_dir(out))[-1], "ema.pt")


@pytest.mark.parametrize("case", ["flow_as_ddpm", "interval_outside", "interval_reversed", "steps_zero",
                                  "one_point_grid", "sbdm_at_noise", "unknown_method", "diffusion_as_flow",
                                  "shift_on_diffusion", "diffusion_with_ode", "sde_option_on_ode", "clip_on_flow"])
def test_bad_sampling_input_is_one_line_and_exit_2(case, flow_run, diffusion_ckpt, tmp_path, capsys):
    flow_ckpt = os.path.join(list_checkpoints(flow_run)[-1], "ema.pt")
    argv = {
        "flow_as_ddpm": ["--ckpt", flow_ckpt, "--sampler", "ddpm"],
        "interval_outside": ["--ckpt", flow_ckpt, "--cfg_interval", "0.5", "1.5"],
        "interval_reversed": ["--ckpt", flow_ckpt, "--cfg_interval", "0.7", "0.2"],
        "steps_zero": ["--ckpt", flow_ckpt, "--num_sampling_steps", "0"],
        "one_point_grid": ["--ckpt", flow_ckpt, "--num_sampling_steps", "1"],
        "sbdm_at_noise": ["--ckpt", flow_ckpt, "--sampler", "sde", "--diffusion_form", "SBDM"],
        "unknown_method": ["--ckpt", flow_ckpt, "--sampling_method", "dopri7"],
        "diffusion_as_flow": ["--ckpt", diffusion_ckpt, "--objective", "flow"],
        "shift_on_diffusion": ["--ckpt", diffusion_ckpt, "--timestep_shift", "0.3"],
        "diffusion_with_ode": ["--ckpt", diffusion_ckpt, "--sampler", "ode"],
        "sde_option_on_ode": ["--ckpt", flow_ckpt, "--diffusion_form", "linear"],
        "clip_on_flow": ["--ckpt", flow_ckpt, "--clip_denoised", "yes"],
    }[case]
    out = tmp_path / "g.png"
    if "--num_sampling_steps" not in argv:
        argv += ["--num_sampling_steps", "4"]
    try:
        rc = sample_main([*argv, "--device", "cpu", "--out", str(out)])
    except SystemExit as e:  # argparse's own checks
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--path_type", "Cosine"], "invalid choice"),
    (["--path_type", "GVP"], "add --objective flow"),
    (["--objective", "flow", "--prediction", "noise", "--cosine_loss"], "needs prediction velocity"),
    (["--objective", "flow", "--loss_weight", "likelihood"], "the velocity loss has none"),
    (["--objective", "flow", "--time_std", "2"], "add --time_sampling logit_normal"),
])
def test_bad_training_input_is_one_line_and_exit_2(argv, message, tmp_path):
    r = run_train(*TINY, "--max_steps", "1", "--batch_size", "8", "--outputs", str(tmp_path), *argv)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not os.path.exists(tmp_path) or not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- recipes

def test_config_file_sets_flags_and_the_command_line_overrides(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('objective = "flow"\ntime_sampling = "logit_normal"\nlr = 5e-4\nmax_steps = 2\n'
                      'batch_size = 16\n[sample]\nsampler = "sde"\n')
    r = run_train(*TINY, "--config", str(recipe), "--lr", "1e-3", "--outputs", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.load(open(os.path.join(only_run_dir(tmp_path / "o"), "config.json")))
    assert cfg["objective"] == "flow" and cfg["time_sampling"] == "logit_normal" and cfg["max_steps"] == 2
    assert cfg["lr"] == 1e-3 and cfg["config"] == str(recipe)  # the command line wins; the file is recorded
    assert isinstance(build_objective(cfg).transport.path, type(create_transport().path))
    assert config_argv(sample_parser(), str(recipe), "sample") == ["--sampler", "sde"]


@pytest.mark.parametrize("text,message", [
    ("lrr = 1\n", "unknown setting 'lrr'"),
    ("lr = -1\n", "lr: must be a finite number > 0"),
    ("objective = 'flows'\n", "'flows' is not one of"),
    ("compile = 'yes'\n", "must be true or false"),
    ("lr = [1\n", "not valid TOML"),
])
def test_bad_config_files_are_one_line_and_exit_2(text, message, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    r = run_train(*TINY, "--config", str(recipe), "--outputs", str(tmp_path / "o"))
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "recipes"))))
def test_shipped_recipes_are_valid_for_every_program(name):
    path = os.path.join(REPO, "recipes", name)
    train_argv = config_argv(train_parser(), path, "train")
    build_objective(parse_argv(TrainConfig, train_argv).flat())
    for parser in (sample_parser(), ddp_parser()):
        sample_argv = config_argv(parser, path, "sample")
        parser.parse_args([*sample_argv, "--ckpt", "x.pt"])
