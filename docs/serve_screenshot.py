"""docs/serve.png: the sampling page (`opendit serve`) of a run, after one Generate, in headless Chromium.

    python docs/serve_screenshot.py outputs/demo/000-DiT-N-2      # the run of `make demo`
"""

import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from opendit.serve.browser import Chromium  # noqa: E402


def main(run_dir: str, out: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.png")) -> None:
    server = subprocess.Popen([sys.executable, "-m", "opendit", "serve", "--ckpt", run_dir, "--device", "cpu",
                               "--port", "0", "--cfg_scale", "1.5"], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        url = re.search(r"http://\S+/", server.stdout.readline()).group(0)
        with Chromium(width=1200, height=900) as browser:
            browser.open(url)
            browser.wait_for("!document.getElementById('generate').disabled")
            browser.evaluate("document.getElementById('generate').click()")
            browser.wait_for("document.body.dataset.generated === '1'", timeout=300)
            png = browser.screenshot()
        with open(out, "wb") as f:
            f.write(png)
        print(f"{url} -> {out}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main(*sys.argv[1:])
