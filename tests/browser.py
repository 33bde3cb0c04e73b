"""Headless Chromium driven over the DevTools protocol (CDP), enough to use a page as a person
does: load it, type, press Enter, read the page and take screenshots. Debian's `chromium`
package and the `websocket-client` package; no browser download of its own."""
from __future__ import annotations

import base64
import itertools
import json
import queue
import re
import shutil
import subprocess
import threading
import time

import httpx


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    def __init__(self, profile_dir, width: int = 900, height: int = 700):
        import websocket

        self.proc = subprocess.Popen(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={profile_dir}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        found: queue.Queue = queue.Queue()

        def read_stderr():  # drained to the end, so that the browser never blocks on a full pipe
            for line in self.proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/..."
                m = re.search(r"ws://127\.0\.0\.1:(\d+)/", line)
                if m:
                    found.put(int(m.group(1)))
            found.put(None)

        threading.Thread(target=read_stderr, daemon=True).start()
        try:
            port = found.get(timeout=60)
        except queue.Empty:
            port = None
        if port is None:
            self.proc.kill()
            raise RuntimeError(f"chromium did not start (status {self.proc.wait()})")
        page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
        # no Origin header: Chromium refuses DevTools connections from an origin it was not told
        # to allow (--remote-allow-origins), which a client without one needs no flag for
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self._ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        i = next(self._ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:  # events arrive between the replies: skip them
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expr: str, timeout: float = 120.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expr)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"the page never made true: {expr}")

    def type(self, text: str) -> None:
        """Text into the focused element, then Enter, as keystrokes."""
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, nativeVirtualKeyCode=13)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.kill()
            self.proc.wait()
