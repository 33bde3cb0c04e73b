"""Start `loopserve-edge serve` on PORT with ARGS (from the repository root, its .venv), a fresh
home and log under /tmp per port, and wait for /health."""
import os
import subprocess
import time

import httpx


def start(port: int, args: list[str]) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, LOOPSERVE_EDGE_HOME=f"/tmp/concurrency-home{port}")
    log = open(f"/tmp/concurrency-server{port}.log", "w")
    proc = subprocess.Popen([".venv/bin/python", "-m", "loopserve_edge.cli", "serve", "--port", str(port),
                             "--threads", "2", *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    return proc, url
