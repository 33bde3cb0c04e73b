"""Prefill time on the CPU with batch-invariant attention (the server's default) against the
stock path, side by side in one process on the same tokens, the modes alternating:

- `stock`: no batch invariance (llama.cpp's tiled flash attention, the Q4_1 tiles);
- `invariant`: batch-invariant attention as the runtime runs it (flash attention rows a tile of
  LOOPSERVE_FA_TILE tokens at a time, the Q4_1 weight products in tiles);
- `invariant, rows alone`: LOOPSERVE_FA_TILE=0 (each row by itself, all its blocks, then the next);
- `invariant, rows alone, vec_dot`: and LOOPSERVE_Q4_1_GEMM=0: the weight products in llama.cpp's
  loop, as batch invariance ran them before session 56 (with the rows alone: the runtime of then).

    python benchmarks/invariant_prefill.py [--model M.gguf] [--lengths 512,2048,4096] [--threads 2] [--repeats 3]
                                           [--decode N]

Each length gets one context per mode family (n_ctx the prompt, n_batch = n_ubatch 2048, flash
attention on), one untimed prefill per mode first, then --repeats timed ones. The invariant
modes must give the same logits after the prompt, bit for bit (each row sums as alone whatever
the tiles: tests/test_batch_decode.py checks every position against a token-at-a-time decode);
the table says whether they did. --decode N: each prefill is followed by N one-token steps (the
text's next tokens), timed apart: a second table of decoding speed at each prompt's depth.
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

from q4_1_gemm import prompt_tokens  # noqa: E402

from loopserve_edge import bindings  # noqa: E402
from loopserve_edge.paths import default_model  # noqa: E402

# mode -> (batch invariance, LOOPSERVE_FA_TILE, LOOPSERVE_Q4_1_GEMM)
MODES = {"stock": (False, None, None), "invariant": (True, None, None),
         "invariant, rows alone": (True, "0", None), "invariant, rows alone, vec_dot": (True, "0", "0")}


def run(model: str, n: int, threads: int, repeats: int, decode: int) -> dict:
    llms = {}
    for invariant in (False, True):
        llm = llama_cpp.Llama(model, n_ctx=n + decode + 16, n_batch=2048, n_ubatch=2048, n_threads=threads,
                              n_threads_batch=threads, flash_attn=True, verbose=False)
        if invariant:
            bindings.llama_loopserve_set_batch_invariant(llm.ctx, True)
        llms[invariant] = llm
    toks, source = prompt_tokens(llms[False], n + decode)
    toks, feed = toks[:n], toks[n:]   # the prompt, then the text's next tokens one step each
    times: dict[str, list[float]] = {m: [] for m in MODES}
    steps: dict[str, list[float]] = {m: [] for m in MODES}
    logits = {}
    for k in range(repeats + 1):
        for mode, (invariant, tile, gemm) in MODES.items():
            for var, val in (("LOOPSERVE_FA_TILE", tile), ("LOOPSERVE_Q4_1_GEMM", gemm)):
                if val is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = val
            llm = llms[invariant]
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(toks)
            dt = time.perf_counter() - t0
            if k == 0:
                logits[mode] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                                     shape=(llm.n_vocab(),)).copy()
            else:
                times[mode].append(dt)
            if feed:
                t0 = time.perf_counter()
                for t in feed:
                    llm.eval([t])
                if k > 0:
                    steps[mode].append(len(feed) / (time.perf_counter() - t0))
    for var in ("LOOPSERVE_FA_TILE", "LOOPSERVE_Q4_1_GEMM"):
        os.environ.pop(var, None)
    inv = [m for m, (i, _, _) in MODES.items() if i]
    return {"n": n, "source": source, "times": {m: statistics.median(t) for m, t in times.items()},
            "ranges": {m: (min(t), max(t)) for m, t in times.items()},
            "steps": {m: statistics.median(t) for m, t in steps.items() if t},
            "same": all(np.array_equal(logits[inv[0]], logits[m]) for m in inv[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", default="512,2048,4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", type=int, default=0,
                    help="then time this many one-token steps after each prompt (the text's next tokens)")
    a = ap.parse_args()
    model = a.model or str(default_model())
    rows = [run(model, int(n), a.threads, a.repeats, a.decode) for n in a.lengths.split(",")]
    print(f"model {Path(model).name}, {a.threads} threads, n_ubatch 2048, flash attention on, medians of "
          f"{a.repeats} prefills a mode (alternating), {rows[0]['source']}")
    print("| length | " + " | ".join(f"{m} s" for m in MODES) + " | invariant / stock | rows alone, vec_dot / "
          "invariant | invariant modes: same logits |")
    print("|---:|" + "---:|" * len(MODES) + "---:|---:|---|")
    for r in rows:
        t = r["times"]
        cells = " | ".join(f"{t[m]:.2f} [{r['ranges'][m][0]:.2f}-{r['ranges'][m][1]:.2f}]" for m in MODES)
        print(f"| {r['n']} | {cells} | {t['invariant'] / t['stock']:.2f}x | "
              f"{t['invariant, rows alone, vec_dot'] / t['invariant']:.2f}x | {'yes' if r['same'] else 'NO'} |")
    if a.decode:
        print(f"\ndecoding after the prompt: {a.decode} one-token steps, tokens/s, medians of {a.repeats}")
        print("| depth | " + " | ".join(f"{m} tok/s" for m in MODES) + " | invariant / stock |")
        print("|---:|" + "---:|" * len(MODES) + "---:|")
        for r in rows:
            d = r["steps"]
            print(f"| {r['n']} | " + " | ".join(f"{d[m]:.1f}" for m in MODES)
                  + f" | {d['invariant'] / d['stock']:.2f}x |")


if __name__ == "__main__":
    main()
