"""`opendit serve`: the page's API draws, for each request, the grid that sample_dit.py writes for the command it
reports (pixel for pixel), one request at a time in order (concurrent requests give what sequential ones give); bad
values are one message on the page; a port in use is one line. The page itself in a real browser:
tests/test_serve_browser.py."""

import base64
import io
import json
import socket
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from helpers import TINY, only_run_dir, run, run_in_process, run_train
from opendit.config import GridConfig, ServeConfig
from opendit.cli.flags import checking_parser, parse_argv
from opendit.serve.app import explorer_for, make_server
from opendit.distributed import pick_device
from opendit.errors import UserError
from opendit.precision import Precision

# the EMA is the weights (decay 0), trained enough that the labels and guidance change the pixels (a few steps from
# adaLN-Zero's init would not: every grid would be the sampler's treatment of noise alone)
TRAINED = ["--lr", "1e-2", "--ema_decay", "0", "--batch_size", "16", "--max_steps", "30", "--ckpt_every", "30"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = run_train(*TINY, *TRAINED, "--outputs", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return only_run_dir(out)


@pytest.fixture(scope="module")
def page(run_dir):
    """The page's server on a free loopback port, in this process (as `opendit serve` builds it)."""
    cfg = parse_argv(ServeConfig, ["--ckpt", run_dir, "--device", "cpu", "--max_images", "16"])
    device = pick_device("cpu", 0)
    precision = Precision("fp32", device)
    explorer = explorer_for(cfg, checking_parser(GridConfig), device, precision)  # as `opendit serve` builds it
    server = make_server(explorer, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def post(url, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/api/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def pixels(reply) -> np.ndarray:
    assert reply["image"].startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["image"].split(",", 1)[1]))).convert("RGB"))


def sample_dit(argv, out) -> np.ndarray:
    r = run_in_process("opendit.cli.sample", [*argv, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    return np.asarray(Image.open(out).convert("RGB"))


def test_the_page_describes_the_model_and_starts_from_the_training_grids_sampler(page):
    with urllib.request.urlopen(page + "/api/info") as answer:
        info = json.load(answer)
    assert info["model"] == "DiT-N/2" and info["objective"] == "diffusion" and info["image_size"] == 8
    assert info["class_names"] == [str(i) for i in range(10)]
    assert info["samplers"] == ["ddpm", "ddim", "dpm-solver++"] and info["max_images"] == 16
    d = info["defaults"]
    assert (d["sampler"], d["steps"], d["cfg_scale"], d["seed"]) == ("dpm-solver++", 20, 4.0, 0)
    assert d["per_class"] * len(d["classes"]) <= 16  # the first page's request is a valid one
    with urllib.request.urlopen(page + "/") as answer:
        assert b'id="generate"' in answer.read()


@pytest.mark.parametrize("request_", [
    dict(classes=[3, 7], per_class="2", sampler="ddim", steps="6", seed="5", cfg_scale="1.5",
         cfg_interval=["0.2", "0.8"]),
    dict(classes=[0], per_class=3, sampler="dpm-solver++", steps=4, seed=9, cfg_scale=1),
])
def test_a_grid_from_the_page_is_the_grid_sample_dit_writes(page, run_dir, tmp_path, request_):
    status, reply = post(page, request_)
    assert status == 200, reply
    argv = reply["command"].split("sample_dit.py ", 1)[1].rsplit(" --out ", 1)[0].split()
    labels = ",".join(str(c) for c in request_["classes"] for _ in range(int(request_["per_class"])))
    expected = ["--ckpt", run_dir, "--device", "cpu", "--labels", labels, "--sampler", request_["sampler"],
                "--num_sampling_steps", str(request_["steps"]), "--seed", str(request_["seed"]), "--cfg_scale",
                str(request_["cfg_scale"]), *(["--cfg_interval", *request_["cfg_interval"]]
                                              if "cfg_interval" in request_ else [])]
    assert argv == expected
    assert np.array_equal(pixels(reply), sample_dit(expected, tmp_path / "g.png"))
    assert reply["seconds"] > 0 and reply["queued_seconds"] >= 0


def test_concurrent_requests_are_drawn_one_at_a_time_as_if_sequential(page):
    """DDPM draws fresh noise from the global RNG at every step: two grids drawn at once would interleave it."""
    requests = [dict(classes=[c], per_class=2, sampler="ddpm", steps=8, seed=s, cfg_scale=2) for c, s in
                [(1, 0), (2, 1), (4, 2), (8, 3)]]
    sequential = [pixels(post(page, r)[1]) for r in requests]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda r: post(page, r), requests))
    assert all(status == 200 for status, _ in together)
    for (_, reply), alone in zip(together, sequential):
        assert np.array_equal(pixels(reply), alone)


@pytest.mark.parametrize("request_,message", [
    (dict(classes=[3, 7], per_class="5000"), "10,000 images asked for; this page draws at most 16"),
    (dict(classes=[3], steps="-5"), "steps: must be an integer in [1, 1000], got -5"),
    (dict(classes=[3], steps="2.5"), "steps: must be an integer in [1, 1000], got '2.5'"),
    (dict(classes=[3], cfg_scale="abc"), "guidance scale: must be a finite number >= 0, got 'abc'"),
    (dict(classes=[3], cfg_scale="1.5", cfg_interval=["0.9", "0.1"]), "need 0 <= LO <= HI <= 1"),
    (dict(classes=[3], sampler="ode"), "--sampler ode: "),
    (dict(classes=[3], seed="--ckpt"), "seed: not a value: '--ckpt'"),
    (dict(classes=[]), "choose at least one class"),
    (dict(classes=[10]), "classes must be class indices in 0..9"),
    (dict(classes=[3], per_class="0"), "images per class must be at least 1"),
    (b"{not json", "the request is not JSON"),
])
def test_bad_values_are_one_message_on_the_page(page, request_, message):
    status, reply = post(page, request_)
    assert status == 400 and message in reply["error"] and "\n" not in reply["error"], reply


def test_a_port_in_use_is_one_line(run_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run([sys.executable, "-m", "opendit", "serve", "--ckpt", run_dir, "--device", "cpu", "--port", str(port)],
                process=True, timeout=120)
    assert r.returncode == 2 and r.stderr == f"error: --port {port}: 127.0.0.1:{port} is in use (another server?); " \
        f"pass another --port, or --port 0 for a free one\n", r.stderr
    bad = run_in_process("opendit.cli.serve", ["--ckpt", run_dir, "--port", "70000"])
    assert bad.returncode == 2 and "--port: must be an integer in [0, 65535], got 70000" in bad.stderr


@pytest.mark.parametrize("objective,request_,first", [
    ("flow", dict(classes=[2, 5], per_class=2, sampler="sde", sampling_method="Heun", steps=6, seed=4, cfg_scale=2),
     dict(sampler="ode", steps=11, sampling_method="heun", cfg_scale=4.0)),
    ("meanflow", dict(classes=[1], per_class=3, sampler="meanflow", steps=2, seed=1, cfg_scale="1"),
     dict(sampler="meanflow", steps=1, sampling_method=None, cfg_scale=1.0)),
])
def test_flow_and_meanflow_checkpoints_on_the_page(tmp_path, objective, request_, first):
    """A flow offers its integration methods; MeanFlow has guidance trained in (the page starts at 1 and refuses
    another scale); each grid is sample_dit.py's."""
    r = run_train(*TINY, "--objective", objective, "--batch_size", "16", "--max_steps", "2", "--ckpt_every", "2",
                  "--outputs", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = only_run_dir(tmp_path / "o")
    cfg = parse_argv(ServeConfig, ["--ckpt", run_dir, "--device", "cpu"])
    device = pick_device("cpu", 0)
    precision = Precision("fp32", device)
    explorer = explorer_for(cfg, checking_parser(GridConfig), device, precision)  # as `opendit serve` builds it
    info = explorer.info()
    assert {k: info["defaults"][k] for k in first} == first
    assert info["methods"] == ({"ode": ["euler", "heun", "dopri5"], "sde": ["Euler", "Heun"]} if objective == "flow"
                               else {})
    assert info["guidance_trained_in"] == (objective == "meanflow")
    result = explorer.generate(request_)
    shown = np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB"))
    assert np.array_equal(shown, sample_dit(result.command, tmp_path / "g.png"))
    if objective == "meanflow":
        with pytest.raises(UserError, match="guidance is trained into"):
            explorer.generate(dict(request_, cfg_scale="1.5"))


def test_the_servers_sampler_options_apply_to_every_request(run_dir, tmp_path):
    """Flags the page has no control for (here --guidance_channels and --clip_denoised) are part of every request's
    command; the page's own settings given to serve are only its first values."""
    cfg = parse_argv(ServeConfig, ["--ckpt", run_dir, "--device", "cpu", "--guidance_channels", "1", "--clip_denoised",
                                   "no", "--cfg_scale", "2.5", "--seed", "7"])
    device = pick_device("cpu", 0)
    explorer = explorer_for(cfg, checking_parser(GridConfig), device, Precision("fp32", device))
    assert (explorer.defaults["cfg_scale"], explorer.defaults["seed"]) == (2.5, 7)
    result = explorer.generate(dict(classes=[4], per_class=2, sampler="ddim", steps=5, seed=1, cfg_scale=3))
    assert result.command[:8] == ["--ckpt", run_dir, "--clip_denoised", "no", "--guidance_channels", "1", "--device",
                                  "cpu"]
    assert "--cfg_scale" in result.command and result.command[result.command.index("--cfg_scale") + 1] == "3"
    shown = np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB"))
    assert np.array_equal(shown, sample_dit(result.command, tmp_path / "g.png"))
