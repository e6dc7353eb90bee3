"""opendit convert: exact round trips between our checkpoints, bare .pt, .safetensors and diffusers folders, and a
converted diffusers model that computes what ours computes."""

import os

import pytest
import torch
from safetensors.torch import load_file

from opendit.checkpoint import save_checkpoint
from opendit.cli.convert import main as convert
from opendit.models import DiT_models


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint of a small latent-space DiT (DiT-S/4 at 16x16x4) with random, non-zero weights everywhere."""
    torch.manual_seed(0)
    m = DiT_models["DiT-S/4"](input_size=16, in_channels=4, num_classes=10)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n != "pos_embed":  # adaLN and the final layer start at zero: make every weight matter
                p.normal_(0, 0.02)
    os.makedirs(tmp_path / "run")
    d = save_checkpoint(str(tmp_path / "run"), "epoch0-global_step1", model_state=m.state_dict(),
                        ema_state=m.state_dict(), optimizer_state={}, running_states={"epoch": 0, "epoch_offset": 0,
                                                                                        "global_step": 1})[0]
    return m.eval(), d


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trips_are_exact(ckpt, tmp_path, capsys):
    m, d = ckpt
    ref = m.state_dict()
    assert convert([os.path.dirname(d), str(tmp_path / "a.pt")]) == 0  # run dir -> bare .pt (its EMA)
    assert_same(torch.load(tmp_path / "a.pt", weights_only=True), ref)
    assert convert([str(tmp_path / "a.pt"), str(tmp_path / "b.safetensors")]) == 0
    assert_same(load_file(tmp_path / "b.safetensors"), ref)
    assert convert([str(tmp_path / "b.safetensors"), str(tmp_path / "c.pt")]) == 0
    assert_same(torch.load(tmp_path / "c.pt", weights_only=True), ref)
    assert convert([os.path.join(d, "model"), str(tmp_path / "d.pt"), "--format", "pt"]) == 0
    assert_same(torch.load(tmp_path / "d.pt", weights_only=True), ref)
    # refuses to overwrite, one line
    assert convert([str(tmp_path / "a.pt"), str(tmp_path / "c.pt")]) == 2
    assert "pass --force" in capsys.readouterr().err


def test_diffusers_round_trip_and_numerics(ckpt, tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    m, d = ckpt
    out = tmp_path / "dit-diffusers"
    assert convert([os.path.join(d, "ema.pt"), str(out)]) == 0
    assert convert([os.path.join(d, "ema.pt"), str(out)]) == 2  # exists
    assert convert([os.path.join(d, "ema.pt"), str(out), "--force"]) == 0  # replaced whole, nothing left aside
    assert sorted(os.listdir(tmp_path)) == ["dit-diffusers", "run"]
    assert convert([str(out), str(tmp_path / "back.pt")]) == 0  # and back: bit-exact, pos_embed recomputed
    assert_same(torch.load(tmp_path / "back.pt", weights_only=True), m.state_dict())

    theirs = diffusers.DiTTransformer2DModel.from_pretrained(str(out)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([0, 3, 10])  # 10: the null class
    with torch.no_grad():
        got = theirs(x, timestep=t, class_labels=y).sample
        m.t_embedder.freq_shift = 1  # diffusers' timestep frequencies: the weights map exactly
        want = m(x, t, y)
        m.t_embedder.freq_shift = 0  # the DiT release's
        release = m(x, t, y)
    assert got.shape == want.shape == (3, 8, 16, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # measured identical here (outputs ~1)
    # the frequency convention alone changes the output: documented, not hidden
    assert (release - want).abs().max() > 1e-3


def test_errors_are_one_line(ckpt, tmp_path, capsys):
    _, d = ckpt
    cases = [
        ([str(tmp_path / "missing.pt"), str(tmp_path / "x.pt")], "no such file"),
        ([os.path.join(d, "ema.pt"), str(tmp_path / "x.weird")], "cannot tell the format"),
        ([os.path.join(d, "ema.pt"), str(tmp_path / "nofolder" / "x.pt")], "does not exist"),
    ]
    for args, expected in cases:
        assert convert(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["run"]
