"""ctypes bindings to the llama_loopserve_* functions of the patched libllama.

Thin on purpose, like llama_cpp.llama_cpp: one Python function per C function, no
policy. The library is the one llama-cpp-python already loaded, so both see the same
contexts.
"""
from __future__ import annotations

import ctypes

from .errors import RuntimeBuildError

API_VERSION = 9

_HOW_TO_BUILD = (
    "loopserve-edge needs the patched llama-cpp-python runtime: run ./scripts/setup.sh "
    "(or python scripts/build_runtime.py) in the loopserve-edge checkout"
)

try:
    import llama_cpp
    import llama_cpp.llama_cpp as llama_c
except ImportError as e:  # pragma: no cover - exercised by users without the runtime
    raise RuntimeBuildError(f"llama-cpp-python is not installed ({e}); {_HOW_TO_BUILD}") from None

lib = llama_c._lib


def _bind(name: str, argtypes: list, restype):
    fn = getattr(lib, name, None)
    if fn is None:
        raise RuntimeBuildError(
            f"the installed llama-cpp-python {llama_cpp.__version__} ({lib._name}) is not the "
            f"loopserve-edge runtime (no {name}); {_HOW_TO_BUILD}")
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


llama_loopserve_api_version = _bind("llama_loopserve_api_version", [], ctypes.c_int32)
llama_loopserve_patch_hash = _bind("llama_loopserve_patch_hash", [], ctypes.c_char_p)
llama_loopserve_seq_n_cells = _bind(
    "llama_loopserve_seq_n_cells", [llama_c.llama_context_p_ctypes, ctypes.c_int32], ctypes.c_int32)
llama_loopserve_kv_bytes = _bind("llama_loopserve_kv_bytes", [llama_c.llama_context_p_ctypes], ctypes.c_int64)
llama_loopserve_set_batch_invariant = _bind("llama_loopserve_set_batch_invariant",
                                            [llama_c.llama_context_p_ctypes, ctypes.c_bool], ctypes.c_int32)
llama_loopserve_kv_tail = _bind("llama_loopserve_kv_tail", [llama_c.llama_context_p_ctypes], ctypes.c_int32)
llama_loopserve_kv_n_kv = _bind("llama_loopserve_kv_n_kv", [llama_c.llama_context_p_ctypes], ctypes.c_int32)

# observation-window attention scores (semantics in include/llama-loopserve.h)
_ctx = llama_c.llama_context_p_ctypes
_f32p = ctypes.POINTER(ctypes.c_float)
_i32p = ctypes.POINTER(ctypes.c_int32)
llama_loopserve_scores_set = _bind(
    "llama_loopserve_scores_set", [_ctx, ctypes.c_int32], ctypes.c_int32)
llama_loopserve_scores_window = _bind(
    "llama_loopserve_scores_window", [_ctx], ctypes.c_int32)
llama_loopserve_scores_save_queries = _bind(
    "llama_loopserve_scores_save_queries", [_ctx, ctypes.c_int32], ctypes.c_int32)
llama_loopserve_scores_flush = _bind(
    "llama_loopserve_scores_flush", [_ctx], ctypes.c_int32)
llama_loopserve_scores_n_saved = _bind(
    "llama_loopserve_scores_n_saved", [_ctx], ctypes.c_int32)
llama_loopserve_scores_reset = _bind(
    "llama_loopserve_scores_reset", [_ctx, ctypes.c_int32], None)
llama_loopserve_scores_n_rows = _bind(
    "llama_loopserve_scores_n_rows", [_ctx, ctypes.c_int32], ctypes.c_int64)
llama_loopserve_scores_get = _bind(
    "llama_loopserve_scores_get", [_ctx, ctypes.c_int32, _i32p, _f32p, ctypes.c_int32], ctypes.c_int32)
llama_loopserve_scores_n_head_kv = _bind(
    "llama_loopserve_scores_n_head_kv", [_ctx, ctypes.c_int32], ctypes.c_int32)
llama_loopserve_scores_get_layer = _bind(
    "llama_loopserve_scores_get_layer", [_ctx, ctypes.c_int32, ctypes.c_int32, _f32p, ctypes.c_int32],
    ctypes.c_int32)

llama_loopserve_scores_get_heads = _bind(
    "llama_loopserve_scores_get_heads", [_ctx, ctypes.c_int32, _f32p, ctypes.c_int64], ctypes.c_int32)
llama_loopserve_scores_set_heads = _bind(
    "llama_loopserve_scores_set_heads", [_ctx, ctypes.c_int32, _f32p, ctypes.c_int64, ctypes.c_int64], ctypes.c_int32)
llama_loopserve_value_norms = _bind(
    "llama_loopserve_value_norms", [_ctx, ctypes.c_int32, _f32p, ctypes.c_int64], ctypes.c_int32)

# bulk removal of a sequence's positions (patch 0006)
llama_loopserve_seq_rm_positions = _bind(
    "llama_loopserve_seq_rm_positions", [_ctx, ctypes.c_int32, _i32p, ctypes.c_int32], ctypes.c_int32)
llama_loopserve_can_compact_positions = _bind("llama_loopserve_can_compact_positions", [_ctx], ctypes.c_int32)
llama_loopserve_seq_compact_positions = _bind(
    "llama_loopserve_seq_compact_positions", [_ctx, ctypes.c_int32, ctypes.c_int32], ctypes.c_int32)
llama_loopserve_seq_keep_per_head = _bind(
    "llama_loopserve_seq_keep_per_head", [_ctx, ctypes.c_int32, _i32p, ctypes.c_int32], ctypes.c_int32)
_u8p = ctypes.POINTER(ctypes.c_uint8)
llama_loopserve_seq_hide = _bind(
    "llama_loopserve_seq_hide", [_ctx, ctypes.c_int32, _u8p, ctypes.c_int32, ctypes.c_int32], ctypes.c_int32)
llama_loopserve_seq_hidden = _bind(
    "llama_loopserve_seq_hidden", [_ctx, ctypes.c_int32, _u8p, ctypes.c_int64], ctypes.c_int32)
llama_loopserve_select_rows = _bind(
    "llama_loopserve_select_rows", [_f32p] + [ctypes.c_int32] * 7 + [_i32p], ctypes.c_int32)

# adaptive sparse prefill (semantics in include/llama-loopserve.h)
class llama_loopserve_prefill_params(ctypes.Structure):
    _fields_ = [("alpha", ctypes.c_float), ("last_q", ctypes.c_int32),
                ("n_min_vertical", ctypes.c_int32), ("n_max_vertical", ctypes.c_int32),
                ("n_min_slash", ctypes.c_int32), ("n_max_slash", ctypes.c_int32),
                ("n_sink", ctypes.c_int32), ("n_local", ctypes.c_int32),
                ("n_min_tokens", ctypes.c_int32), ("block_q", ctypes.c_int32),
                ("reuse", ctypes.c_int32)]


class llama_loopserve_prefill_stats(ctypes.Structure):
    _fields_ = [("n_ubatch_sparse", ctypes.c_int32), ("n_ubatch_stock", ctypes.c_int32),
                ("n_tokens_sparse", ctypes.c_int64), ("density", ctypes.c_double),
                ("t_sparse_ms", ctypes.c_double), ("t_estimate_ms", ctypes.c_double),
                ("t_attend_ms", ctypes.c_double), ("n_ubatch_cell_causal", ctypes.c_int32),
                ("t_select_ms", ctypes.c_double), ("n_ubatch_reused", ctypes.c_int32),
                ("n_layer_est_chain", ctypes.c_int32)]


class llama_loopserve_op_test(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int32) for n in (
                    "op", "gpu", "n_threads", "n_iter", "type_k", "type_v", "v_trans", "mask_f16",
                    "dk", "dv", "n_kv", "n_tokens", "n_head", "n_head_kv", "n_rows")]
                + [("scale", ctypes.c_float), ("softcap", ctypes.c_float),
                   ("block_q", ctypes.c_int32), ("cell_mod", ctypes.c_int32), ("alpha", ctypes.c_float)]
                + [(n, ctypes.c_int32) for n in ("n_min_v", "n_max_v", "n_min_s", "n_max_s", "n_sink", "n_local")]
                + [(n, _f32p) for n in ("q", "k", "v", "mask", "p", "scores")]
                + [("cells", _i32p), ("sel", _i32p), ("out", ctypes.c_void_p), ("t_ms", ctypes.c_double),
                   ("n_sel", ctypes.c_int32)])


_f64p = ctypes.POINTER(ctypes.c_double)
llama_loopserve_prefill_default_params = _bind(
    "llama_loopserve_prefill_default_params", [], llama_loopserve_prefill_params)
llama_loopserve_prefill_set = _bind(
    "llama_loopserve_prefill_set", [_ctx, ctypes.POINTER(llama_loopserve_prefill_params)], ctypes.c_int32)
llama_loopserve_prefill_set_profile = _bind(
    "llama_loopserve_prefill_set_profile", [_ctx, ctypes.c_bool], ctypes.c_int32)
llama_loopserve_prefill_stats_get = _bind(
    "llama_loopserve_prefill_stats_get", [_ctx, ctypes.POINTER(llama_loopserve_prefill_stats)], ctypes.c_int32)
llama_loopserve_prefill_stats_reset = _bind("llama_loopserve_prefill_stats_reset", [_ctx], None)
llama_loopserve_prefill_layer_pairs = _bind(
    "llama_loopserve_prefill_layer_pairs", [_ctx, _f64p, _f64p, ctypes.c_int32], ctypes.c_int32)
llama_loopserve_op_test_run = _bind(
    "llama_loopserve_op_test_run", [ctypes.POINTER(llama_loopserve_op_test)], ctypes.c_int32)

if llama_loopserve_api_version() != API_VERSION:
    raise RuntimeBuildError(
        f"the installed runtime has loopserve API {llama_loopserve_api_version()}, this "
        f"controller needs {API_VERSION}; {_HOW_TO_BUILD}")


def runtime_info() -> dict:
    """What the CLI's `info` shows about the build."""
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "patch_hash": llama_loopserve_patch_hash().decode(),
        "api_version": llama_loopserve_api_version(),
        "backend": "CUDA" if llama_c.llama_supports_gpu_offload() else "CPU",
        "library": lib._name,
    }
