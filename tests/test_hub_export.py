"""`opendit export` and `--ckpt hf://OWNER/NAME`: a digits run exported, placed in a Hub cache the way
huggingface_hub lays one out, loads offline through every program that takes a checkpoint and draws the run's
images; the same fetched from a local Hub server on 127.0.0.1 into an empty cache; the model card; bad input."""

import hashlib
import http.server
import json
import os
import shutil
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import REPO, TINY, only_run_dir, read_metrics, run, run_in_process, run_train
from opendit.checkpoint import list_checkpoints

REVISION = "0123456789abcdef0123456789abcdef01234567"
SAMPLE = os.path.join(REPO, "scripts", "dit", "sample_dit.py")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = run_train(*TINY, "--batch_size", "16", "--max_steps", "3", "--ckpt_every", "3", "--final_samples", "2",
                  "--final_cfg_scale", "1.5", "--outputs", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return only_run_dir(out)


@pytest.fixture(scope="module")
def offline_hub(run_dir, tmp_path_factory):
    """A Hub cache holding the run's export as me/digits (shared by the tests that only read it)."""
    root = tmp_path_factory.mktemp("hubcache")
    assert export(run_dir, root / "export").returncode == 0
    return str(hub_cache(root / "hub", root / "export"))


def export(run_dir, dst, *extra):
    return run_in_process("opendit.cli.export", [str(run_dir), str(dst), "--repo", "me/digits", *extra])


def hub_cache(root, export_dir, repo="me/digits"):
    """huggingface_hub's cache layout: models--OWNER--NAME/{refs/main, snapshots/REVISION/<files>}."""
    base = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(export_dir, base / "snapshots" / REVISION)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(REVISION)
    return root


def test_the_export_holds_the_runs_ema_config_and_card(run_dir, tmp_path):
    r = export(run_dir, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["README.md", "config.json", "model.safetensors", "samples.png"]
    ema = torch.load(os.path.join(list_checkpoints(run_dir)[-1], "ema.pt"), weights_only=True)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == ema.keys() and all(torch.equal(got[k], ema[k]) for k in ema)
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    run_cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert {k: cfg[k] for k in run_cfg} == run_cfg  # every training setting, unchanged
    rec = cfg["opendit_export"]
    assert rec["architecture"]["name"] == "DiT-N/2" and rec["architecture"]["depth"] == 4
    assert rec["objective"]["objective"] == "diffusion" and rec["step"] == 3 and rec["weights"] == "ema"
    assert rec["class_names"] == [str(i) for i in range(10)] and rec["input"]["image_size"] == 8
    card = open(tmp_path / "out" / "README.md").read()
    assert card.startswith("---\nlibrary_name: opendit\n") and "\n---\n" in card  # the Hub's metadata header
    assert "![samples](samples.png)" in card and "--ckpt hf://me/digits" in card and "3 steps" in card


def test_an_exported_run_loads_offline_from_the_hub_cache_in_every_program(run_dir, tmp_path):
    assert export(run_dir, tmp_path / "out").returncode == 0
    env = {"HF_HUB_CACHE": str(hub_cache(tmp_path / "hub", tmp_path / "out")), "HF_HUB_OFFLINE": "1"}
    grid_args = ["--labels", "1,7", "--num_sampling_steps", "5", "--seed", "3", "--device", "cpu"]
    grids = {}
    for name, ckpt in (("run", str(run_dir)), ("hub", "hf://me/digits"), ("rev", f"hf://me/digits@{REVISION}"),
                       ("file", "hf://me/digits/model.safetensors")):
        out = tmp_path / f"{name}.png"
        r = run_in_process("opendit.cli.sample", ["--ckpt", ckpt, *grid_args, "--out", str(out)], env_extra=env)
        assert r.returncode == 0, (name, r.stderr)
        grids[name] = np.asarray(Image.open(out))
    for name in ("hub", "rev", "file"):
        assert np.array_equal(grids[name], grids["run"]), name
    arrays = {}
    for name, ckpt in (("run", str(run_dir)), ("hub", "hf://me/digits")):
        r = run_in_process("opendit.cli.sample_ddp", ["--ckpt", ckpt, "--num_samples", "4", "--per_proc_batch_size",
                                                       "4", "--num_sampling_steps", "5", "--device", "cpu",
                                                       "--sample_dir", str(tmp_path / f"ddp-{name}")], env_extra=env)
        assert r.returncode == 0, (name, r.stderr)
        arrays[name] = np.load(str(tmp_path / f"ddp-{name}") + ".npz")["arr_0"]
    assert np.array_equal(arrays["hub"], arrays["run"])
    # opendit eval: the samples from a data set repository of the cache score as the local file does
    snapshot = tmp_path / "hub" / "datasets--me--samples" / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    shutil.copy(str(tmp_path / "ddp-run") + ".npz", snapshot / "samples.npz")
    (tmp_path / "hub" / "datasets--me--samples" / "refs").mkdir()
    (tmp_path / "hub" / "datasets--me--samples" / "refs" / "main").write_text(REVISION)
    scores = {}
    for name, samples in (("run", str(tmp_path / "ddp-run") + ".npz"), ("hub", "hf://datasets/me/samples/samples.npz")):
        r = run_in_process("opendit.cli.evaluate", [samples, "digits", "--features", "digits", "--splits", "2",
                                                    "--device", "cpu"],
                           env_extra=env)
        assert r.returncode == 0, (name, r.stderr)
        scores[name] = json.loads(r.stdout.strip().splitlines()[-1])
    assert scores["hub"] == scores["run"] and "samples    hf://datasets/me/samples/samples.npz" in r.stdout
    r = run_in_process("opendit.cli.evaluate", ["hf://datasets/me/samples/other.npz", "digits"], env_extra=env)
    assert r.returncode == 2 and "SAMPLES hf://datasets/me/samples/other.npz: is not in the Hub cache" in r.stderr
    # train.py's periodic FID against a reference batch on the Hub: the FID it logs against the local file
    fids = {}
    for name, ref in (("run", str(tmp_path / "ddp-run") + ".npz"), ("hub", "hf://datasets/me/samples/samples.npz")):
        r = run_train(*TINY, "--batch_size", "16", "--max_steps", "1", "--eval_every", "1", "--eval_samples", "8",
                      "--eval_reference", ref, "--outputs", str(tmp_path / f"fid-{name}"), env_extra=env)
        assert r.returncode == 0, (name, r.stderr[-2000:])
        fids[name] = read_metrics(only_run_dir(tmp_path / f"fid-{name}"))[1]["fid"]
    assert fids["hub"] == fids["run"]
    r = run_in_process("opendit.cli.convert", ["hf://me/digits", str(tmp_path / "c.safetensors")], env_extra=env)
    assert r.returncode == 0, r.stderr
    ema = torch.load(os.path.join(list_checkpoints(run_dir)[-1], "ema.pt"), weights_only=True)
    got = load_file(tmp_path / "c.safetensors")
    assert all(torch.equal(got[k], ema[k]) for k in ema)


@pytest.mark.parametrize("ckpt,message", [
    ("hf://me/unknown", "is not in the Hub cache and offline mode is on"),
    ("hf://me/digits@nosuchbranch", "is not in the Hub cache and offline mode is on"),
    ("hf://me/digits/nosuchfile.pt", "is not in the Hub cache and offline mode is on"),
    ("hf://just-a-name", "not a Hub address"),
])
def test_what_the_hub_cache_cannot_give_is_one_line(offline_hub, tmp_path, ckpt, message):
    env = {"HF_HUB_CACHE": offline_hub, "HF_HUB_OFFLINE": "1"}
    r = run_in_process("opendit.cli.sample", ["--ckpt", ckpt, "--device", "cpu", "--out", str(tmp_path / "g.png")],
                       env_extra=env)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "g.png").exists()


def test_bad_exports_are_one_line_and_leave_nothing(run_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    r = export(run_dir, taken)
    assert r.returncode == 2 and "--force" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert os.listdir(taken) == ["keep.txt"]
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(os.path.join(list_checkpoints(run_dir)[-1], "ema.pt"), weights_only=True), bare)
    r = export(bare, tmp_path / "out")
    assert r.returncode == 2 and "opendit convert" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bare.pt", "taken"]  # no output, no temporary folder left
    r = export(tmp_path / "nothing", tmp_path / "out2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    r = export(run_dir, bare)  # a file where the folder should go
    assert r.returncode == 2 and "is a file" in r.stderr, r.stderr


def test_an_export_that_fails_while_writing_leaves_the_old_folder(run_dir, tmp_path, monkeypatch):
    from opendit import export as export_module

    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("before")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "model_card", broken)  # after the weights and config.json are written
    with pytest.raises(OSError):
        export_module.export_run(str(run_dir), str(dst), force=True)
    assert os.listdir(dst) == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """The part of the Hub's HTTP API huggingface_hub's downloads use: a repository's revision, its file tree, and
    each file under /OWNER/NAME/resolve/REVISION/FILE (with the commit and ETag headers), for one folder."""

    root = ""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _send(self, data: bytes, body: bool, **headers):
        self.send_response(200)
        for k, v in {"Content-Length": str(len(data)), **headers}.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _answer(self, body: bool):
        path, files = self.path.split("?")[0], sorted(os.listdir(self.root))
        if path.startswith("/api/models/me/digits/tree/"):
            tree = [{"type": "file", "path": f, "size": os.path.getsize(os.path.join(self.root, f)),
                     "oid": hashlib.sha1(open(os.path.join(self.root, f), "rb").read()).hexdigest()} for f in files]
            return self._send(json.dumps(tree).encode(), body, Content_Type="application/json")
        if path.startswith("/api/models/me/digits/revision/"):
            info = {"id": "me/digits", "sha": REVISION, "siblings": [{"rfilename": f} for f in files]}
            return self._send(json.dumps(info).encode(), body, Content_Type="application/json")
        parts = path.strip("/").split("/")
        if parts[:3] == ["me", "digits", "resolve"] and len(parts) == 5 and parts[4] in files:
            data = open(os.path.join(self.root, parts[4]), "rb").read()
            return self._send(data, body, ETag=f'"{hashlib.sha256(data).hexdigest()}"', X_Repo_Commit=REVISION)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture()
def local_hub(run_dir, tmp_path):
    """A Hub on 127.0.0.1 serving the run's export as me/digits."""
    assert export(run_dir, tmp_path / "served").returncode == 0
    handler = type("Handler", (_HubHandler,), {"root": str(tmp_path / "served")})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_hf_addresses_download_from_a_hub_into_its_cache(run_dir, local_hub, tmp_path):
    """The network path, against a local server (no real Hub): a fresh process, online, fetches the repository into
    an empty cache and draws the run's grid; an unknown repository is one line."""
    env = {"HF_ENDPOINT": local_hub, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0",
           "OPENDIT_OFFLINE": "", "HF_HUB_DISABLE_TELEMETRY": "1"}
    args = ["--labels", "1,7", "--num_sampling_steps", "5", "--seed", "3", "--device", "cpu"]
    assert run_in_process("opendit.cli.sample", ["--ckpt", str(run_dir), *args, "--out", str(tmp_path / "run.png")]
                          ).returncode == 0
    r = run([sys.executable, SAMPLE, "--ckpt", "hf://me/digits", *args, "--out", str(tmp_path / "hub.png")],
            env_extra=env, process=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "hub.png")), np.asarray(Image.open(tmp_path / "run.png")))
    assert (tmp_path / "cache" / "models--me--digits" / "snapshots" / REVISION / "model.safetensors").is_file()
    r = run([sys.executable, SAMPLE, "--ckpt", "hf://me/other", *args, "--out", str(tmp_path / "no.png")],
            env_extra=env, process=True)
    assert r.returncode == 2 and "hf://me/other: cannot be fetched" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_load_hf_fine_tunes_a_new_run_from_the_exported_weights(run_dir, offline_hub, tmp_path):
    """`train.py --load hf://OWNER/NAME`: a new run whose model and EMA start from the export (EMA decay 1 keeps the
    start: ema.pt is the export bit for bit), its architecture from the export's config.json; the same run as from the
    export folder on disk; a fresh run differs."""
    env = {"HF_HUB_CACHE": offline_hub, "HF_HUB_OFFLINE": "1"}
    args = ["--dataset", "digits", "--mixed_precision", "fp32", "--device", "cpu", "--batch_size", "16",
            "--max_steps", "2", "--ckpt_every", "2", "--ema_decay", "1"]
    runs = {}
    for name, load in (("hub", ["--load", "hf://me/digits"]),
                       ("folder", ["--load", os.path.join(offline_hub, "models--me--digits", "snapshots", REVISION)]),
                       ("fresh", ["--model", "DiT-N/2"])):
        r = run_train(*args, *load, "--outputs", str(tmp_path / name), env_extra=env)
        assert r.returncode == 0, (name, r.stderr[-2000:])
        runs[name] = only_run_dir(tmp_path / name)
    exported = load_file(os.path.join(offline_hub, "models--me--digits", "snapshots", REVISION, "model.safetensors"))
    last = {name: list_checkpoints(d)[-1] for name, d in runs.items()}
    ema = torch.load(os.path.join(last["hub"], "ema.pt"), weights_only=True)
    assert ema.keys() == exported.keys() and all(torch.equal(ema[k], exported[k]) for k in exported)
    weights = {name: load_file(os.path.join(c, "model", "model.safetensors")) for name, c in last.items()}
    assert all(torch.equal(weights["hub"][k], weights["folder"][k]) for k in exported)
    assert not all(torch.equal(weights["hub"][k], weights["fresh"][k]) for k in exported)
    cfg = json.load(open(os.path.join(runs["hub"], "config.json")))
    assert cfg["model"] == "DiT-N/2" and cfg["init_from"]["load"] == "hf://me/digits"
    assert cfg["init_from"]["file"].endswith(os.path.join(REVISION, "model.safetensors"))
    assert "fine-tuning from hf://me/digits" in open(os.path.join(runs["hub"], "log.txt")).read()


@pytest.mark.parametrize("extra,message", [
    (["--load", "hf://me/digits", "--model", "DiT-S/2"],
     "--model DiT-S/2: the weights of --load hf://me/digits are --model DiT-N/2 (their config.json)"),
    (["--load", "hf://me/unknown"], "--load hf://me/unknown: is not in the Hub cache and offline mode is on"),
])
def test_fine_tuning_from_weights_that_cannot_be_had_or_do_not_fit_is_one_line(offline_hub, tmp_path, extra, message):
    r = run_train("--dataset", "digits", "--device", "cpu", "--mixed_precision", "fp32", "--max_steps", "1", *extra,
                  "--outputs", str(tmp_path / "out"), env_extra={"HF_HUB_CACHE": offline_hub, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


@pytest.mark.slow
def test_fine_tuning_under_fsdp_starts_from_the_weights(run_dir, offline_hub, tmp_path):
    """2 processes, fully sharded: rank 0 reads the weights, every shard receives its part (ema.pt = the export)."""
    r = run_train("--dataset", "digits", "--mixed_precision", "fp32", "--device", "cpu", "--batch_size", "8",
                  "--max_steps", "2", "--ckpt_every", "2", "--ema_decay", "1", "--plugin", "fsdp", "--load",
                  "hf://me/digits", "--outputs", str(tmp_path / "o"), nproc=2,
                  env_extra={"HF_HUB_CACHE": offline_hub, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    exported = load_file(os.path.join(offline_hub, "models--me--digits", "snapshots", REVISION, "model.safetensors"))
    ema = torch.load(os.path.join(list_checkpoints(only_run_dir(tmp_path / "o"))[-1], "ema.pt"), weights_only=True)
    assert ema.keys() == exported.keys() and all(torch.equal(ema[k], exported[k]) for k in exported)
