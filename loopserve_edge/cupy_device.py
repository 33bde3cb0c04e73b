"""cupy, where it is installed (`pip install loopserve-edge[cuda]`) and a CUDA device is
visible: the array module that a head-wise cut's selection runs on when its scores are large
(eviction.choose_keep_rows; the sizes where that pays: benchmarks/cut_select.py). numpy stays
the path everywhere else."""
from __future__ import annotations

_cupy = False  # not looked for yet


def module():
    """The cupy module, or None without cupy or without a device it can use."""
    global _cupy
    if _cupy is False:
        try:
            import cupy
            _cupy = cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
        except Exception:  # not installed, no driver, no device: the host does the work
            _cupy = None
    return _cupy


def release() -> None:
    """Give the blocks cupy's pool keeps back to the device: llama.cpp's buffers need them
    more than a cut that runs now and then."""
    if _cupy:
        _cupy.get_default_memory_pool().free_all_blocks()
        _cupy.get_default_pinned_memory_pool().free_all_blocks()
