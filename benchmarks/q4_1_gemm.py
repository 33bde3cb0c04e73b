"""Prefill time of a Q4_1 model on the CPU with the weight products in register tiles (patch
0013, the default) against llama.cpp's vec_dot loop (LOOPSERVE_Q4_1_GEMM=0, what the
unpatched build runs), side by side in one process, the two alternating, on the same tokens.

    python benchmarks/q4_1_gemm.py [--model M.gguf] [--lengths 512,2048,4096,8192] \\
        [--threads 2] [--repeats 3] [--flash-attn both|on|off] [--decode 64] [--tiles 256] [--batch-invariant]

The prompt is real passages (the benchmark's shared data) when they are there, else random
token ids (the products' time does not depend on the values). Each length gets its own
context (n_batch 2048, n_ubatch 2048, n_ctx the prompt and the decoded tokens), one untimed
prefill in each mode first, then --repeats timed prefills in each mode, alternating. The table
gives the medians, the median and range of each repeat's ratio (loop / tiles), and whether the
two modes gave the same logits after the prompt, bit for bit (tests/test_q4_1_gemm.py compares
every position's). With --decode N, N decode
steps of one token each (one-row products: the vec_dot loop in both modes) are timed too.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loopserve_edge  # noqa: F401,E402  (llama.cpp's library before numpy)
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

from loopserve_edge.paths import default_model  # noqa: E402


def prompt_tokens(llm, n: int) -> tuple[list[int], str]:
    """n tokens of the shared data's passages (as prefill.py's ttft reads them), else random
    ids where the data is not there (the products' time does not depend on the values)."""
    try:
        from loopserve_edge.bench.data import passages_and_questions
        toks: list[int] = []
        for title, text, _ in passages_and_questions(100000):
            toks += llm.tokenize(f"{title}\n{text}\n\n".encode(), add_bos=not toks)
            if len(toks) >= n:
                return toks[:n], "real text (passages of the shared data)"
    except (OSError, SystemExit):
        pass
    rng = np.random.default_rng(0)
    return rng.integers(1000, llm.n_vocab() - 1, n).tolist(), "random token ids"


def run(model: str, n: int, threads: int, repeats: int, fa: bool, decode: int, tiles: str = "1",
        invariant: bool = False) -> dict:
    llm = llama_cpp.Llama(model, n_ctx=n + decode + 16, n_batch=2048, n_ubatch=2048, n_threads=threads,
                          n_threads_batch=threads, flash_attn=fa, verbose=False)
    if invariant:   # the server's default: ggml's CPU backend in its reference mode
        from loopserve_edge import bindings
        bindings.llama_loopserve_set_batch_invariant(llm._ctx.ctx, True)
    toks, source = prompt_tokens(llm, n + decode)
    prompt, follow = toks[:n], toks[n:]
    times = {"0": [], "1": []}
    dtimes = {"0": [], "1": []}
    logits = {}
    for k in range(repeats + 1):
        for mode in ("0", "1"):
            os.environ["LOOPSERVE_Q4_1_GEMM"] = tiles if mode == "1" else mode
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            dt = time.perf_counter() - t0
            if k == 0:
                logits[mode] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()
                continue
            times[mode].append(dt)
            if decode:
                t0 = time.perf_counter()
                for t in follow:
                    llm.eval([t])
                dtimes[mode].append(time.perf_counter() - t0)
    os.environ.pop("LOOPSERVE_Q4_1_GEMM", None)
    ratios = [a / b for a, b in zip(times["0"], times["1"])]
    row = {"n": n, "fa": fa, "loop": statistics.median(times["0"]), "tiles": statistics.median(times["1"]),
           "ratio": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios),
           "same": bool(np.array_equal(logits["0"], logits["1"])), "source": source}
    if decode:
        row["dec_loop"] = decode / statistics.median(dtimes["0"])
        row["dec_tiles"] = decode / statistics.median(dtimes["1"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", default="512,2048,4096,8192")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flash-attn", choices=["both", "on", "off"], default="both")
    ap.add_argument("--decode", type=int, default=0)
    ap.add_argument("--tiles", choices=["default", "256"], default="default",
                    help="256: the 256-bit tiles alone (what a machine with AVX2 but no AVX-512 runs)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="batch-invariant attention, as the server runs by default (flash attention on only)")
    a = ap.parse_args()
    if a.batch_invariant and a.flash_attn != "on":
        ap.error("--batch-invariant needs --flash-attn on")
    model = a.model or str(default_model())
    fas = {"both": [False, True], "on": [True], "off": [False]}[a.flash_attn]
    tiles = "256" if a.tiles == "256" else "1"
    rows = [run(model, int(n), a.threads, a.repeats, fa, a.decode, tiles, a.batch_invariant)
            for fa in fas for n in a.lengths.split(",")]
    print(f"model {Path(model).name}, {a.threads} threads, n_ubatch 2048, {a.repeats} timed prefills per mode, "
          f"{'256-bit tiles alone, ' if a.tiles == '256' else ''}"
          f"{'batch-invariant attention, ' if a.batch_invariant else ''}{rows[0]['source']}")
    head = "  length  flash attn  vec_dot loop s  tiles s  loop/tiles [range]  same logits"
    if a.decode:
        head += f"  decode tok/s ({a.decode} steps) loop / tiles"
    print(head)
    for r in rows:
        line = (f"  {r['n']:6d}  {'on' if r['fa'] else 'off':>10}  {r['loop']:14.3f}  {r['tiles']:7.3f}  "
                f"{r['ratio']:5.2f}x [{r['lo']:.2f}, {r['hi']:.2f}]  {'yes' if r['same'] else 'NO':>11}")
        if a.decode:
            line += f"  {r['dec_loop']:8.1f} / {r['dec_tiles']:.1f}"
        print(line)


if __name__ == "__main__":
    main()
