"""A headless Chromium driven over the DevTools protocol's pipe (``--remote-debugging-pipe``: JSON messages ended by a
NUL byte, written to the browser's fd 3 and read from its fd 4), with the standard library only: what the sampling
page's test and its screenshot need (open a page, run JavaScript, wait for a condition, take a screenshot).

    with Chromium() as browser:
        browser.open("http://127.0.0.1:7860/")
        browser.wait_for("document.getElementById('generate').disabled === false")
        browser.evaluate("document.getElementById('generate').click()")
        png = browser.screenshot()
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """$CHROMIUM, else the first of the usual names on PATH (Debian's package installs ``chromium``)."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((p for p in map(shutil.which, NAMES) if p), None)


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless browser with one page (a tab), closed on exit."""

    def __init__(self, binary: str | None = None, width: int = 1200, height: int = 800, timeout: float = 60.0):
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError("no Chromium found (apt-get install chromium, or set $CHROMIUM)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="opendit-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def pipes_at_3_and_4():  # in the child: its fd 3 reads our messages, its fd 4 writes the answers
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)  # copies first: a dup2 cannot clobber a source
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--remote-debugging-pipe", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
                "--force-color-profile=srgb", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "about:blank"]
        self.process = subprocess.Popen(args, pass_fds=(3, 4, to_browser_r, from_browser_w),
                                        preexec_fn=pipes_at_3_and_4,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._next_id, self.session = b"", 0, None
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    # -- the protocol
    def call(self, method: str, **params) -> dict:
        """Send one command (to the page's session once attached) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._next_id:
                    if "error" in answer:
                        raise BrowserError(f"{method}: {answer['error'].get('message')}")
                    return answer.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise BrowserError(f"{method}: no answer from Chromium in {self.timeout:g} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError(f"{method}: Chromium exited (code {self.process.poll()})")
            self._buffer += chunk

    # -- what a test does
    def evaluate(self, expression: str):
        """The value of a JavaScript expression (awaited if it is a promise); a thrown error is a BrowserError."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]}: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def wait_for(self, expression: str, timeout: float | None = None, poll: float = 0.05):
        """Poll ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {expression}")
            time.sleep(poll)

    def screenshot(self) -> bytes:
        """The page as a PNG (its whole height)."""
        height = self.evaluate("document.documentElement.scrollHeight")
        width = self.evaluate("document.documentElement.scrollWidth")
        clip = dict(x=0, y=0, width=width, height=height, scale=1)
        return base64.b64decode(self.call("Page.captureScreenshot", format="png", clip=clip,
                                          captureBeyondViewport=True)["data"])

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.session = None
                self.call("Browser.close")
            except (BrowserError, OSError):
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
