"""What a scored decode step costs against a plain one, by the cells it attends.

    python benchmarks/scored_step.py --model M.gguf --n-gpu-layers -1 --flash-attn \\
        [--cells 311,2048,8192] [--steps 200]

LoopServe scores the cache with the attention of the `window` decodes before each cut, and of
the first `defer_cut` generated tokens of a turn; a scored decode adds, per full-attention
layer, the window rows' Q·K^T, a softmax and a pooling to the graph, then reads the scores back
and adds them up on the host. For each cell count a dialogue is filled to it, then `--steps`
single-token decodes run plain, `--steps` scored (one long run: the steady state), and as
many in LoopServe's pattern (scoring on for 4 steps in 128, the default at budget 2048). Median
and mean step times in ms, and the scored steps' excess. Speed only: random weights serve.
`score_overhead.py` measures the steady state alone (best of repeats); the pattern here adds what
each switch of scoring costs, and --log-switches shows what the runtime does at a switch.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import loopserve_edge  # noqa: F401  before numpy: see tests/conftest.py
from loopserve_edge import LoopServeConfig
import llama_cpp.llama_cpp as llama_c
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import long_text, make  # noqa: E402


def steps(llm, dlg, n: int, window_of, tok: int) -> np.ndarray:
    """n single-token decodes, scored with the window window_of(i) (0: plain); seconds each."""
    dt = np.empty(n)
    pos = dlg.positions[-1] + 1
    for i in range(n):
        w = window_of(i)
        if w != llm.score_window:
            llm.set_score_window(w)
        t0 = time.perf_counter()
        llm.decode(dlg, [tok], [pos])
        llama_c.llama_synchronize(llm._ctx.ctx)
        dt[i] = time.perf_counter() - t0
        dlg.positions.append(pos)
        dlg.tokens.append(tok)
        pos += 1
    llm.set_score_window(0)
    return dt


def log_switches(llm, dlg, tok: int) -> None:
    """Steps plain, plain, scored x4, plain x3 with the debug log captured: the lines that
    mention graphs, allocations or reuse, each under the step that printed it."""
    import io
    from llama_cpp import _logger

    plan = [0, 0, 1, 1, 1, 1, 0, 0, 0]
    _logger.set_verbose(True)
    real, sys.stderr = sys.stderr, io.StringIO()
    try:
        for i, w in enumerate(plan):
            print(f"--- step {i} ({'scored' if w else 'plain'})", file=sys.stderr)
            t = steps(llm, dlg, 1, lambda _: w, tok)
            print(f"--- {1e3 * t[0]:.3f} ms", file=sys.stderr)
    finally:
        text, sys.stderr = sys.stderr.getvalue(), real
        _logger.set_verbose(False)
    keys = ("---", "graph", "Graph", "reuse", "alloc", "warmup", "split")
    for line in text.splitlines():
        if any(k in line for k in keys):
            print("    " + line[:200])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--cells", default="311,2048,8192")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--log-switches", action="store_true",
                    help="print llama.cpp's and ggml's debug lines about graphs around two scoring "
                         "switches (why a switch costs more than a steady scored step)")
    a = ap.parse_args()
    cells = [int(x) for x in a.cells.split(",")]
    n_ctx = max(cells) + 4 * a.steps + 256
    llm = make(a.model, LoopServeConfig(max_resident=1), a, n_ctx)
    count = lambda t: len(llm.tokenize(t))  # noqa: E731
    toks = llm.tokenize(long_text(max(cells) + 64, count))
    tok = toks[1]
    print(f"# scored vs. plain decode steps: {Path(a.model).name}, n_gpu_layers {a.n_gpu_layers}, "
          f"flash_attn {a.flash_attn}, {a.steps} steps a row; ms a step")
    print("| cells | plain (median / mean) | scored, steady (median / mean) | pattern 4 in 128: "
          "scored / plain steps (mean) | scored excess, steady / pattern |")
    print("|---:|---:|---:|---:|---:|")
    for n in cells:
        dlg = llm.dialogue()
        llm.make_resident(dlg)
        dlg.positions, dlg.tokens = [], []
        pos = list(range(n))
        llm.decode(dlg, toks[:n], pos)
        dlg.positions, dlg.tokens = pos, list(toks[:n])
        steps(llm, dlg, 32, lambda i: 0, tok)  # warm: CUDA graphs, allocations
        steps(llm, dlg, 8, lambda i: 1, tok)
        plain = steps(llm, dlg, a.steps, lambda i: 0, tok)
        scored = steps(llm, dlg, a.steps, lambda i: 1, tok)
        pattern = steps(llm, dlg, 2 * a.steps, lambda i: 1 if i % 128 >= 124 else 0, tok)
        on = (np.arange(len(pattern)) % 128) >= 124
        ms = lambda x: 1e3 * x  # noqa: E731
        print(f"| {n} | {ms(np.median(plain)):.3f} / {ms(plain.mean()):.3f} | "
              f"{ms(np.median(scored)):.3f} / {ms(scored.mean()):.3f} | "
              f"{ms(pattern[on].mean()):.3f} / {ms(pattern[~on].mean()):.3f} | "
              f"{ms(np.median(scored) - np.median(plain)):+.3f} / "
              f"{ms(pattern[on].mean() - pattern[~on].mean()):+.3f} |", flush=True)
        if a.log_switches:
            log_switches(llm, dlg, tok)
        llm.reset_scores()
        dlg.close()
    llm.close()


if __name__ == "__main__":
    main()
