"""A head-wise cut's selection on the host (numpy) and on the device (cupy), side by side.

    python benchmarks/cut_select.py [--shapes 135m,1b,8b] [--cells 2176,8192,32768,131072]
        [--budget 2048] [--repeats 5]

For each shape (one row of scores per full-attention layer and KV head of
loopserve_edge.random_gguf's shapes) and dialogue length: random scores of that size,
`eviction.choose_keep_rows` with cupy_select "off" (on one thread, then as configured: blocks
of rows on several threads for large cuts) and "on", each timed from the host's
float32 scores to the host's kept indices (the copies to and from the device included), the
median of --repeats after one untimed call of each (the device's first call in the process is
printed apart: cupy compiles its kernels then, or reads them from its cache). The two must keep
the same cells, ties included (the scores are rounded to f16 so that many tie). 2176 cells is
budget + interval, the periodic cut of a 2048 budget; the longer ones, the cut after a long
prefill. Without cupy and a CUDA device, only the host's column.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

# The selection needs no llama.cpp: the package's __init__, which loads it, is skipped, so this
# runs where the runtime is not built (the GPU box before its five-minute build).
_pkg = types.ModuleType("loopserve_edge")
_pkg.__path__ = [str(Path(__file__).resolve().parent.parent / "loopserve_edge")]
sys.modules.setdefault("loopserve_edge", _pkg)

from loopserve_edge import cupy_device  # noqa: E402
from loopserve_edge.config import LoopServeConfig  # noqa: E402
from loopserve_edge import eviction  # noqa: E402
from loopserve_edge.eviction import CUPY_MIN_SCORES, choose_keep_rows  # noqa: E402

import numpy as np  # noqa: E402

# scored rows: full-attention layers x KV heads of random_gguf.SHAPES (which imports llama.cpp)
ROWS = {"135m": 30 * 3, "1b": 16 * 8, "3b": 28 * 8, "8b": 32 * 8}


def timed(rows, cfg, budget, repeats):
    times, got = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        got = choose_keep_rows(rows, cfg, budget)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="135m,1b,8b")
    ap.add_argument("--cells", default="2176,8192,32768,131072")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    cp = cupy_device.module()
    host = LoopServeConfig(policy="loopserve", budget=a.budget, granularity="head", cupy_select="off")
    dev = LoopServeConfig(policy="loopserve", budget=a.budget, granularity="head", cupy_select="on")
    where = f"cupy {cp.__version__} on {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}" if cp \
        else "no cupy or no CUDA device: host only"
    print(f"budget {a.budget}, pooling {host.pooling}, sink {host.sink}, recent {host.recent}; {where}; "
          f"median of {a.repeats}; cupy_select='auto' uses the device from {CUPY_MIN_SCORES} scores; the host "
          f"{eviction._host_pool()._max_workers} threads from {eviction.HOST_THREADS_MIN_SCORES} scores\n")
    print("| shape | rows | cells | scores | host, one thread ms | host ms | device ms (first call) | host / device "
          "| same cells |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    rng = np.random.default_rng(0)
    first = True
    for shape in a.shapes.split(","):
        h = ROWS[shape]
        for n in (int(x) for x in a.cells.split(",")):
            # attention-like scores, a few large and most small, rounded to f16's precision so
            # that many tie (the two paths must break ties alike), and a row with nothing scored
            rows = (rng.random((h, n), dtype=np.float32) ** 8).astype(np.float16).astype(np.float32)
            rows[0] = 0.0
            threads_min, eviction.HOST_THREADS_MIN_SCORES = eviction.HOST_THREADS_MIN_SCORES, 1 << 62
            choose_keep_rows(rows, host, a.budget)
            t_one, want = timed(rows, host, a.budget, a.repeats)
            eviction.HOST_THREADS_MIN_SCORES = threads_min
            choose_keep_rows(rows, host, a.budget)
            t_host, got_host = timed(rows, host, a.budget, a.repeats)
            assert np.array_equal(got_host, want), "the host's threads kept other cells"
            dev_cell, ratio, same = "-", "-", "-"
            if cp is not None:
                t0 = time.perf_counter()
                choose_keep_rows(rows, dev, a.budget)
                t_first = time.perf_counter() - t0
                t_dev, got = timed(rows, dev, a.budget, a.repeats)
                dev_cell = f"{t_dev * 1e3:.1f}" + (f" ({t_first * 1e3:.0f})" if first else "")
                ratio, same = f"{t_host / t_dev:.1f}x", "yes" if np.array_equal(got, want) else "NO"
                first = False
            print(f"| {shape} | {h} | {n} | {h * n} | {t_one * 1e3:.1f} | {t_host * 1e3:.1f} | {dev_cell} | {ratio} "
                  f"| {same} |", flush=True)


if __name__ == "__main__":
    main()
