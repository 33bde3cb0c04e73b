"""Where one prefill ubatch's time goes on the GPU, stock against sparse (issue 18: the sparse
path's "rest of the model" in `prefill.py ttft --profile` should be stock's own non-attention
work; this shows kernel by kernel whether it is). Run under NVIDIA's ncu, which this script
tells when to profile (cudaProfilerStart/Stop around the input's last ubatch only):

    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \\
        python benchmarks/prefill_kernels.py MODEL.gguf 32768 stock > stock.csv
    ncu ... python benchmarks/prefill_kernels.py MODEL.gguf 32768 sparse > sparse.csv
    python benchmarks/decode_kernels.py --table --steps 1 stock.csv sparse.csv

The selection is capped as in `prefill.py ttft` (1024 columns / 128 diagonals per KV head);
`--ubatch N` (4096). Without ncu it prints the last ubatch's wall time. Random weights at a
shape are for speed only.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loopserve_edge import Llama, LoopServeConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("length", type=int)
    ap.add_argument("mode", choices=("stock", "sparse"))
    ap.add_argument("--ubatch", type=int, default=4096)
    args = ap.parse_args()
    L, u = args.length, args.ubatch
    if L <= u or L % u:
        sys.exit("length must be a multiple of the ubatch, and more than one")
    cfg = LoopServeConfig(sparse_prefill=args.mode == "sparse", max_vertical=1024, max_slash=128, max_resident=1)
    llm = Llama(args.model, loopserve=cfg, n_ctx=L + 64, n_batch=u, n_ubatch=u, n_gpu_layers=-1, flash_attn=True)
    toks = [100 + (i * 7919) % 20000 for i in range(L)]
    d = llm.dialogue()
    llm.decode(d, toks[:L - u], list(range(L - u)))   # all but the last ubatch, not profiled
    try:
        cudart = ctypes.CDLL(ctypes.util.find_library("cudart") or "libcudart.so")
    except OSError:
        cudart = None    # no CUDA runtime here: the wall time only
    if cudart is not None:
        cudart.cudaProfilerStart()
    t0 = time.perf_counter()
    llm.decode(d, toks[L - u:], list(range(L - u, L)))
    dt = time.perf_counter() - t0
    if cudart is not None:
        cudart.cudaProfilerStop()
    st = llm.prefill_stats()
    print(f"# {args.mode}: the ubatch of cells {L - u}..{L - 1}, {dt * 1e3:.1f} ms (wall), "
          f"density {st['density']}, sparse ubatches {st['n_ubatch_sparse']}", file=sys.stderr)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
