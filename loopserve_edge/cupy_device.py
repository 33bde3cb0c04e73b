"""cupy, where it is installed (`pip install loopserve-edge[cuda]`) and a CUDA device is
visible: the array module that a head-wise cut's selection runs on with cupy_select="on"
(eviction.choose_keep_rows). By default the host (the runtime's C++) chooses, which measured
faster at every size (benchmarks/cut_select.py, benchmarks/results/cut-select.md)."""
from __future__ import annotations

import warnings

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


def disable(error: BaseException) -> None:
    """cupy failed at something other than memory (a wheel without the CUDA libraries it needs
    compiles no kernel, say): say so once, and let the host do the work from now on."""
    global _cupy
    _cupy = None
    warnings.warn(f"loopserve-edge: cupy failed ({type(error).__name__}: {error}); head-wise cuts "
                  "choose their cells on the host instead", RuntimeWarning, stacklevel=3)


def release(cp) -> None:
    """Give the blocks that cupy's pools keep back to the device and the host: llama.cpp's
    buffers need them more than a cut that runs now and then."""
    cp.get_default_memory_pool().free_all_blocks()
    cp.get_default_pinned_memory_pool().free_all_blocks()
