"""Published checkpoints by name (opendit.published): the name -> file -> architecture resolution with small stand-in
files, the download into the hub cache from a local file:// URL (never the network), the one-line errors; and REPA's
release layout (projectors inside, time from data to noise) through sample_dit.py, sample_ddp.py and opendit convert,
its velocity against REPA's network with the time reversed."""

import argparse
import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from helpers import perturbed
from reference_dit import reference_forward
from opendit import published
from opendit.cli import main as cli_main
from opendit.errors import UserError
from opendit.models import DiT, DiT_models
from opendit.cli.sample import main as sample_main
from opendit.cli.sample_ddp import main as ddp_main
from opendit.checkpoint import load_weights


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache; the published URLs point at local files under tmp_path/remote."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("OPENDIT_OFFLINE", raising=False)
    remote = tmp_path / "remote"
    remote.mkdir()
    for name, p in list(published.PUBLISHED.items()):
        monkeypatch.setitem(published.PUBLISHED, name, dataclasses.replace(p, url=(remote / name).as_uri()))
    return remote


def stand_in(seed=0, in_channels=4):
    """A small DiT-N/2 state dict standing in for a published file."""
    torch.manual_seed(seed)
    return perturbed(DiT_models["DiT-N/2"](input_size=8, in_channels=in_channels, num_classes=10), seed=seed).state_dict()


def test_a_published_name_downloads_once_into_the_hub_cache(hub, tmp_path, capsys):
    sd = stand_in()
    torch.save(sd, hub / "DiT-XL-2-256x256.pt")
    got, source, _ = load_weights("DiT-XL-2-256x256.pt")
    cached = os.path.join(str(tmp_path / "torch"), "hub", "checkpoints", "DiT-XL-2-256x256.pt")
    assert source == cached and os.path.isfile(cached)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    os.remove(hub / "DiT-XL-2-256x256.pt")  # the cache is used from now on: no second download
    assert load_weights("DiT-XL-2-256x256.pt")[1] == cached
    # name -> file -> architecture: the sampling programs build the model the file describes
    out = tmp_path / "grid.png"
    assert sample_main(["--ckpt", "DiT-XL-2-256x256.pt", "--vae", "none", "--device", "cpu", "--num_sampling_steps", "3",
                        "--labels", "1,2", "--out", str(out)]) == 0
    assert out.is_file() and "DiT-N/2" in capsys.readouterr().out


def test_a_wrong_hash_or_no_network_is_one_line_and_leaves_nothing(hub, tmp_path, monkeypatch, capsys):
    torch.save(stand_in(), hub / "SiT-XL-2-256x256.pt")
    p = published.PUBLISHED["SiT-XL-2-256x256.pt"]
    monkeypatch.setitem(published.PUBLISHED, p.name, dataclasses.replace(p, sha256="0123456789abcdef"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(UserError, match=r"cannot download the published SiT-XL-2-256x256.pt weights .*; download "):
        load_weights("SiT-XL-2-256x256.pt")
    assert not cache.exists() or not os.listdir(cache)  # no partial or wrong file left in the cache
    capsys.readouterr()  # the download's progress bar
    monkeypatch.setenv("OPENDIT_OFFLINE", "1")
    rc = sample_main(["--ckpt", "REPA-SiT-XL-2-256x256.pt", "--device", "cpu", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "OPENDIT_OFFLINE" in err[0] and str(cache / "REPA-SiT-XL-2-256x256.pt") in err[0]
    assert "download file://" in err[0] and not (tmp_path / "x.png").exists()
    # an unknown name: one line, with the closest published name
    rc = sample_main(["--ckpt", "DiT-XL-2-256.pt", "--device", "cpu", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "did you mean the published DiT-XL-2-256x256.pt" in err[0]


def test_a_published_name_decides_the_objective_its_weights_cannot(hub, tmp_path, monkeypatch, capsys):
    """A published LightningDiT file has no variance half (the weights cannot tell flow from diffusion): its record
    says flow; --objective diffusion on it is one line naming the record."""
    name = "lightningdit-xl-imagenet256-64ep.pt"
    monkeypatch.setitem(published.PUBLISHED, name, dataclasses.replace(published.PUBLISHED[name], latent_stats=None))
    sd = stand_in()  # a pixel-space stand-in (no statistics to fetch), cut to 4 output channels: no variance half
    sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"][:16]
    sd["final_layer.linear.bias"] = sd["final_layer.linear.bias"][:16]
    torch.save(sd, hub / name)
    args = ["--ckpt", name, "--vae", "none", "--device", "cpu", "--num_sampling_steps", "3", "--labels", "1"]
    assert sample_main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert "objective flow (from the published checkpoint's record)" in capsys.readouterr().out
    assert sample_main([*args, "--objective", "diffusion", "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a published flow checkpoint, but --objective says diffusion" in err[0], err
    assert not (tmp_path / "b.png").exists()


def test_opendit_models_lists_the_published_checkpoints(capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    for name, p in published.PUBLISHED.items():
        assert name in out and p.fid in out and p.command in out
    assert "FID-50K 2.27" in out and "--cfg_scale 6.7 --cfg_interval 0.125 1" in out


def test_a_published_lightningdit_fetches_its_latent_statistics(hub, tmp_path, monkeypatch):
    from opendit.config.sample import CheckpointSettings
    from opendit.sampling.load import latent_norm

    mean, std = torch.randn(1, 4, 1, 1), torch.rand(1, 4, 1, 1) + 0.5
    torch.save({"mean": mean, "std": std}, hub / "latents_stats.pt")
    name = "lightningdit-xl-imagenet256-64ep.pt"
    stats_url = (hub / "latents_stats.pt").as_uri()
    p = published.PUBLISHED[name]
    monkeypatch.setitem(published.PUBLISHED, name, dataclasses.replace(p, latent_stats=("latents_stats.pt", stats_url)))
    norm = latent_norm(CheckpointSettings(ckpt=name), None)
    assert torch.equal(norm.mean, mean.reshape(-1)) and torch.equal(norm.std, std.reshape(-1))
    assert norm.source.endswith(os.path.join("hub", "checkpoints", "latents_stats.pt"))  # fetched into the cache
    assert latent_norm(CheckpointSettings(ckpt="DiT-XL-2-256x256.pt"), None) is None


# ----------------------------------------------------------------------------- REPA's release layout


def repa_release_state_dict(seed=0, depth=2, hidden=64, patch=2, channels=4, classes=10, grid=4, z_dim=24, proj=32):
    """The state dict of REPA's models/sit.py SiT (use_cfg, z_dims=[z_dim], projector_dim=proj, qk_norm off), written
    from its parameter list: no learn_sigma (out_channels = in_channels), LayerNorms without affine parameters, timm
    Attention (qkv, proj) and Mlp (fc1, fc2), the projectors inside; random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    sd = {"pos_embed": r(1, grid * grid, hidden), "x_embedder.proj.weight": r(hidden, channels, patch, patch),
          "x_embedder.proj.bias": r(hidden), "t_embedder.mlp.0.weight": r(hidden, 256), "t_embedder.mlp.0.bias": r(hidden),
          "t_embedder.mlp.2.weight": r(hidden, hidden), "t_embedder.mlp.2.bias": r(hidden),
          "y_embedder.embedding_table.weight": r(classes + 1, hidden)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "attn.qkv.weight": r(3 * hidden, hidden), b + "attn.qkv.bias": r(3 * hidden),
                   b + "attn.proj.weight": r(hidden, hidden), b + "attn.proj.bias": r(hidden),
                   b + "mlp.fc1.weight": r(4 * hidden, hidden), b + "mlp.fc1.bias": r(4 * hidden),
                   b + "mlp.fc2.weight": r(hidden, 4 * hidden), b + "mlp.fc2.bias": r(hidden),
                   b + "adaLN_modulation.1.weight": r(6 * hidden, hidden), b + "adaLN_modulation.1.bias": r(6 * hidden)})
    sd.update({"projectors.0.0.weight": r(proj, hidden), "projectors.0.0.bias": r(proj),
               "projectors.0.2.weight": r(proj, proj), "projectors.0.2.bias": r(proj),
               "projectors.0.4.weight": r(z_dim, proj), "projectors.0.4.bias": r(z_dim),
               "final_layer.linear.weight": r(patch * patch * channels, hidden),
               "final_layer.linear.bias": r(patch * patch * channels),
               "final_layer.adaLN_modulation.1.weight": r(2 * hidden, hidden),
               "final_layer.adaLN_modulation.1.bias": r(2 * hidden)})
    return sd


def test_repa_layout_velocity_is_repa_s_network_with_the_time_reversed(tmp_path):
    repa = repa_release_state_dict()
    file = tmp_path / "last.pt"
    torch.save(repa, file)
    sd, _, _ = load_weights(str(file))
    assert not any(k.startswith("projectors.") for k in sd)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10,
                learn_sigma=True).eval()  # eval: no label dropout
    model.load_state_dict(sd)  # SiT's layout: 8 output channels, the variance half untouched (zero)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 4, 10])
    t = torch.tensor([0.0, 0.37, 0.93])  # ours: 0 = noise
    with torch.no_grad():
        ours = model(x, t, y)
    assert torch.equal(ours[:, 4:], torch.zeros_like(ours[:, 4:]))
    net = {k: v.double() for k, v in repa.items() if not k.startswith("projectors.")}
    # REPA's SiT.forward is DiT's forward without learn_sigma, with t in [0, 1] as given (tests/reference_dit.py)
    theirs = reference_forward(net, x.double(), 1 - t.double(), y, patch=2, heads=2, learn_sigma=False)
    # ours in fp32 (the rotation folded in float64, stored in fp32) against float64: fp32 rounding through 2 blocks
    torch.testing.assert_close(ours[:, :4].double(), -theirs, rtol=1e-5, atol=1e-5)


def test_repa_release_checkpoint_samples_and_converts(tmp_path, capsys):
    repa = repa_release_state_dict(seed=1, depth=4, hidden=128)  # DiT-N/2's shape
    ckpt = tmp_path / "0400000.pt"  # REPA train.py's checkpoint: model, ema, opt, args, steps
    torch.save({"model": repa, "ema": repa, "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "args": argparse.Namespace(enc_type="dinov2-vit-b", encoder_depth=8), "steps": 400000}, ckpt)
    common = ["--vae", "none", "--device", "cpu", "--num_sampling_steps", "5", "--cfg_scale", "1.8", "--cfg_interval",
              "0.3", "1", "--sampler", "sde"]
    assert ddp_main(["--ckpt", str(ckpt), "--num_samples", "4", "--per_proc_batch_size", "4",
                     "--sample_dir", str(tmp_path / "a"), *common]) == 0
    assert "objective flow" in capsys.readouterr().out
    assert sample_main(["--ckpt", str(ckpt), "--labels", "1,2", "--out", str(tmp_path / "g.png"), *common]) == 0
    converted = tmp_path / "repa.safetensors"
    assert cli_main(["convert", str(ckpt), str(converted)]) == 0
    assert ddp_main(["--ckpt", str(converted), "--num_samples", "4", "--per_proc_batch_size", "4",
                     "--sample_dir", str(tmp_path / "b"), *common]) == 0
    a = np.load(str(tmp_path / "a") + ".npz")["arr_0"]
    assert np.array_equal(a, np.load(str(tmp_path / "b") + ".npz")["arr_0"]) and a.std() > 0
    # sampled as a diffusion: refused in one line
    capsys.readouterr()
    rc = ddp_main(["--ckpt", str(ckpt), "--objective", "diffusion", "--num_samples", "2", "--sample_dir",
                   str(tmp_path / "c"), "--vae", "none", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--objective flow" in err[0]


def test_the_time_reversal_rotation_is_exact():
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    half = 128
    w = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).double()
    f = lambda s: torch.cat([torch.cos(s[:, None] * w), torch.sin(s[:, None] * w)], 1)  # noqa: E731
    torch.testing.assert_close(f(1 - t), f(t) @ published.time_reversal_rotation(256).T, rtol=0, atol=1e-12)
