"""Headless Chromium for the dashboard's tests, driven over the DevTools protocol on a pipe.

``--remote-debugging-pipe`` makes Chromium read protocol messages from fd 3 and write its
own to fd 4, each a JSON object ended by a NUL byte: no port, no websocket library. One
page is attached (``Target.attachToTarget`` with ``flatten``), and every call waits for
its answer under a timeout, so a stuck browser fails the test instead of hanging it.
Uncaught exceptions of the page's scripts are collected in ``Chromium.exceptions``.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]  # nothing left in /dev/shm, whatever happens
CALL_TIMEOUT = 15.0


class ChromiumError(RuntimeError):
    """Chromium answered a call with an error, did not answer in time, or went away."""


class Chromium:
    """One headless Chromium with one page of ``width`` x ``height`` CSS pixels; its
    profile and log live in ``workdir``. ``close`` always ends the whole process group."""

    def __init__(self, workdir: Path, width: int = 1280, height: int = 900) -> None:
        self.profile = tempfile.mkdtemp(prefix="chromium-", dir=workdir)
        self.log = Path(workdir) / "chromium.log"
        to_chromium, self._out = os.pipe()
        self._in, from_chromium = os.pipe()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$@" 3<&{to_chromium} 4>&{from_chromium}', "bash", CHROMIUM,
                 *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
                 f"--window-size={width},{height}", "about:blank"],
                pass_fds=(to_chromium, from_chromium), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_chromium)
        os.close(from_chromium)
        self._ids = itertools.count(1)
        self._buffer = b""
        self.session: str | None = None
        self.exceptions: list[str] = []
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target,
                                     flatten=True)["sessionId"]
            self.call("Runtime.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    # -- the protocol ---------------------------------------------------------------------------
    def call(self, method: str, timeout: float = CALL_TIMEOUT, **params: object) -> dict:
        """Send one command (to the page once attached) and return its result."""
        msg_id = next(self._ids)
        msg: dict = {"id": msg_id, "method": method, "params": params}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline, method)
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise ChromiumError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if reply.get("method") == "Runtime.exceptionThrown":
                details = reply["params"]["exceptionDetails"]
                self.exceptions.append(details.get("exception", {}).get("description")
                                       or details.get("text", "?"))

    def _next(self, deadline: float, waiting_for: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise ChromiumError(f"no answer to {waiting_for} in time\n{self._tail()}")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise ChromiumError(f"chromium went away during {waiting_for}\n{self._tail()}")
            self._buffer += chunk
        msg, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(msg)

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    # -- the page -------------------------------------------------------------------------------
    def open(self, url: str) -> None:
        """Load ``url`` and wait until its document (scripts included) has loaded."""
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href === "
                      + json.dumps(url), what=f"{url} loaded")

    def evaluate(self, expression: str) -> object:
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise ChromiumError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0, what: str = "") -> object:
        """Evaluate ``expression`` every 0.1 s until its value is truthy in Python (a DOM node
        comes back as ``{}``: compare it with null); return that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}; "
                                     f"page text:\n{self.evaluate('document.body.innerText')}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        """The viewport as a PNG at ``path``."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """Ask Chromium to quit, then kill whatever of its process group is left."""
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout=5)
            except (ChromiumError, OSError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its renderers and helpers too
        except ProcessLookupError:
            pass
        self.proc.wait(5)
        for fd in (self._in, self._out):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)
