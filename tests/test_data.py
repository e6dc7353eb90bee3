import functools
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import only_run_dir, run_train
from opendit.data import GlobalBatchPlan, ImageFolder, load_cifar10, load_digits_dataset, plan_batches
from opendit.data import datasets as ds
from opendit.data.transforms import adm_center_crop
from opendit.errors import UserError


# ----------------------------------------------------------------------------- CIFAR-10 fixture

def write_cifar(root, per_batch=4, seed=0):
    """A small CIFAR-10 in the real python-pickle layout: data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{i}.png".encode() for i in range(per_batch)]}
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
        batches[name] = batch
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f, protocol=2)
    return batches


def test_cifar10_loader_reads_the_real_format(tmp_path):
    batches = write_cifar(tmp_path)
    train = load_cifar10(str(tmp_path))
    assert len(train) == 20 and train.num_classes == 10 and train.channels == 3
    assert train.class_names[0] == "airplane" and train.class_names[9] == "truck"
    row = batches["data_batch_2"][b"data"][1]  # the 6th training image
    x, y = train.batch(torch.tensor([5]), torch.tensor([False]))
    assert x.shape == (1, 3, 32, 32)
    # the row is 1024 red, 1024 green, 1024 blue values, each 32x32 row-major
    expected = torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32)) / 127.5 - 1
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-6)
    assert y.item() == batches["data_batch_2"][b"labels"][1]
    xf, _ = train.batch(torch.tensor([5]), torch.tensor([True]))
    torch.testing.assert_close(xf[0], expected.flip(-1), rtol=0, atol=1e-6)
    test = load_cifar10(str(tmp_path), train=False)
    assert len(test) == 4 and not test.flip
    big = load_cifar10(str(tmp_path), image_size=64)
    assert big.batch(torch.tensor([0, 1]), torch.tensor([False, False]))[0].shape == (2, 3, 64, 64)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_file_carrying_code_is_refused(tmp_path):
    write_cifar(tmp_path)
    with open(os.path.join(tmp_path, "cifar-10-batches-py", "data_batch_3"), "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(UserError, match="refusing to load posix.system|refusing to load os.system|refusing"):
        load_cifar10(str(tmp_path))


def test_cifar10_download_verifies_and_extracts(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_cifar(src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive = buf.getvalue()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "cifar-10-python.tar.gz").write_bytes(archive)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("OPENDIT_OFFLINE", raising=False)
        monkeypatch.setattr(ds, "CIFAR10_URL", f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz")
        # a wrong checksum is refused and leaves nothing behind
        monkeypatch.setattr(ds, "CIFAR10_MD5", "0" * 32)
        with pytest.raises(UserError, match="MD5"):
            load_cifar10(str(tmp_path / "data1"))
        assert not os.path.exists(tmp_path / "data1")  # not even the (empty) folder the download created
        monkeypatch.setattr(ds, "CIFAR10_MD5", hashlib.md5(archive).hexdigest())
        data = load_cifar10(str(tmp_path / "data2"))
        assert len(data) == 20
    finally:
        server.shutdown()
    # offline: a clear error that says where to put the files
    monkeypatch.setenv("OPENDIT_OFFLINE", "1")
    with pytest.raises(UserError, match="extract it into"):
        load_cifar10(str(tmp_path / "empty"))


def test_training_on_cifar10_fixture_in_pixel_space(tmp_path):
    write_cifar(tmp_path / "data", per_batch=8)
    r = run_train("--dataset", "cifar10", "--data_path", str(tmp_path / "data"), "--image_size", "32", "--model", "DiT-N/8",
                  "--mixed_precision", "fp32", "--device", "cpu", "--batch_size", "8", "--max_steps", "2",
                  "--outputs", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    cfg = json.load(open(os.path.join(only_run_dir(tmp_path / "out"), "config.json")))
    assert cfg["vae_resolved"] is None and cfg["in_channels"] == 3 and cfg["class_names"][3] == "cat"


# ----------------------------------------------------------------------------- image folders

def make_folder(root):
    """Three classes of awkward images: odd sizes, grayscale, RGBA, palette, a nested folder."""
    rng = np.random.default_rng(0)
    specs = {
        "cat": [("a.png", "RGB", (37, 23)), ("b.jpg", "L", (50, 64)), ("sub/c.png", "RGBA", (19, 31))],
        "dog": [("d.png", "P", (40, 40)), ("e.bmp", "RGB", (129, 70))],
        "eel": [("f.webp", "RGB", (16, 16)), ("notes.txt", None, None)],
    }
    for cls, files in specs.items():
        for name, mode, size in files:
            path = os.path.join(root, cls, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if mode is None:
                open(path, "w").write("not an image")
                continue
            arr = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
            Image.fromarray(arr, "RGBA").convert(mode).save(path)


def test_imagefolder_reads_odd_grayscale_rgba_palette(tmp_path):
    make_folder(tmp_path)
    data = ImageFolder(str(tmp_path), image_size=16)
    assert data.class_names == ["cat", "dog", "eel"] and data.num_classes == 3
    assert len(data) == 6  # notes.txt is not an image
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 2]
    for i in range(len(data)):
        x, y, problems = data[(i, False)]
        assert problems == "" and y == data.labels[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        xf, _, _ = data[(i, True)]
        torch.testing.assert_close(xf, x.flip(-1))
    gray, _, _ = data[(1, False)]  # a grayscale image becomes three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_adm_center_crop_geometry():
    # 200x100, left half black, right half white, target 32: box-halve to 100x50 (50 >= 64? no: stop at 100x50),
    # bicubic to 64x32, crop the central 32 columns: columns 16..47 -> left half dark, right half bright
    arr = np.zeros((100, 200), dtype=np.uint8)
    arr[:, 100:] = 255
    out = np.asarray(adm_center_crop(Image.fromarray(arr).convert("RGB"), 32))
    assert out.shape == (32, 32, 3)
    assert out[:, :14].max() < 10 and out[:, 18:].min() > 245
    # downsampling by 2 with a box filter while the short side is >= 2x the target
    big = Image.fromarray(np.full((300, 500, 3), 128, dtype=np.uint8))
    assert adm_center_crop(big, 64).size == (64, 64)


def test_imagefolder_training_run(tmp_path):
    make_folder(tmp_path / "imgs")
    r = run_train("--dataset", "imagefolder", "--data_path", str(tmp_path / "imgs"), "--image_size", "16", "--model",
                  "DiT-N/4", "--mixed_precision", "fp32", "--device", "cpu", "--batch_size", "3", "--max_steps", "2",
                  "--num_workers", "1", "--outputs", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]


def test_digits():
    from sklearn.datasets import load_digits

    d = load_digits_dataset()
    ref = load_digits()
    assert len(d) == 1797 and d.num_classes == 10 and d.channels == 1 and not d.flip
    x, y = d.batch(torch.arange(1797), torch.zeros(1797, dtype=torch.bool))
    assert x.shape == (1797, 1, 8, 8)
    np.testing.assert_allclose(x[:, 0].numpy(), ref.images / 8.0 - 1.0, atol=1e-6)
    assert y.tolist() == ref.target.tolist()
    assert x.min() == -1 and x.max() == 1


# ----------------------------------------------------------------------------- the batch plan

def test_plan_shards_global_batches_across_ranks():
    n, gb = 103, 12
    one = GlobalBatchPlan(n, gb, seed=3, flip=True)
    ranks = [GlobalBatchPlan(n, gb, rank=r, world_size=3, seed=3, flip=True) for r in range(3)]
    assert one.steps_per_epoch == 8
    for epoch in (0, 1):
        full = list(one.epoch_batches(epoch))
        parts = [list(p.epoch_batches(epoch)) for p in ranks]
        assert len(full) == 8 and all(len(p) == 8 for p in parts)
        for step in range(8):
            idx = torch.cat([parts[r][step][0] for r in range(3)])
            flips = torch.cat([parts[r][step][1] for r in range(3)])
            assert torch.equal(idx, full[step][0]) and torch.equal(flips, full[step][1])
        seen = torch.cat([b[0] for b in full])
        assert len(set(seen.tolist())) == 96  # no repeats within an epoch
    assert not torch.equal(one.order(0)[0], one.order(1)[0])  # reshuffled every epoch
    # resuming at a sample offset continues the same epoch
    rest = list(one.epoch_batches(0, offset=5 * gb))
    assert [torch.equal(a[0], b[0]) for a, b in zip(rest, list(one.epoch_batches(0))[5:])] == [True] * 3


def test_plan_batches_in_memory(tmp_path):
    d = load_digits_dataset()
    plan = GlobalBatchPlan(len(d), 100, seed=0)
    batches = list(plan_batches(d, plan, epoch=0, offset=1700))
    assert len(batches) == 0  # 97 left: not a full global batch
    batches = list(plan_batches(d, plan, epoch=0, offset=1600))
    assert len(batches) == 1 and batches[0][0].shape == (100, 1, 8, 8)
