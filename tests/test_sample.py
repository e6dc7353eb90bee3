import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import TINY, only_run_dir, run, run_train
from opendit.checkpoint import list_checkpoints, load_weights
from opendit.diffusion import create_diffusion
from opendit.errors import UserError
from opendit.images import labelled_grid
from opendit.models import DiT_models
from opendit.cli.sample import main as sample_main
from opendit.cli.sample_ddp import main as ddp_main
from helpers import perturbed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real 3-step training run of DiT-N/2 on digits (1 channel, 8x8, 10 classes)."""
    out = tmp_path_factory.mktemp("run")
    r = run_train(*TINY, "--batch_size", "16", "--max_steps", "3", "--ckpt_every", "2", "--outputs", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return only_run_dir(out)


def published_style_model(seed=0):
    """DiT-N/2 with 4 latent channels and 10 classes, non-zero random weights."""
    torch.manual_seed(seed)
    return perturbed(DiT_models["DiT-N/2"](input_size=8, in_channels=4, num_classes=10), seed=seed, std=0.05).eval()


def test_bare_checkpoint_through_sample_dit_matches_the_python_api(tmp_path):
    model = published_style_model()
    ckpt = tmp_path / "DiT-N-2-64x64.pt"
    torch.save(model.state_dict(), ckpt)  # the published format: a bare state dict
    out = tmp_path / "grid.png"
    rc = sample_main(["--ckpt", str(ckpt), "--vae", "none", "--clip_denoised", "no", "--labels", "3,1,4,1",
                      "--num_sampling_steps", "10", "--cfg_scale", "4.0", "--seed", "7", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    # the same with the public API, the way the published sample.py does it
    torch.manual_seed(7)
    z = torch.randn(4, 4, 8, 8)
    y = torch.tensor([3, 1, 4, 1])
    diffusion = create_diffusion("10")
    x = diffusion.p_sample_loop(model.forward_with_cfg, (8, 4, 8, 8), noise=torch.cat([z, z]), clip_denoised=False,
                                model_kwargs=dict(y=torch.cat([y, torch.full_like(y, 10)]), cfg_scale=4.0))[:4]
    expected = np.asarray(labelled_grid(x.clamp(-1, 1)[:, :3], y.tolist(), [str(i) for i in range(10)]))
    got = np.asarray(Image.open(out).convert("RGB"))
    assert got.shape == expected.shape and np.array_equal(got, expected)


def test_guidance_channels_three_matches_published_guidance(tmp_path):
    model = published_style_model(1)
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    outs = {}
    for g in ("3", None):
        out = tmp_path / f"g{g}.png"
        args = ["--ckpt", str(ckpt), "--vae", "none", "--labels", "2", "--num_sampling_steps", "5", "--device", "cpu",
                "--out", str(out)] + (["--guidance_channels", g] if g else [])
        assert sample_main(args) == 0
        outs[g] = np.asarray(Image.open(out))
    assert not np.array_equal(outs["3"], outs[None])  # guiding 3 of 4 channels is a different sampler


def test_every_checkpoint_kind_loads(trained_run, tmp_path):
    ckpts = list_checkpoints(trained_run)
    last = ckpts[-1]
    ema = torch.load(os.path.join(last, "ema.pt"), weights_only=True)
    from safetensors.torch import load_file

    raw = load_file(os.path.join(last, "model", "model.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # EMA and raw weights differ after training
    bare = tmp_path / "bare.pt"
    torch.save(ema, bare)
    st = tmp_path / "w.safetensors"
    save_file(raw, str(st))
    kinds = {
        "bare .pt": (str(bare), False, ema),
        "ema.pt": (os.path.join(last, "ema.pt"), False, ema),
        "model/ (safetensors)": (os.path.join(last, "model"), False, raw),
        ".safetensors file": (str(st), False, raw),
        "checkpoint dir (EMA)": (last, False, ema),
        "checkpoint dir (raw)": (last, True, raw),
        "run dir (latest, EMA)": (trained_run, False, ema),
        "run dir (latest, raw)": (trained_run, True, raw),
    }
    for kind, (path, use_raw, expected) in kinds.items():
        sd, _, _ = load_weights(path, use_raw)
        assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd), kind
    # and the whole sampler runs from a run directory (config read from config.json: pixel space, 8 px)
    out = tmp_path / "run.png"
    assert sample_main(["--ckpt", trained_run, "--num_sampling_steps", "3", "--device", "cpu", "--out", str(out)]) == 0
    assert Image.open(out).height >= 10 * 64  # ten classes, one labelled row each


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickles_carrying_code_are_refused(tmp_path, capsys):
    model = published_style_model()
    evil = tmp_path / "evil.pt"
    torch.save({"model": model.state_dict(), "payload": _Evil()}, evil)
    # a training checkpoint's argparse.Namespace (DiT's, SiT's, REPA's train.py) is plain data: it loads; a Namespace
    # that carries an object is refused like any other
    train_style = tmp_path / "0100000.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": argparse.Namespace(lr=1e-4)}, train_style)
    assert load_weights(str(train_style))[0].keys() == model.state_dict().keys()
    evil_args = tmp_path / "0200000.pt"
    torch.save({"ema": model.state_dict(), "args": argparse.Namespace(hook=_Evil())}, evil_args)
    for path in (evil, evil_args):
        with pytest.raises(UserError, match="refusing to load"):
            load_weights(str(path))
        assert sample_main(["--ckpt", str(path), "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "refusing to load" in err[0] and "weights_only" in err[0]
    assert not (tmp_path / "x.png").exists()
    # a plain pickle with the tensors under "ema" (no objects) is fine
    ok = tmp_path / "ok.pt"
    torch.save({"ema": model.state_dict(), "step": 5}, ok)
    assert load_weights(str(ok))[0].keys() == model.state_dict().keys()


def test_sample_ddp_npz_format_and_resume(tmp_path):
    model = published_style_model(2)
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    d = tmp_path / "samples"
    args = ["--ckpt", str(ckpt), "--vae", "none", "--num_samples", "10", "--per_proc_batch_size", "4", "--sample_dir",
            str(d), "--sampler", "dpm-solver++", "--num_sampling_steps", "4", "--device", "cpu"]
    assert ddp_main(args) == 0
    with np.load(str(d) + ".npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (10, 8, 8, 4) and images.dtype == np.uint8  # N x H x W x C
    assert labels.dtype == np.int64 and labels.tolist() == [i % 10 for i in range(10)]
    pngs = sorted(p for p in os.listdir(d) if p.endswith(".png"))
    assert pngs == [f"{i:06d}.png" for i in range(10)] and sorted(os.listdir(d)) == pngs + ["samples.json"]
    # resume: remove two samples of different batches; only those batches are redone, with the same result
    before = {p: np.asarray(Image.open(d / p)) for p in pngs}
    mtimes = {p: os.stat(d / p).st_mtime_ns for p in pngs}
    os.remove(d / "000001.png")
    os.remove(d / "000009.png")
    assert ddp_main(args) == 0
    for p in pngs:
        assert np.array_equal(np.asarray(Image.open(d / p)), before[p]), p
    untouched = {"000004.png", "000005.png", "000006.png", "000007.png"}  # batch 1 was complete
    assert all(os.stat(d / p).st_mtime_ns == mtimes[p] for p in untouched)
    with np.load(str(d) + ".npz") as f:
        assert np.array_equal(f["arr_0"], images)


def test_sample_ddp_two_processes_match_one(tmp_path):
    model = published_style_model(3)
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    script = os.path.join(REPO, "scripts", "dit", "sample_ddp.py")
    common = ["--ckpt", str(ckpt), "--vae", "none", "--num_samples", "12", "--per_proc_batch_size", "3",
              "--num_sampling_steps", "5", "--device", "cpu"]
    import sys

    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *common,
               "--sample_dir", str(tmp_path / "two")], env_extra={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    assert ddp_main([*common, "--sample_dir", str(tmp_path / "one")]) == 0
    a, b = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def _tiny_vae_dir(path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=16,
    )
    vae.save_pretrained(str(path))
    return str(path)


MISMATCHES = {
    "classes": (["--num_classes", "7"], "checkpoint has 10 classes, --num_classes is 7"),
    "image size": (["--image_size", "16"], "--image_size 8, not 16"),
    "unknown model": (["--model", "DiT-Q/2"], "unknown model"),
    "other model": (["--model", "DiT-S/2"], "--model is DiT-S/2"),
    "channels": (["--vae", "{vae}"], "checkpoint has 1 input channels but the VAE's latents have 4"),
    "labels": (["--labels", "3,12"], "outside 0..9"),
    "missing ckpt": (["--ckpt", "{tmp}/nothing.pt"], "no such file"),
    "guidance channels": (["--guidance_channels", "5"], "--guidance_channels must be in 1..1"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_mismatches_are_one_line_errors(trained_run, tmp_path, capsys, case):
    args, expected = MISMATCHES[case]
    fmt = {"tmp": str(tmp_path)}
    if "{vae}" in args:
        fmt["vae"] = _tiny_vae_dir(tmp_path / "vae")
    args = [a.format(**fmt) for a in args]
    base = ["--ckpt", trained_run, "--device", "cpu", "--num_sampling_steps", "2", "--out", str(tmp_path / "o.png")]
    if "--ckpt" in args:
        base = base[2:]
    assert sample_main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_sample_dit_cli_is_one_line_with_exit_2(tmp_path):
    import sys

    r = run([sys.executable, os.path.join(REPO, "scripts", "dit", "sample_dit.py"), "--ckpt", str(tmp_path / "none.pt")])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_digits_score_of_real_digits():
    """The quality check itself: real digits score ~100% and the FDs the issue quotes (300 real digits: ~22)."""
    from opendit.eval.digits import real_digits, score

    imgs, labels = real_digits()
    idx = np.random.default_rng(0).choice(len(imgs), 300, replace=False)
    m = score(np.round(imgs[idx] * 255 / 16).astype(np.uint8), labels[idx])
    assert m["accuracy"] >= 0.99
    assert 18 < m["pixel_fd"] < 27
    # shuffled labels: accuracy collapses to chance, the FDs do not change
    m2 = score(np.round(imgs[idx] * 255 / 16).astype(np.uint8), np.roll(labels[idx], 1))
    assert m2["accuracy"] < 0.3 and m2["pixel_fd"] == pytest.approx(m["pixel_fd"])


# ----------------------------------------------------------------------------- sample folders know what wrote them

def _npz(path):
    import json

    with np.load(path) as f:
        return f["arr_0"].copy(), json.loads(str(f["opendit_settings"]))


def _tree(root):
    """Every file under root (and root.npz) with its bytes."""
    out = {}
    for base in (str(root), str(root) + ".npz"):
        paths = [base] if os.path.isfile(base) else [os.path.join(d, f) for d, _, fs in os.walk(base) for f in fs]
        for p in paths:
            out[p] = open(p, "rb").read()
    return out


def test_sample_folders_cannot_mix_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(published_style_model(4).state_dict(), a)
    torch.save(published_style_model(5).state_dict(), b)
    common = ["--vae", "none", "--num_samples", "6", "--per_proc_batch_size", "3", "--sampler", "ddim",
              "--num_sampling_steps", "3", "--device", "cpu"]

    # the default folder is named after the settings: two cfg scales never meet
    assert ddp_main(["--ckpt", str(a), *common, "--cfg_scale", "1.0"]) == 0
    assert ddp_main(["--ckpt", str(a), *common, "--cfg_scale", "4.0"]) == 0
    folders = sorted(d for d in os.listdir("samples") if not d.endswith(".npz"))
    assert len(folders) == 2 and all(d.startswith("DiT-N-2-a-size-8-vae-none-ddim-3-cfg-") for d in folders)
    (img1, set1), (img4, set4) = (_npz(os.path.join("samples", d + ".npz")) for d in sorted(folders, key=len))
    assert (set1["cfg_scale"], set4["cfg_scale"]) == (1.0, 4.0) and not np.array_equal(img1, img4)
    assert set1["checkpoint"] == str(a) and set1["weights_sha256"] and set1["num_samples"] == 6
    # nor do two checkpoints (same file name, other weights: the name carries a hash of every setting)
    other = tmp_path / "other" / "a.pt"
    other.parent.mkdir()
    torch.save(published_style_model(5).state_dict(), other)
    assert ddp_main(["--ckpt", str(other), *common, "--cfg_scale", "1.0"]) == 0
    third = [d for d in os.listdir("samples") if not d.endswith(".npz") and d not in folders]
    assert len(third) == 1 and not np.array_equal(_npz(os.path.join("samples", third[0] + ".npz"))[0], img1)

    # an explicit folder: other cfg or other weights are refused, one line naming what differs, nothing touched
    d = tmp_path / "sweep"
    assert ddp_main(["--ckpt", str(a), *common, "--cfg_scale", "1.0", "--sample_dir", str(d)]) == 0
    capsys.readouterr()
    before = _tree(d)
    for other, says in (([str(a), "--cfg_scale", "4.0"], "cfg_scale 1.0 -> 4.0"),
                        ([str(b), "--cfg_scale", "1.0"], f"weights {a} (sha256"),
                        ([str(a), "--cfg_scale", "1.0", "--seed", "1"], "seed 0 -> 1")):
        assert ddp_main(["--ckpt", *other, *[c for c in common], "--sample_dir", str(d)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds samples of other settings" in err[0] and says in err[0], err
        assert _tree(d) == before
    assert np.array_equal(_npz(str(d) + ".npz")[0], img1)

    # --overwrite: interrupted half-way, the old samples are intact; rerun, the folder holds the new ones only
    import opendit.sampling.folder as sd_mod

    calls = {"n": 0}
    real_generate = sd_mod.generate

    def interrupted(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_generate(*args, **kw)

    monkeypatch.setattr(sd_mod, "generate", interrupted)
    assert ddp_main(["--ckpt", str(a), *common, "--cfg_scale", "4.0", "--sample_dir", str(d), "--overwrite"]) == 130
    assert {k: v for k, v in _tree(d).items()} == before  # DIR and DIR.npz untouched; the new ones are staged aside
    monkeypatch.setattr(sd_mod, "generate", real_generate)
    assert ddp_main(["--ckpt", str(a), *common, "--cfg_scale", "4.0", "--sample_dir", str(d), "--overwrite"]) == 0
    images, settings = _npz(str(d) + ".npz")
    assert settings["cfg_scale"] == 4.0 and np.array_equal(images, img4)
    assert not os.path.exists(str(d) + ".overwrite") and not os.path.exists(str(d) + ".replaced")
    assert sorted(os.listdir(d)) == [f"{i:06d}.png" for i in range(6)] + ["samples.json"]

    # a folder of unknown origin (files, no samples.json) is not sampled into
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "000000.png").write_bytes(b"not mine")
    assert ddp_main(["--ckpt", str(a), *common, "--sample_dir", str(stray)]) == 2
    assert "no samples.json" in capsys.readouterr().err and os.listdir(stray) == ["000000.png"]


def test_every_checkpoint_spelling_finds_the_runs_config(tmp_path):
    """A latent-space run with a local VAE and named classes: each way of naming its weights gets the run's VAE, class
    names and image size (a trailing slash or model/model.safetensors used to lose them)."""
    import json

    from opendit.checkpoint import save_checkpoint
    from opendit.config.sample import CheckpointSettings
    from opendit.parallelize import ModelOptions
    from opendit.sampling import load_for_sampling

    vae = _tiny_vae_dir(tmp_path / "vae")  # 2x downsampling, 4 latent channels
    model = published_style_model(6)
    run = tmp_path / "out" / "000-DiT-N-2"
    run.mkdir(parents=True)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    (run / "config.json").write_text(json.dumps({
        "model": "DiT-N/2", "dataset": "imagefolder", "image_size": 16, "global_batch": 4, "vae": vae,
        "vae_resolved": vae, "input_size": 8, "in_channels": 4, "num_classes": 10, "class_names": names}))
    sd = model.state_dict()
    c, _ = save_checkpoint(str(run), "epoch0-global_step4", model_state=sd, ema_state=sd, optimizer_state={},
                           running_states={"epoch": 0, "epoch_offset": 4, "global_step": 4})
    torch.save(sd, run / "export.pt")
    save_file(sd, str(os.path.join(c, "export.safetensors")))
    spellings = [str(run), str(run) + "/", c, c + "/", os.path.join(c, "model"), os.path.join(c, "model") + "/",
                 os.path.join(c, "model", "model.safetensors"), os.path.join(c, "ema.pt"), str(run / "export.pt"),
                 os.path.join(c, "export.safetensors")]
    for spelling in spellings:
        loaded = load_for_sampling(CheckpointSettings(ckpt=spelling), ModelOptions(), "cpu")
        assert loaded.codec is not None and loaded.codec.name == vae, spelling
        assert loaded.class_names == names and loaded.image_size == 16, spelling
    # the same weights outside any run: no config to find
    outside = tmp_path / "elsewhere.pt"
    torch.save(sd, outside)
    assert load_weights(str(outside))[2] is None


def test_scores_piped_into_head_print_no_traceback(tmp_path):
    """`make demo` pipes score_digits.py into `head -n 1`: the closed pipe is the reader's choice, not an error."""
    import subprocess
    import sys

    from opendit.eval.digits import real_digits

    imgs, labels = real_digits()
    npz = tmp_path / "real.npz"
    np.savez(npz, arr_0=np.round(imgs[:100] * 255 / 16).astype(np.uint8)[..., None], arr_1=labels[:100])
    # `| head -n 1` closes the pipe after the first line (a race: the traceback came about half the time);
    # `| true` closes it before anything is written (always)
    for program, reader in ((["scripts/dit/score_digits.py", str(npz)], "head -n 1"),
                            (["scripts/dit/score_digits.py", str(npz)], "true"),
                            (["-m", "opendit.cli", "eval", str(npz), "digits", "--features", "digits"], "true")):
        cmd = " ".join([sys.executable, *program]) + " | " + reader
        r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
        if reader != "true":
            assert len(r.stdout.splitlines()) == 1 and r.stdout.startswith(str(npz))
