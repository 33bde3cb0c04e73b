"""Decode speed with observation-window scoring off and on, at several context depths.

    python benchmarks/score_overhead.py [MODEL.gguf] [--depths 256,1024,2048] [--tokens 64]
    python benchmarks/score_overhead.py --random 135m --tokenizer T.gguf --n-gpu-layers -1 ...

--random writes a random-weight f16 Llama GGUF of a shape from loopserve_edge.random_gguf
(with the tokenizer of T.gguf) for machines without the default model.

For each depth and flash-attention setting: prefill `depth` tokens, then decode `tokens`
single tokens with scoring off, roll them back, and decode them again with scoring on
(window 16, so each decode scores its one token); repeated, best of `reps` per setting.
"""
from __future__ import annotations

import argparse
import os
import time

from loopserve_edge import Llama, LoopServeConfig  # before numpy: see tests/conftest.py
from loopserve_edge.paths import default_model
from loopserve_edge.random_gguf import SHAPES, write_shape

import numpy as np


def decode_run(llm, dlg, start, toks):
    t0 = time.perf_counter()
    for i, t in enumerate(toks):
        llm.decode(dlg, [t], [start + i])
    dt = time.perf_counter() - t0
    llm.remove_positions(dlg._seq, start)
    return len(toks) / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--depths", default="256,1024,2048")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--random", metavar="SHAPE", choices=sorted(SHAPES),
                    help="random weights at this shape (needs --tokenizer)")
    ap.add_argument("--tokenizer", help="GGUF whose tokenizer a --random model copies")
    a = ap.parse_args()
    if a.random:
        import tempfile
        model = write_shape(os.path.join(tempfile.mkdtemp(), "random.gguf"), a.random, a.tokenizer)
        print(f"random-weight f16 llama, shape {a.random}")
    else:
        model = a.model or default_model()
    depths = [int(d) for d in a.depths.split(",")]
    rng = np.random.default_rng(0)
    print(f"model {os.path.basename(str(model))}, threads {a.threads}, n_gpu_layers {a.n_gpu_layers}, "
          f"{a.tokens} decoded tokens, best of {a.reps}")
    print(f"{'fa':>3} {'depth':>6} {'off tok/s':>10} {'on tok/s':>10} {'overhead':>9}")
    for fa in (False, True):
        llm = Llama(model, n_ctx=max(depths) + a.tokens + 8, n_threads=a.threads,
                    n_threads_batch=a.threads, flash_attn=fa, n_gpu_layers=a.n_gpu_layers,
                    loopserve=LoopServeConfig(max_resident=1))
        n_vocab = llm.n_vocab
        for depth in depths:
            dlg = llm.dialogue()
            ctx = [int(t) for t in rng.integers(100, min(n_vocab, 30000), depth)]
            llm.decode(dlg, ctx, list(range(depth)))
            toks = [int(t) for t in rng.integers(100, min(n_vocab, 30000), a.tokens)]
            decode_run(llm, dlg, depth, toks[:8])  # warm-up
            off, on = [], []
            for _ in range(a.reps):
                llm.set_score_window(0)
                off.append(decode_run(llm, dlg, depth, toks))
                llm.set_score_window(16)
                on.append(decode_run(llm, dlg, depth, toks))
                llm.reset_scores(dlg)
            llm.set_score_window(0)
            b_off, b_on = max(off), max(on)
            print(f"{'on' if fa else 'off':>3} {depth:>6} {b_off:>10.1f} {b_on:>10.1f} "
                  f"{100 * (b_off / b_on - 1):>8.1f}%", flush=True)
            llm.forget(dlg)
        llm.close()


if __name__ == "__main__":
    main()
