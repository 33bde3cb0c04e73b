"""A head-wise cut's choice three ways: numpy, the runtime's C++ on the host, cupy on the device.

    python benchmarks/cut_select.py [--shapes 135m,1b,8b] [--cells 2176,8192,32768,131072]
        [--budget 2048] [--repeats 5]

For each shape (one row of scores per full-attention layer and KV head of
loopserve_edge.random_gguf's shapes) and dialogue length: random scores of that size, chosen
by numpy (`eviction._keep_rows` over blocks of 8 rows, one thread: the reference, and what
the device path runs through cupy), by `eviction.choose_keep_rows` with cupy_select "off" (the
runtime's llama_loopserve_select_rows on up to `eviction.HOST_THREADS` threads) and with "on"
(cupy), each timed from the host's float32 scores to the host's kept indices (the copies to and
from the device included), the median of --repeats after one untimed call of each (the device's
first call in the process is printed apart: cupy compiles its kernels then, or reads them from
its cache). All must keep the same cells, ties included (the scores are rounded to f16 so that
many tie). 2176 cells is budget + interval, the periodic cut of a 2048 budget; the longer ones,
the cut after a long prefill. Without cupy and a CUDA device, no device column. Needs the
runtime (the C++ choice is in it).
"""
from __future__ import annotations

import argparse
import statistics
import time

import loopserve_edge  # noqa: F401  the runtime, before numpy
from loopserve_edge import cupy_device, eviction
from loopserve_edge.config import LoopServeConfig
from loopserve_edge.eviction import choose_keep_rows
from loopserve_edge.random_gguf import SHAPES

import numpy as np

# scored rows: full-attention layers x KV heads of each shape
ROWS = {k: n_layer * n_head_kv for k, (_, n_layer, _, n_head_kv, _) in SHAPES.items()}


def timed(fn, repeats):
    times, got = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        got = fn()
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
          f"median of {a.repeats}; the runtime's "
          f"choice on {eviction.HOST_THREADS} threads\n")
    print("| shape | rows | cells | scores | numpy ms | runtime (C++) ms | device ms (first call) | numpy / runtime "
          "| runtime / device | same cells |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    rng = np.random.default_rng(0)
    first = True
    for shape in a.shapes.split(","):
        h = ROWS[shape]
        for n in (int(x) for x in a.cells.split(",")):
            # attention-like scores, a few large and most small, rounded to f16's precision so
            # that many tie (the paths must break ties alike), and a row with nothing scored
            rows = (rng.random((h, n), dtype=np.float32) ** 8).astype(np.float16).astype(np.float32)
            rows[0] = 0.0
            lo, hi = host.sink, n - host.recent
            by_numpy = lambda: np.concatenate([eviction._keep_rows(rows[i:i + 8], host.pooling, lo, hi, a.budget)  # noqa: E731
                                               for i in range(0, h, 8)])
            by_numpy()
            t_np, want = timed(by_numpy, a.repeats)
            choose_keep_rows(rows, host, a.budget)
            t_host, got_host = timed(lambda: choose_keep_rows(rows, host, a.budget), a.repeats)
            same = np.array_equal(got_host, want)
            dev_cell, ratio = "-", "-"
            if cp is not None:
                t0 = time.perf_counter()
                choose_keep_rows(rows, dev, a.budget)
                t_first = time.perf_counter() - t0
                t_dev, got = timed(lambda: choose_keep_rows(rows, dev, a.budget), a.repeats)
                dev_cell = f"{t_dev * 1e3:.1f}" + (f" ({t_first * 1e3:.0f})" if first else "")
                ratio, same = f"{t_host / t_dev:.2f}", same and np.array_equal(got, want)
                first = False
            print(f"| {shape} | {h} | {n} | {h * n} | {t_np * 1e3:.1f} | {t_host * 1e3:.1f} | {dev_cell} "
                  f"| {t_np / t_host:.1f}x | {ratio} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
