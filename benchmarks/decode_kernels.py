"""Where a decode step's time goes on the GPU at two cache sizes (issue 15's decode-speed target:
a step over ~2304 cells against one over ~311 at depth 0). Run under NVIDIA's ncu, which this
script tells when to profile (cudaProfilerStart/Stop around the timed steps only):

    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \\
        python benchmarks/decode_kernels.py MODEL.gguf 311 > k311.csv
    python benchmarks/decode_kernels.py --table k311.csv k2304.csv
    python benchmarks/decode_kernels.py --table --steps 1 stock.csv sparse.csv   (CSVs of one step)

Without ncu it prints the mean wall time of the steps (CUDA graphs as llama.cpp uses them);
`--steps N` times N steps instead of 8 (for wall times alone). Random weights at a shape are for
speed only.
"""
from __future__ import annotations

import csv
import ctypes
import ctypes.util
import sys
import time
from collections import defaultdict

STEPS = 8
UNIT_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def run(model: str, n_fill: int, steps: int = STEPS) -> None:
    from loopserve_edge import Llama

    llm = Llama(model, n_ctx=4096, n_gpu_layers=-1, flash_attn=True)
    d = llm.dialogue()
    llm.decode(d, [100 + i % 1000 for i in range(n_fill)], list(range(n_fill)))
    pos = n_fill
    for _ in range(32):              # warm-up: the step's CUDA graph captured and replayed
        llm.decode(d, [5], [pos])
        pos += 1
    try:
        cudart = ctypes.CDLL(ctypes.util.find_library("cudart") or "libcudart.so")
    except OSError:
        cudart = None    # no CUDA runtime here: wall times only
    if cudart is not None:
        cudart.cudaProfilerStart()
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.decode(d, [5], [pos])
        pos += 1
    dt = (time.perf_counter() - t0) / steps
    if cudart is not None:
        cudart.cudaProfilerStop()
    print(f"# {n_fill} cells filled, {steps} steps: {dt * 1e3:.4f} ms a step (wall)", file=sys.stderr)
    llm.close()


def table(paths: list[str], steps: int = STEPS) -> None:
    """Per kernel name: total GPU time per step (us) in each ncu CSV, side by side (`steps`: the
    steps each CSV profiled; 1 for benchmarks/prefill_kernels.py's one ubatch)."""
    cols = []
    for p in paths:
        per: dict[str, float] = defaultdict(float)
        with open(p) as f:
            lines = [ln for ln in f if ln.startswith('"')]
        for row in csv.DictReader(lines):
            if row.get("Metric Name") != "gpu__time_duration.sum":
                continue
            v = float(row["Metric Value"].replace(",", "")) * UNIT_US[row["Metric Unit"]]
            per[row["Kernel Name"].split("(")[0].split("<")[0]] += v
        cols.append({k: v / steps for k, v in per.items()})
    names = sorted(set().union(*cols), key=lambda k: -max(c.get(k, 0.0) for c in cols))
    print("| kernel | " + " | ".join(paths) + " |")
    print("|---|" + "---:|" * len(paths))
    for k in names:
        print(f"| {k[:60]} | " + " | ".join(f"{c.get(k, 0.0):.1f}" for c in cols) + " |")
    print("| **all, us a step** | " + " | ".join(f"{sum(c.values()):.1f}" for c in cols) + " |")


if __name__ == "__main__":
    if sys.argv[1] == "--table":
        if sys.argv[2:3] == ["--steps"]:
            table(sys.argv[4:], int(sys.argv[3]))
        else:
            table(sys.argv[2:])
    else:
        run(sys.argv[1], int(sys.argv[2]), int(sys.argv[4]) if sys.argv[3:4] == ["--steps"] else STEPS)
