"""The server's engine with several clients at once: replies decoded together (one
llama_decode per step for all of them) against one reply at a time.

    python benchmarks/serve_batch.py [--model M.gguf] [--clients 1,4,8] [--tokens 64] [--threads 2]

Each client sends one conversation's first message (a short question) and waits for a reply
of --tokens tokens (greedy, no stop). For each number of clients the table gives the wall
time until all replies are in, the generated tokens per second over all clients, and the
mean replies per decode step, with batching (the engine's default: up to max_resident
replies per step) and without (one at a time).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from loopserve_edge.bench.data import passages_and_questions  # noqa: F401  (llama.cpp before numpy)


def run(engine, n_clients: int, tokens: int) -> tuple[float, int]:
    from loopserve_edge.server.protocol import parse_chat_request

    done = []

    def client(i: int) -> None:
        body = {"model": engine.opts.model_name, "temperature": 0, "max_tokens": tokens, "stop": ["\x00"],
                "messages": [{"role": "user", "content": f"Client {i}: tell me a long story about ships."}]}
        req = parse_chat_request(json.dumps(body).encode(), engine.opts.model_name)
        _, stats, _, _ = engine.run(req, None, lambda *_: None, threading.Event())
        done.append(stats.decode_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--flash-attn", default="on", help="on, off, or on,off: both, side by side")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="batch-invariant attention, as the server runs by default (needs flash attention)")
    a = ap.parse_args()

    from loopserve_edge.paths import default_model

    model = Path(a.model) if a.model else default_model()
    clients = [int(c) for c in a.clients.split(",")]
    print(f"{model.name}, {a.threads} threads, n_gpu_layers {a.n_gpu_layers}, replies of {a.tokens} tokens "
          f"(greedy), max_resident {max(clients)}{', batch-invariant attention' if a.batch_invariant else ''}\n")
    print("| flash attention | clients | mode | wall s | generated tok/s (all clients) | replies per decode step |")
    print("|---|---:|---|---:|---:|---:|")
    for fa in a.flash_attn.split(","):
        _measure(model, clients, a, fa)


def _measure(model, clients, a, fa: str) -> None:
    from loopserve_edge import Llama, LoopServeConfig
    from loopserve_edge.server.engine import Engine, ServeOptions

    with Llama(model, n_ctx=4096, n_threads=a.threads, n_gpu_layers=a.n_gpu_layers, flash_attn=fa == "on",
               loopserve=LoopServeConfig(max_resident=max(clients), batch_invariant=a.batch_invariant)) as llm:
        with tempfile.TemporaryDirectory() as tmp:   # warm-up: allocation, graph building
            engine = Engine(llm, ServeOptions(model.stem, Path(tmp)))
            run(engine, 2, 4)
            engine.stop()
        for n in clients:
            for mode in ("together", "one at a time"):
                with tempfile.TemporaryDirectory() as tmp:
                    engine = Engine(llm, ServeOptions(model.stem, Path(tmp)))
                    if mode != "together":
                        engine.max_batch = 1
                    wall, gen = run(engine, n, a.tokens)
                    steps = sum(engine.batches.values())
                    per_step = sum(k * v for k, v in engine.batches.items()) / max(1, steps)
                    engine.stop()
                    for e in list(engine.store.entries.values()):
                        if e.dialogue is not None:
                            e.dialogue.close()
                print(f"| {fa} | {n} | {mode} | {wall:.2f} | {gen / wall:.1f} | {per_step:.2f} |", flush=True)


if __name__ == "__main__":
    main()
