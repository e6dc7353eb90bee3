"""The sampling page in a real browser: `opendit serve` (a process, on a free loopback port, with an exported run
fetched offline through --ckpt hf://OWNER/NAME) driven by headless Chromium: classes chosen by name, sampler, steps,
seed, guidance and its interval set as a user sets them, Generate clicked; the pixels the page shows (read back from
the displayed <img> through a canvas) equal the grid sample_dit.py writes from the run directory for the same
settings. Bad values answer on the page. A screenshot of the page is written (OPENDIT_SCREENSHOT=PATH keeps it).

Needs Chromium (Debian: apt-get install chromium; .ci/run installs it). Without one the test is skipped, unless
OPENDIT_REQUIRE_BROWSER is set (as .ci/run sets it), when it fails."""

import base64
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, TINY, only_run_dir, run_in_process, run_train
from opendit.serve.browser import Chromium, find_chromium

pytestmark = pytest.mark.skipif(find_chromium() is None and not os.environ.get("OPENDIT_REQUIRE_BROWSER"),
                                reason="no Chromium (apt-get install chromium; .ci/run installs it)")
REVISION = "89abcdef0123456789abcdef0123456789abcdef"

READ_PIXELS = """(() => {
  const img = document.getElementById("grid");
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let text = "";
  for (let i = 0; i < data.length; i += 8192) text += String.fromCharCode.apply(null, data.subarray(i, i + 8192));
  return [canvas.width, canvas.height, btoa(text)];
})()"""

# the EMA is the weights (decay 0), trained enough that the labels and guidance change the pixels (a few steps from
# adaLN-Zero's init would not: every grid would be the sampler's treatment of noise alone)
TRAINED = ["--lr", "1e-2", "--ema_decay", "0", "--batch_size", "16", "--max_steps", "30", "--ckpt_every", "30"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A short digits run, exported and placed in a Hub cache as me/digits: (run dir, cache)."""
    root = tmp_path_factory.mktemp("served")
    r = run_train(*TINY, *TRAINED, "--outputs", str(root / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = only_run_dir(root / "o")
    r = run_in_process("opendit.cli.export", [run_dir, str(root / "export"), "--repo", "me/digits"])
    assert r.returncode == 0, r.stderr
    snapshot = root / "hub" / "models--me--digits" / "snapshots" / REVISION
    shutil.copytree(root / "export", snapshot)
    (root / "hub" / "models--me--digits" / "refs").mkdir()
    (root / "hub" / "models--me--digits" / "refs" / "main").write_text(REVISION)
    return run_dir, str(root / "hub")


@pytest.fixture(scope="module")
def server(exported):
    _, cache = exported
    env = dict(os.environ, HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1", OPENDIT_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "opendit", "serve", "--ckpt", "hf://me/digits", "--device", "cpu",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO)
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:\d+/", line)
    if not found:
        proc.kill()
        pytest.fail(f"opendit serve did not start: {line}{proc.stderr.read()}")
    yield found.group(0)
    proc.terminate()
    proc.wait(timeout=30)


def set_value(browser, element, value):
    """As typing does: the value, then an input event."""
    browser.evaluate(f"(() => {{ const e = document.getElementById({element!r}); e.value = {value!r}; "
                     f"e.dispatchEvent(new Event('input', {{bubbles: true}})); }})()")


def generate(browser, *, expect_ok: bool = True):
    before = browser.evaluate("Number(document.body.dataset.generated || 0)")
    browser.evaluate("(() => { const s = document.getElementById('status'); s.textContent = ''; s.className = ''; })()")
    browser.evaluate("document.getElementById('generate').click()")
    if expect_ok:
        browser.wait_for(f"Number(document.body.dataset.generated || 0) === {before + 1}", timeout=120)
    else:
        browser.wait_for("document.getElementById('status').className === 'bad'", timeout=120)
    return browser.evaluate("document.getElementById('status').textContent")


def test_the_page_draws_what_sample_dit_draws_and_answers_bad_values(exported, server, tmp_path):
    run_dir, _ = exported
    with Chromium() as browser:
        browser.open(server)
        browser.wait_for("!document.getElementById('generate').disabled")
        assert browser.evaluate("document.getElementById('title').textContent") == "DiT-N/2"
        # classes by name: none, then type "7" into the filter and tick it, then "3"
        browser.evaluate("document.getElementById('none').click()")
        for name in ("7", "3"):
            set_value(browser, "filter", name)
            shown = browser.evaluate("[...document.querySelectorAll('#classes label')].filter(l => !l.hidden)"
                                     ".map(l => l.textContent.trim())")
            assert shown == [name]
            browser.evaluate("document.querySelector('#classes label:not([hidden]) input').click()")
        set_value(browser, "filter", "")
        set_value(browser, "per_class", "3")
        browser.evaluate("(() => { const s = document.getElementById('sampler'); s.value = 'ddim'; "
                         "s.dispatchEvent(new Event('change')); })()")
        set_value(browser, "steps", "6")
        set_value(browser, "seed", "11")
        set_value(browser, "cfg_scale", "1.5")
        browser.evaluate("document.getElementById('interval_on').click()")
        set_value(browser, "interval_lo", "0.1")
        set_value(browser, "interval_hi", "0.5")
        status = generate(browser)
        assert status.startswith("6 images in ") and "DDIM 6 steps, cfg 1.5 in [0.1, 0.5]" in status, status
        width, height, data = browser.evaluate(READ_PIXELS)
        shown = np.frombuffer(base64.b64decode(data), np.uint8).reshape(height, width, 4)
        assert (shown[..., 3] == 255).all()
        expected_png = tmp_path / "sample_dit.png"
        r = run_in_process("opendit.cli.sample", [
            "--ckpt", run_dir, "--device", "cpu", "--labels", "3,3,3,7,7,7", "--sampler", "ddim",
            "--num_sampling_steps", "6", "--seed", "11", "--cfg_scale", "1.5", "--cfg_interval", "0.1", "0.5",
            "--out", str(expected_png)])
        assert r.returncode == 0, r.stderr
        expected = np.asarray(Image.open(expected_png).convert("RGB"))
        assert shown.shape[:2] == expected.shape[:2] and np.array_equal(shown[..., :3], expected)
        # the download is that image; the command shown is the one just run (with the Hub address)
        assert browser.evaluate("document.getElementById('download').href === document.getElementById('grid').src")
        assert browser.evaluate("document.getElementById('download').download") == "DiT-N-2-seed11.png"
        command = browser.evaluate("document.getElementById('command').textContent")
        assert command.startswith("python scripts/dit/sample_dit.py --ckpt hf://me/digits --device cpu --labels "
                                  "3,3,3,7,7,7 --sampler ddim --num_sampling_steps 6 --seed 11"), command
        screenshot = browser.screenshot()
        # bad values: a message on the page, the last grid still shown
        set_value(browser, "per_class", "5000")
        assert "10,000 images asked for" in generate(browser, expect_ok=False)
        set_value(browser, "per_class", "3")
        set_value(browser, "steps", "-5")
        assert generate(browser, expect_ok=False) == "steps: must be an integer in [1, 1000], got -5"
        assert not browser.evaluate("document.getElementById('grid').hidden")
    (tmp_path / "page.png").write_bytes(screenshot)
    assert Image.open(tmp_path / "page.png").size[0] >= 1000
    if os.environ.get("OPENDIT_SCREENSHOT"):
        shutil.copy(tmp_path / "page.png", os.environ["OPENDIT_SCREENSHOT"])
