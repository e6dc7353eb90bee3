"""extract_features.py + --dataset latents, with a tiny randomly initialised diffusers AutoencoderKL (no download).

The reference is the VAE itself: stored posteriors must equal a direct encode of each image and its flip, and training
on fp32 latents must give the losses of training on the images with the same VAE in the loop (same seed: the same
posterior noise, flips and timesteps)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, only_run_dir, read_metrics, run, run_train

diffusers = pytest.importorskip("diffusers")
EXTRACT = os.path.join(REPO, "scripts", "dit", "extract_features.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=16,
    )
    vae.save_pretrained(str(root / "vae"))
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        os.makedirs(root / "images" / c)
        for i in range(6):
            size = (20 + 3 * i, 18)  # not square: the ADM crop applies
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    r = run([sys.executable, EXTRACT, "--dataset", "imagefolder", "--data_path", str(root / "images"), "--image_size", "16",
             "--vae", str(root / "vae"), "--features_path", str(root / "feats"), "--dtype", "fp32", "--shard_size", "5",
             "--batch_size", "3", "--num_workers", "0", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def test_stored_posteriors_equal_a_direct_encode(setup):
    from opendit.data import ImageFolder
    from opendit.data.latents import LatentDataset
    from opendit.vae import load_vae

    index = json.load(open(setup / "feats" / "index.json"))
    assert [s["count"] for s in index["shards"]] == [5, 5, 2] and index["latent_shape"] == [4, 8, 8]
    data = LatentDataset(str(setup / "feats"))
    images = ImageFolder(str(setup / "images"), 16)
    assert len(data) == 12 and data.labels.tolist() == images.labels.tolist() and data.class_names == ["cat", "dog"]
    codec = load_vae(str(setup / "vae"), "cpu")
    x = torch.stack([images[(i, False)][0] for i in range(12)])
    for flip in (False, True):
        mean, std = codec.posterior(x.flip(-1) if flip else x)
        got, labels = data.batch(torch.arange(12), torch.full((12,), flip))
        torch.testing.assert_close(got[:, :4], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[:, 4:], std, rtol=1e-5, atol=1e-6)
    assert data.scale == pytest.approx(codec.scale)


def test_training_on_latents_matches_training_with_the_vae_in_the_loop(setup, tmp_path):
    common = ["--model", "DiT-N/2", "--mixed_precision", "fp32", "--device", "cpu", "--batch_size", "4",
              "--max_steps", "6", "--log_every", "1", "--num_workers", "0"]
    r = run_train("--dataset", "latents", "--data_path", str(setup / "feats"), *common, "--final_samples", "1",
                  "--outputs", str(tmp_path / "lat"))
    assert r.returncode == 0, r.stderr[-3000:]
    r2 = run_train("--dataset", "imagefolder", "--data_path", str(setup / "images"), "--image_size", "16",
                   "--vae", str(setup / "vae"), *common, "--outputs", str(tmp_path / "img"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    lat, img = read_metrics(only_run_dir(tmp_path / "lat")), read_metrics(only_run_dir(tmp_path / "img"))
    assert sorted(lat) == list(range(1, 7))  # two epochs: flips and posterior noise are redrawn
    for s in lat:
        # the same fp32 posteriors and noise: measured equal to the last bit here; 1e-6 leaves room for other BLAS builds
        assert lat[s]["loss"] == pytest.approx(img[s]["loss"], rel=1e-6), s
    cfg = json.load(open(os.path.join(only_run_dir(tmp_path / "lat"), "config.json")))
    assert (cfg["in_channels"], cfg["input_size"], cfg["image_size"]) == (4, 8, 16)
    assert os.path.exists(os.path.join(only_run_dir(tmp_path / "lat"), "samples.png"))  # decoded by the index's VAE


def test_extraction_resumes_and_errors(setup, tmp_path):
    import shutil

    feats = tmp_path / "feats"
    shutil.copytree(setup / "feats", feats)
    os.remove(feats / "shard-000001.mean.npy")  # an interrupted extraction
    before = {f: os.path.getmtime(feats / f) for f in os.listdir(feats) if f.startswith("shard-000000")}
    r = run([sys.executable, EXTRACT, "--dataset", "imagefolder", "--data_path", str(setup / "images"), "--image_size", "16",
             "--vae", str(setup / "vae"), "--features_path", str(feats), "--dtype", "fp32", "--shard_size", "5",
             "--batch_size", "3", "--num_workers", "0", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert {f: os.path.getmtime(feats / f) for f in before} == before  # finished shards are kept
    a = np.load(feats / "shard-000001.mean.npy")
    np.testing.assert_array_equal(a, np.load(setup / "feats" / "shard-000001.mean.npy"))
    r = run_train("--dataset", "latents", "--data_path", str(tmp_path / "none"), "--model", "DiT-N/2", "--device", "cpu",
                  "--outputs", str(tmp_path / "o"))
    assert r.returncode == 2 and "extract_features.py" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a VAE other than the extraction's is refused, not ignored
    r = run_train("--dataset", "latents", "--data_path", str(setup / "feats"), "--vae", "mse", "--model", "DiT-N/2",
                  "--device", "cpu", "--outputs", str(tmp_path / "o"))
    assert r.returncode == 2 and "were extracted with" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- REPA features stored with the latents

REPA = ["--repa_encoder", "reference_repa:factory", "--repa_depth", "2", "--repa_projector_dim", "32"]


@pytest.fixture(scope="module")
def repa_feats(setup):
    r = run([sys.executable, EXTRACT, "--dataset", "imagefolder", "--data_path", str(setup / "images"), "--image_size", "16",
             "--vae", str(setup / "vae"), "--features_path", str(setup / "feats_repa"), "--dtype", "fp32",
             "--shard_size", "5", "--batch_size", "3", "--num_workers", "0", "--device", "cpu",
             "--repa_encoder", "reference_repa:factory"])
    assert r.returncode == 0, r.stderr[-3000:]
    return setup / "feats_repa"


def test_stored_encoder_features_equal_a_direct_encode(setup, repa_feats):
    from reference_repa import factory

    from opendit.data import ImageFolder
    from opendit.data.latents import LatentDataset

    data = LatentDataset(str(repa_feats))
    assert data.encoder_names == ["reference_repa:factory"] and data.encoder_dims == [8]
    images = ImageFolder(str(setup / "images"), 16)
    x = torch.stack([images[(i, False)][0] for i in range(12)])
    enc = factory()
    for flip in (False, True):
        flips = torch.tensor([flip, not flip] * 6)
        got = data.batch_features(torch.arange(12), flips)[0]
        want = torch.stack([enc(xi.flip(-1)[None] if f else xi[None])[0] for xi, f in zip(x, flips.tolist())])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_repa_on_stored_features_matches_the_encoder_in_the_loop(setup, repa_feats, tmp_path):
    common = ["--model", "DiT-N/2", "--mixed_precision", "fp32", "--device", "cpu", "--batch_size", "4",
              "--max_steps", "6", "--log_every", "1", "--num_workers", "0", *REPA]
    r = run_train("--dataset", "latents", "--data_path", str(repa_feats), *common, "--outputs", str(tmp_path / "lat"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "precomputed with the latents" in open(os.path.join(only_run_dir(tmp_path / "lat"), "log.txt")).read()
    r2 = run_train("--dataset", "imagefolder", "--data_path", str(setup / "images"), "--image_size", "16",
                   "--vae", str(setup / "vae"), *common, "--outputs", str(tmp_path / "img"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    lat, img = read_metrics(only_run_dir(tmp_path / "lat")), read_metrics(only_run_dir(tmp_path / "img"))
    assert sorted(lat) == list(range(1, 7))  # two epochs: both flips of the stored features are used
    for s in lat:  # fp32 features stored, the same posteriors and draws: equal as in the test above, up to the
        # encoder's rounding (extraction and training run its convolution on batches of 3 and 4); the alignment loss is
        # a mean of cosines in [-1, 1] (here near 0), so its tolerance is absolute: 1e-6, ~10 fp32 ulps of a cosine
        assert lat[s]["loss"] == pytest.approx(img[s]["loss"], rel=1e-6), s
        assert lat[s]["repa_loss"] == pytest.approx(img[s]["repa_loss"], abs=1e-6), s
    # latents without the encoder's features: one line
    bad = run_train("--dataset", "latents", "--data_path", str(setup / "feats"), *common, "--outputs", str(tmp_path / "x"))
    assert bad.returncode == 2 and "hold features of no encoder" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- other channel counts, latent_norm

@pytest.fixture(scope="module")
def wide(setup):
    """A 6-channel VAE (LightningDiT's VA-VAE has 32) and its latents."""
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=6, layers_per_block=1, norm_num_groups=8, sample_size=16,
    )
    vae.save_pretrained(str(setup / "vae6"))
    r = run([sys.executable, EXTRACT, "--dataset", "imagefolder", "--data_path", str(setup / "images"), "--image_size", "16",
             "--vae", str(setup / "vae6"), "--features_path", str(setup / "feats6"), "--dtype", "fp32", "--shard_size", "5",
             "--batch_size", "3", "--num_workers", "0", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    return setup / "feats6"


def test_latent_statistics_are_the_moments_of_the_posterior_samples(wide):
    from opendit.data.latents import LatentDataset

    data = LatentDataset(str(wide))
    assert data.latent_channels == 6
    m, s = data.batch(torch.arange(12), torch.zeros(12, dtype=torch.bool))[0].double().split(6, dim=1)
    # the latents z = m + s * eps over images, positions and eps ~ N(0, 1): E z = E m, Var z = Var m + E s^2
    mean = m.mean(dim=(0, 2, 3))
    var = m.var(dim=(0, 2, 3), unbiased=False) + (s * s).mean(dim=(0, 2, 3))
    np.testing.assert_allclose(data.stats["mean"], mean.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(data.stats["std"], var.sqrt().numpy(), rtol=1e-9)
    # and a Monte Carlo draw of the latents agrees (to its sampling error, 64 draws x 768 values per channel)
    g = torch.Generator().manual_seed(0)
    z = torch.cat([m + s * torch.randn(m.shape, generator=g, dtype=torch.float64) for _ in range(64)])
    np.testing.assert_allclose(z.std(dim=(0, 2, 3)).numpy(), data.stats["std"], rtol=0.02)


def test_latent_norm_trains_samples_and_records_its_statistics(setup, wide, tmp_path):
    from opendit.data.latents import LatentDataset, PrecomputedLatents
    from opendit.vae import LatentNorm, NormalizedCodec

    data = LatentDataset(str(wide))
    codec = NormalizedCodec(PrecomputedLatents(data, "cpu"), LatentNorm.from_record(dict(data.stats, multiplier=0.5), "t"))
    x, _ = data.batch(torch.arange(12), torch.zeros(12, dtype=torch.bool))
    eps = torch.randn(12, 6, 8, 8)
    z = x[:, :6] + x[:, 6:] * eps
    want = (z - torch.tensor(data.stats["mean"]).view(1, 6, 1, 1).float()) / torch.tensor(data.stats["std"]).view(
        1, 6, 1, 1).float() * 0.5
    torch.testing.assert_close(codec.encode(x, eps), want, rtol=1e-5, atol=1e-5)
    assert codec.norm._shape(want)[0] is codec.norm._shape(want)[0]  # moved to the device once, not every step
    r = run_train("--dataset", "latents", "--data_path", str(wide), "--model", "DiT-N/2", "--mixed_precision", "fp32",
                  "--device", "cpu", "--batch_size", "4", "--max_steps", "2", "--num_workers", "0", "--latent_norm",
                  "--latent_multiplier", "0.5", "--final_samples", "1", "--outputs", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "o")
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    f32 = {k: [float(np.float32(v)) for v in data.stats[k]] for k in ("mean", "std")}  # applied in fp32
    assert cfg["in_channels"] == 6 and cfg["latent_stats"] == dict(f32, multiplier=0.5)
    assert os.path.exists(os.path.join(run_dir, "samples.png"))  # denormalized, decoded by the 6-channel VAE
    # sampling decodes through the run's statistics; --latent_stats (LightningDiT's latents_stats.pt) replaces them
    from opendit.cli.flags import parse_argv
    from opendit.config import GridConfig
    from opendit.parallelize import ModelOptions
    from opendit.sampling.load import load_for_sampling

    def load(argv):
        return load_for_sampling(parse_argv(GridConfig, argv).checkpoint, ModelOptions(), torch.device("cpu"))

    loaded = load(["--ckpt", run_dir, "--device", "cpu"])
    assert loaded.space.latent_norm.record() == cfg["latent_stats"]
    torch.save({"mean": torch.arange(6.0).view(1, 6, 1, 1), "std": torch.ones(1, 6, 1, 1) * 2}, tmp_path / "stats.pt")
    assert load(["--ckpt", run_dir, "--device", "cpu", "--latent_stats", str(tmp_path / "stats.pt")]).space.latent_norm.record() == {
        "mean": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "std": [2.0] * 6, "multiplier": 0.5}
    r = run([sys.executable, os.path.join(REPO, "scripts", "dit", "sample_dit.py"), "--ckpt", run_dir, "--labels", "0",
             "--num_sampling_steps", "3", "--device", "cpu", "--out", str(tmp_path / "g.png")])
    assert r.returncode == 0 and os.path.isfile(tmp_path / "g.png"), r.stderr[-2000:]
    # a bare 6-channel state dict has no VAE to decode with: one line that says what to pass
    ckpt = [d for d in os.listdir(run_dir) if d.startswith("epoch")][-1]
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(os.path.join(run_dir, ckpt, "ema.pt"), weights_only=True), bare)
    r = run([sys.executable, os.path.join(REPO, "scripts", "dit", "sample_dit.py"), "--ckpt", str(bare), "--device",
             "cpu", "--num_sampling_steps", "3"])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "6-channel inputs" in lines[0] and "--vae PATH" in lines[0]
    r = run([sys.executable, os.path.join(REPO, "scripts", "dit", "sample_ddp.py"), "--ckpt", str(bare), "--vae", "none",
             "--device", "cpu", "--num_samples", "2", "--sample_dir", str(tmp_path / "s")])  # no image has 6 channels
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "6-channel inputs" in lines[0], r.stderr[-2000:]


def test_latent_norm_errors_are_one_line(setup, wide, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(wide, old)
    index = json.load(open(old / "index.json"))
    del index["latent_stats"]  # an extraction from before the statistics were stored
    json.dump(index, open(old / "index.json", "w"))
    r = run_train("--dataset", "latents", "--data_path", str(old), "--model", "DiT-N/2", "--device", "cpu",
                  "--latent_norm", "--outputs", str(tmp_path / "o"))
    assert r.returncode == 2 and "no latent statistics" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    from opendit.data.latents import LatentDataset, PrecomputedLatents
    from opendit.errors import UserError
    from opendit.vae import NormalizedCodec, load_latent_stats

    torch.save({"mean": torch.zeros(1, 4, 1, 1), "std": torch.ones(1, 4, 1, 1)}, tmp_path / "s4.pt")
    with pytest.raises(UserError, match="have 4 channels, the latents 6"):
        NormalizedCodec(PrecomputedLatents(LatentDataset(str(wide)), "cpu"), load_latent_stats(str(tmp_path / "s4.pt")))
    with pytest.raises(UserError, match="expected a latents folder or a torch file"):
        load_latent_stats(str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="std > 0"):
        torch.save({"mean": torch.zeros(4), "std": torch.zeros(4)}, tmp_path / "z.pt")
        load_latent_stats(str(tmp_path / "z.pt"))
    assert not (tmp_path / "o").exists()
