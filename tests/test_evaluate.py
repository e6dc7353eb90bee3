"""opendit eval: FID / IS against direct formulas, the TF1 resize against a naive loop, the Inception network's layout,
and the command line end to end with the digits classifier as the feature extractor."""

import io
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from opendit.cli import evaluate
from opendit.eval import scores
from opendit.errors import UserError
from opendit.eval.inception import FIDInceptionV3, load_fid_inception, resize_bilinear_tf1


def direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook computation with scipy's matrix square root (independent of torchmetrics)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def features():
    g = np.random.default_rng(0)
    mix = g.normal(size=(16, 16)) / 4
    return g.normal(size=(600, 16)) @ mix + g.normal(size=16)  # correlated, non-centred


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(features):
    f = torch.from_numpy(features)
    assert abs(scores.fid_from(f, f)) < 1e-6
    g = np.random.default_rng(1)
    fids = [scores.fid_from(torch.from_numpy(features + s * g.normal(size=features.shape)), f) for s in (0.05, 0.2, 0.5, 1)]
    assert all(x < y for x, y in zip(fids, fids[1:])), fids
    assert fids[0] > 1e-3


def test_fid_matches_a_direct_scipy_computation_and_precomputed_statistics(features):
    g = np.random.default_rng(2)
    other = features[:300] * 1.3 + 0.2 + 0.3 * g.normal(size=(300, 16))
    want = direct_fid(other, features)
    got = scores.fid_from(torch.from_numpy(other), torch.from_numpy(features))
    assert got == pytest.approx(want, rel=1e-7)
    stats = {"mu": features.mean(0), "sigma": np.cov(features, rowvar=False), "n": len(features)}
    assert scores.fid_from(torch.from_numpy(other), reference_stats=stats) == pytest.approx(want, rel=1e-7)
    assert scores.fid_from(torch.from_numpy(other), reference_stats=dict(stats, n=None)) == pytest.approx(want, rel=1e-7)


def test_inception_score_matches_its_formula():
    g = np.random.default_rng(3)
    logits = g.normal(size=(400, 10)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    py = p.mean(0)
    want = np.exp((p * (np.log(p) - np.log(py))).sum(1).mean())  # exp E_x KL(p(y|x) || p(y))
    mean, std = scores.inception_score(torch.from_numpy(logits), splits=1)
    assert mean == pytest.approx(want, rel=1e-9) and std == 0
    # one-hot-like predictions spread evenly over K classes: IS -> K; identical predictions: IS -> 1
    sharp = np.repeat(np.eye(10) * 50, 20, axis=0)
    assert scores.inception_score(torch.from_numpy(sharp), splits=1)[0] == pytest.approx(10, rel=1e-6)
    assert scores.inception_score(torch.from_numpy(np.tile(sharp[:1], (200, 1))), splits=1)[0] == pytest.approx(1, rel=1e-6)
    m10, s10 = scores.inception_score(torch.from_numpy(logits), splits=10)
    assert m10 < mean and s10 > 0  # smaller splits estimate p(y) from fewer samples


def test_precision_recall_matches_brute_force():
    g = np.random.default_rng(4)
    real = g.normal(size=(120, 5))
    fake = g.normal(size=(90, 5)) * 0.6 + 0.8  # narrower and shifted: precision and recall differ
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
    d_fr = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    r_real = np.sort(d_rr, axis=1)[:, 3]  # the 3rd neighbour (index 0 is the point itself)
    r_fake = np.sort(d_ff, axis=1)[:, 3]
    want_p = np.mean([(d_fr[i] <= r_real).any() for i in range(len(fake))])
    want_r = np.mean([(d_fr[:, j] <= r_fake).any() for j in range(len(real))])
    got = scores.precision_recall(torch.from_numpy(fake), torch.from_numpy(real), k=3, chunk=17)
    assert got == (pytest.approx(want_p), pytest.approx(want_r))
    assert want_r < 0.5 < want_p  # a narrow sample set: precise, poor recall
    assert scores.precision_recall(torch.from_numpy(real), torch.from_numpy(real)) == (1.0, 1.0)


# ----------------------------------------------------------------------------- the Inception network

def naive_tf1_resize(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape
    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            y, x = i * h / size, j * w / size
            y0, x0 = min(int(np.floor(y)), h - 1), min(int(np.floor(x)), w - 1)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = (img[y0, x0] * (1 - dy) * (1 - dx) + img[y0, x1] * (1 - dy) * dx
                         + img[y1, x0] * dy * (1 - dx) + img[y1, x1] * dy * dx)
    return out


@pytest.mark.parametrize("src,dst", [(8, 13), (13, 8), (10, 10), (7, 29)])
def test_tf1_bilinear_resize_matches_a_naive_loop(src, dst):
    img = np.random.default_rng(src * dst).uniform(0, 255, size=(src, src))
    got = resize_bilinear_tf1(torch.from_numpy(img)[None, None], dst)[0, 0].numpy()
    np.testing.assert_allclose(got, naive_tf1_resize(img, dst), rtol=1e-12, atol=1e-9)


def test_fid_inception_layout_and_weight_loading(tmp_path):
    net = FIDInceptionV3()
    sd = net.state_dict()
    # the layer names and shapes of the published weight file (facts of the TF graph's PyTorch port)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_6b.branch7x7dbl_5.conv.weight"].shape == (192, 128, 1, 7)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert sd["fc.weight"].shape == (1008, 2048)
    # torchvision's Inception-v3 without the auxiliary head has 23,834,568 parameters at 1000 classes
    n = sum(p.numel() for p in net.parameters())
    assert n - 8 * 2048 - 8 == 23_834_568
    torch.manual_seed(0)
    for m in net.modules():  # non-trivial BN statistics so that loading them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "pt_inception.pth"
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    loaded = load_fid_inception(str(path))
    x = torch.randint(0, 256, (2, 3, 40, 52), dtype=torch.uint8)
    with torch.no_grad():
        f1, l1 = net.eval()(x)
        f2, l2 = loaded(x)
    assert f1.shape == (2, 2048) and l1.shape == (2, 1008)
    torch.testing.assert_close(f2, f1)
    torch.testing.assert_close(l1, f1 @ net.fc.weight.t())  # logits without the fc bias
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="not the FID Inception network"):
        load_fid_inception(str(tmp_path / "wrong.pth"))


def test_missing_inception_weights_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENDIT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="pass --inception PATH"):
        load_fid_inception(None)


# ----------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def digit_sets(tmp_path_factory):
    from opendit.eval.digits import real_digits

    root = tmp_path_factory.mktemp("digits")
    images, labels = real_digits()
    u8 = np.round(images * 255 / 16).astype(np.uint8)[..., None]
    np.savez(root / "real.npz", arr_0=u8, arr_1=labels)
    noisy = np.clip(u8.astype(np.int16) + np.random.default_rng(0).integers(-60, 61, u8.shape), 0, 255).astype(np.uint8)
    np.savez(root / "noisy.npz", arr_0=noisy, arr_1=labels)
    folder = root / "folder"
    folder.mkdir()
    for i in range(200):
        Image.fromarray(u8[i, ..., 0]).save(folder / f"{i:04d}.png")
    np.savez(root / "first200.npz", arr_0=u8[:200])
    np.savez(root / "stats.npz", mu=np.zeros(128), sigma=np.eye(128))
    return root


def last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith(("KID", "IS", "precision"))  # the table, then the JSON line
    return json.loads(out[-1])


def test_eval_cli_with_digits_features(digit_sets, capsys, tmp_path):
    assert evaluate.main([str(digit_sets / "real.npz"), "digits", "--features", "digits", "--kid"]) == 0
    same = last_json(capsys)
    assert abs(same["fid"]) < 1e-6 and same["num_samples"] == 1797
    assert 8.5 < same["is"] <= 10  # the classifier is sure and the classes are balanced
    assert evaluate.main([str(digit_sets / "noisy.npz"), "digits", "--features", "digits", "--kid", "--precision_recall",
                          "--save_stats", str(tmp_path / "stats.npz")]) == 0
    noisy = last_json(capsys)
    assert noisy["fid"] > 1 and noisy["is"] < same["is"]
    # KID on the same set is slightly negative (random subsets of 1000 of 1797 share samples across the two sides)
    assert noisy["kid"] > 5 * noisy["kid_std"] and noisy["kid"] > same["kid"]
    assert 0 <= noisy["precision"] < 1 and 0 <= noisy["recall"] <= 1
    # the saved statistics as the reference give the same FID
    assert evaluate.main([str(digit_sets / "noisy.npz"), str(tmp_path / "stats.npz"), "--features", "digits"]) == 0
    assert last_json(capsys)["fid"] == pytest.approx(noisy["fid"], rel=1e-9)
    # a folder of PNGs reads like the .npz of the same images
    assert evaluate.main([str(digit_sets / "folder"), "digits", "--features", "digits", "--splits", "2"]) == 0
    folder = last_json(capsys)
    assert evaluate.main([str(digit_sets / "first200.npz"), "digits", "--features", "digits", "--splits", "2"]) == 0
    assert last_json(capsys)["fid"] == pytest.approx(folder["fid"], rel=1e-9)


class ToyExtractor:
    """A plug-in extractor: mean intensity per row as features, no logits."""

    num_features = 8
    name = "toy"

    def __call__(self, images):
        return images.float().mean(dim=(1, 3)), None


def toy_extractor():
    return ToyExtractor()


def test_eval_cli_with_a_plugged_in_extractor(digit_sets, capsys):
    assert evaluate.main([str(digit_sets / "noisy.npz"), str(digit_sets / "real.npz"),
                          "--features", "test_evaluate:toy_extractor"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    m = json.loads(out[-1])
    assert "is" not in m and m["features"] == "toy"
    real = np.load(digit_sets / "real.npz")["arr_0"].astype(np.float64)[..., 0].mean(2)
    noisy = np.load(digit_sets / "noisy.npz")["arr_0"].astype(np.float64)[..., 0].mean(2)
    assert m["fid"] == pytest.approx(direct_fid(noisy, real), rel=1e-6)


@pytest.mark.parametrize("args,expected", [
    (["{d}/none.npz", "digits"], "no such file"),
    (["{d}/real.npz", "{d}/real.npz", "--features", "nope"], "unknown --features"),
    (["{d}/real.npz", "{d}/real.npz", "--inception", "{d}/missing.pth"], "no such file"),
    (["{d}/real.npz", "{d}/folder", "--features", "digits", "--batch_size", "0"], "must be an integer >= 1"),
    (["{d}/real.npz", "{d}/stats.npz", "--features", "digits", "--save_stats", "{d}/x.npz"], "holds statistics already"),
])
def test_eval_errors_are_one_line(digit_sets, capsys, args, expected):
    try:
        rc = evaluate.main([a.format(d=digit_sets) for a in args])
    except SystemExit as e:  # a flag rejected by the parser
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_fid_during_training_matches_opendit_eval_of_the_same_samples(tmp_path, capsys):
    from helpers import TINY, only_run_dir, read_metrics, run_train

    r = run_train(*TINY, "--batch_size", "64", "--max_steps", "10", "--log_every", "5", "--eval_every", "5",
                  "--eval_samples", "120", "--outputs", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    m = read_metrics(run_dir)
    assert "fid" in m[5] and "fid" in m[10] and "loss" in m[10]
    samples = os.path.join(run_dir, "eval", "step0000010.npz")
    with np.load(samples) as d:
        assert d["arr_0"].shape == (120, 8, 8, 1) and (d["arr_1"] == np.arange(120) % 10).all()
    # the logged number is opendit eval's on the kept samples, against all real digits (the training set)
    assert evaluate.main([samples, "digits", "--features", "digits"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fid"] == pytest.approx(m[10]["fid"], rel=1e-6)
    # the grid of each evaluation: eval/stepS.png, the first 8 samples of each class from the .npz, one row per class,
    # and the same image in TensorBoard
    from opendit.images import labelled_grid

    with np.load(samples) as d:
        first = np.concatenate([d["arr_0"][d["arr_1"] == c][:8] for c in range(10)])
    want = np.asarray(labelled_grid(torch.from_numpy(first).permute(0, 3, 1, 2).float() / 127.5 - 1.0,
                                    np.repeat(np.arange(10), 8).tolist(), [str(c) for c in range(10)]))
    png = np.asarray(Image.open(os.path.join(run_dir, "eval", "step0000010.png")).convert("RGB"))
    assert np.array_equal(png, want)
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    events = acc.Images("eval/samples")
    assert [e.step for e in events] == [5, 10]
    shown = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("RGB"))
    assert np.array_equal(shown, want)
