"""Load on an OpenAI-compatible server: N concurrent multi-turn clients, loopserve-edge's
server against llama-cpp-python's own (`python -m llama_cpp.server`) on the same model and
build.

    python benchmarks/serve_load.py [--servers loopserve,llama-cpp-python] [--clients 1,4,16]
                                    [--turns 3] [--tokens 32] [--threads 2] [--n-ctx 8192]
                                    [--n-gpu-layers 0]

Each server is started on a free port of 127.0.0.1 (its own process, same model, n_ctx and
threads) and stopped afterwards. Each client holds one conversation: every turn sends the
whole history plus a new user message (a real passage and a question, ~150 tokens), streamed,
greedy, `--tokens` tokens (no stop), as stateless clients do. Per server and N: requests per
second (completed ones), p50 / p99 time to first token of turn 1 and of turns >= 2 (client
side), generated tokens per second over all clients, failed requests (each ends its
conversation) and, for loopserve-edge, what its KV pool's pressure cost (from /metrics).
llama-cpp-python's server needs its extras (sse-starlette, starlette-context,
pydantic-settings).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from loopserve_edge.bench.data import passages_and_questions


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, model: Path, a, home: str) -> tuple[subprocess.Popen, str, str]:
    port = _port()
    if kind == "loopserve":
        cmd = [sys.executable, "-m", "loopserve_edge.cli", "serve", str(model), "--port", str(port),
               "--n-ctx", str(a.n_ctx), "--threads", str(a.threads), "--max-resident", str(a.max_resident),
               "--max-queue", "64", "--n-gpu-layers", str(a.n_gpu_layers)]
        name = model.stem
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(port),
               "--n_ctx", str(a.n_ctx), "--n_threads", str(a.threads), "--model_alias", model.stem,
               # its default cuts a streaming reply off when the next request arrives
               "--interrupt_requests", "False", "--n_gpu_layers", str(a.n_gpu_layers)]
        if a.n_gpu_layers != 0:   # on a GPU both with flash attention (ours has it on by default)
            cmd += ["--flash_attn", "True"]
        name = model.stem
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, LOOPSERVE_EDGE_HOME=home))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return proc, url, name
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{kind} server exited ({' '.join(cmd)})")
        time.sleep(0.2)
    raise SystemExit(f"{kind} server did not start")


def client(url: str, name: str, msgs: list[str], tokens: int, out: list, failed: list) -> None:
    """One conversation; a request that fails ends it (counted in `failed`)."""
    try:
        _conversation(url, name, msgs, tokens, out)
    except httpx.HTTPError as e:
        failed.append(e)


def _conversation(url: str, name: str, msgs: list[str], tokens: int, out: list) -> None:
    history = []
    with httpx.Client(timeout=600) as http:
        for turn, text in enumerate(msgs):
            history.append({"role": "user", "content": text})
            body = {"model": name, "messages": history, "stream": True, "temperature": 0,
                    "max_tokens": tokens, "stop": ["\x00"]}
            t0 = time.perf_counter()
            ttft, reply, n = None, [], 0
            with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ch = json.loads(line[6:])
                    for c in ch.get("choices", []):
                        piece = (c.get("delta") or {}).get("content")
                        if piece:
                            ttft = ttft if ttft is not None else time.perf_counter() - t0
                            reply.append(piece)
                            n += 1
            out.append((turn, ttft or 0.0, time.perf_counter() - t0, n))
            history.append({"role": "assistant", "content": "".join(reply)})


def conversations(n: int, turns: int) -> list[list[str]]:
    items = passages_and_questions(100000)
    convs = []
    for _ in range(n):
        c = []
        for _ in range(turns):
            title, text, q = next(items)
            c.append(f"Document ({title}): {text[:600]}\n\nQuestion: {q}?")
        convs.append(c)
    return convs


def pool_events(url: str) -> str:
    names = ("loopserve_decode_waits_total", "loopserve_kv_swaps_out_total", "loopserve_kv_repacks_total")
    got = dict(ln.split()[:2] for ln in httpx.get(url + "/metrics", timeout=10).text.splitlines()
               if ln.split(" ")[0] in names)
    return " / ".join(str(int(float(got[n]))) if n in got else "?" for n in names)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--servers", default="loopserve,llama-cpp-python")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--max-resident", type=int, default=16)
    ap.add_argument("--n-gpu-layers", type=int, default=0,
                    help="layers on the GPU, both servers (-1: all; then llama-cpp-python's with flash attention too)")
    a = ap.parse_args()

    from loopserve_edge.paths import default_model

    model = Path(a.model) if a.model else default_model()
    print(f"{model.name}, {a.threads} threads, n_gpu_layers {a.n_gpu_layers}, n_ctx {a.n_ctx}, "
          f"{a.turns} turns per client (~150-token messages of real passages), replies of {a.tokens} tokens greedy, streamed; loopserve-edge "
          f"max_resident {a.max_resident}\n")
    # pool: for loopserve-edge, what a KV pool too small for every conversation cost (from its
    # /metrics): replies that waited a step for room, dialogues swapped out, pool repacks
    print("| server | clients | requests/s | TTFT turn 1 p50 / p99 s | TTFT turns >= 2 p50 / p99 s | "
          "generated tok/s (all clients) | failed requests | pool waits / swaps / repacks |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in a.servers.split(","):
        for n in (int(c) for c in a.clients.split(",")):
            with tempfile.TemporaryDirectory() as home:
                proc, url, name = start(kind, model, a, home)
                try:
                    out: list = []
                    failed: list = []
                    threads = [threading.Thread(target=client, args=(url, name, msgs, a.tokens, out, failed))
                               for msgs in conversations(n, a.turns)]
                    t0 = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    wall = time.perf_counter() - t0
                    pool = pool_events(url) if kind == "loopserve" else "—"
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
            first = [x[1] for x in out if x[0] == 0]
            later = [x[1] for x in out if x[0] > 0]
            print(f"| {kind} | {n} | {len(out) / wall:.2f} | {pct(first, 50):.2f} / {pct(first, 99):.2f} | "
                  f"{pct(later, 50):.2f} / {pct(later, 99):.2f} | {sum(x[3] for x in out) / wall:.1f} | {len(failed)} | {pool} |",
                  flush=True)


if __name__ == "__main__":
    main()
