"""Run the sparse prefill ops (and stock flash attention) on numpy arrays through
llama_loopserve_op_test_run, on the CPU or the GPU backend, plus numpy references of
what they compute. For the tests and the device benchmarks; see ggml-loopserve.h for the
exact semantics."""
from __future__ import annotations

import ctypes

import numpy as np

from . import bindings

GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}
OP_VS, OP_SELECT, OP_SPARSE, OP_FLASH = 0, 1, 2, 3
OP_ESTIMATE, OP_ESTIMATE_CHAIN = 4, 5  # fused estimation; the mul_mat/soft_max/vs_scores it replaces


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def _i32(a):
    return np.ascontiguousarray(a, dtype=np.int32)


def run(op: int, *, gpu=False, n_threads=2, n_iter=0, type_k="f16", type_v="f16", v_trans=False,
        mask_f16=False, q=None, k=None, v=None, mask=None, p=None, scores=None, cells=None, sel=None,
        n_head_kv=None, scale=1.0, softcap=0.0, block_q=64, cell_mod=1 << 30, alpha=0.95,
        n_min_v=0, n_max_v=0, n_min_s=0, n_max_s=0, n_sink=0, n_local=0):
    """Returns (output array, mean ms per run); raises if the backend lacks the op."""
    t = bindings.llama_loopserve_op_test()
    t.op, t.gpu, t.n_threads, t.n_iter = op, int(gpu), n_threads, n_iter
    t.type_k, t.type_v, t.v_trans, t.mask_f16 = GGML_TYPES[type_k], GGML_TYPES[type_v], int(v_trans), int(mask_f16)
    t.scale, t.softcap, t.block_q, t.cell_mod, t.alpha = scale, softcap, block_q, cell_mod, alpha
    t.n_min_v, t.n_max_v, t.n_min_s, t.n_max_s, t.n_sink, t.n_local = n_min_v, n_max_v, n_min_s, n_max_s, n_sink, n_local
    keep = []

    def ptr(a, kind):
        if a is None:
            return None
        a = _f32(a) if kind == "f" else _i32(a)
        keep.append(a)
        return a.ctypes.data_as(bindings._f32p if kind == "f" else bindings._i32p)

    if op in (OP_SPARSE, OP_FLASH):
        n_head, n_tokens, dk = q.shape
        n_head_kv, n_kv, _ = k.shape
        t.dk, t.dv, t.n_kv, t.n_tokens, t.n_head, t.n_head_kv = dk, v.shape[2], n_kv, n_tokens, n_head, n_head_kv
        t.q, t.k, t.v, t.mask = ptr(q, "f"), ptr(k, "f"), ptr(v, "f"), ptr(mask, "f")
        t.cells, t.sel = ptr(cells, "i"), ptr(sel, "i")
        t.n_sel = sel.shape[2] - 1 if sel is not None else 0   # a selection over fewer cells than n_kv
        shape = (n_tokens + 1, n_head, v.shape[2]) if op == OP_SPARSE else (n_tokens, n_head, v.shape[2])
        out = np.zeros(shape, np.float32)
    elif op in (OP_ESTIMATE, OP_ESTIMATE_CHAIN):
        n_head, n_tokens, dk = q.shape
        n_head_kv, n_kv, _ = k.shape
        t.dk, t.n_kv, t.n_tokens, t.n_head, t.n_head_kv = dk, n_kv, n_tokens, n_head, n_head_kv
        t.q, t.k, t.mask, t.cells = ptr(q, "f"), ptr(k, "f"), ptr(mask, "f"), ptr(cells, "i")
        out = np.zeros((n_head_kv, 2, n_kv), np.float32)
    elif op == OP_VS:
        n_head, n_rows, n_kv = p.shape
        t.n_kv, t.n_rows, t.n_head, t.n_head_kv = n_kv, n_rows, n_head, n_head_kv
        t.p, t.cells = ptr(p, "f"), ptr(cells, "i")
        out = np.zeros((n_head_kv, 2, n_kv), np.float32)
    else:
        n_head_kv, _, n_kv = scores.shape
        t.n_kv, t.n_head_kv = n_kv, n_head_kv
        t.scores = ptr(scores, "f")
        out = np.zeros((n_head_kv, 2, n_kv + 1), np.int32)
    t.out = out.ctypes.data_as(ctypes.c_void_p)
    if bindings.llama_loopserve_op_test_run(ctypes.byref(t)) != 0:
        raise RuntimeError(f"op {op} is not supported on the {'GPU' if gpu else 'CPU'} backend with these inputs")
    return out, t.t_ms


# -- numpy references -------------------------------------------------------------------

def causal_mask(cells: np.ndarray, n_kv: int) -> np.ndarray:
    """0 where key cell <= the row's cell, -inf elsewhere: [n_tokens, n_kv]."""
    j = np.arange(n_kv)[None, :]
    return np.where(j <= cells[:, None], 0.0, -np.inf).astype(np.float32)


def ref_vs_scores(p, cells, n_head_kv):
    n_head, n_rows, n_kv = p.shape
    g = n_head // n_head_kv
    out = np.zeros((n_head_kv, 2, n_kv), np.float64)
    for h in range(n_head):
        for r in range(n_rows):
            out[h // g, 0] += p[h, r]
            c = int(cells[r])
            s = np.arange(0, min(c, n_kv - 1) + 1)
            out[h // g, 1, s] += p[h, r, c - s]
    return out


def ref_probs(q, k, mask, scale=1.0, softcap=0.0, allowed=None):
    """softmax(scale * q k^T + mask) per head, [n_head, n_rows, n_kv] (softcap: the order of
    ggml_flash_attn_ext); optionally only where the boolean [n_head, n_rows, n_kv] `allowed`
    is set; a row that sees no key is 0."""
    n_head = q.shape[0]
    g = n_head // k.shape[0]
    p = np.zeros((n_head, q.shape[1], k.shape[1]), np.float64)
    for h in range(n_head):
        s = (q[h].astype(np.float64) @ k[h // g].T.astype(np.float64)) * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        if mask is not None:
            s = s + mask
        if allowed is not None:
            s = np.where(allowed[h], s, -np.inf)
        mx = np.max(s, axis=1, keepdims=True)
        e = np.where(np.isfinite(mx), np.exp(s - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
        den = e.sum(1, keepdims=True)
        p[h] = e / np.where(den > 0, den, 1.0)
    return p


def default_block(n_head, n_head_kv):
    """The runtime's query rows per block when prefill_block is None (llama-loopserve-prefill.cpp):
    a block's rows times a KV head's query heads fill one 64-row tile."""
    return max(16, 64 // (n_head // n_head_kv))


def ref_select(scores, alpha, n_min_v=0, n_max_v=0, n_min_s=0, n_max_s=0, n_sink=0, n_local=0):
    """[n_head_kv][2] lists of selected lines (ascending)."""
    res = []
    for x2 in scores:
        per = []
        for kind, x in enumerate(x2):
            n_min, n_max = (n_min_v, n_max_v) if kind == 0 else (n_min_s, n_max_s)
            force = n_sink if kind == 0 else n_local
            pos = np.flatnonzero(x > 0)
            order = pos[np.lexsort((pos, -x[pos]))]
            total = float(np.sum(x[pos], dtype=np.float64))
            csum = np.cumsum(x[order], dtype=np.float64)
            hit = np.flatnonzero(csum >= alpha * total)
            k = int(hit[0]) + 1 if len(hit) and alpha < 1.0 else len(order)
            k = max(k, n_min)
            if n_max > 0:
                k = min(k, n_max)
            k = min(k, len(order))
            sel = set(order[:k].tolist()) | set(range(min(force, len(x))))
            per.append(sorted(sel))
        res.append(per)
    return res


def sel_array(lists, n_kv):
    """[n_head_kv][2] lists -> the op's [n_head_kv, 2, n_kv + 1] int32 layout."""
    out = np.zeros((len(lists), 2, n_kv + 1), np.int32)
    for g, per in enumerate(lists):
        for kind, l in enumerate(per):
            out[g, kind, 0] = len(l)
            out[g, kind, 1:1 + len(l)] = l
    return out


def sparse_mask(lists, cells, n_kv, n_head, block_q):
    """The key sets of ggml_loopserve_sparse_attn as a boolean [n_head, n_tokens, n_kv]."""
    n_head_kv = len(lists)
    g = n_head // n_head_kv
    n_tokens = len(cells)
    m = np.zeros((n_head, n_tokens, n_kv), bool)
    for kv, (cols, offs) in enumerate(lists):
        for r0 in range(0, n_tokens, block_q):
            rows = slice(r0, min(n_tokens, r0 + block_q))
            lo, hi = int(cells[rows].min()), int(cells[rows].max())
            keys = np.zeros(n_kv, bool)
            keys[np.asarray(cols, int)] = True
            for s in offs:
                a, b = max(lo - s, 0), min(hi - s, n_kv - 1)
                if b >= a:
                    keys[a:b + 1] = True
            m[kv * g:(kv + 1) * g, rows] = keys
    return m


def ref_attention(q, k, v, mask, allowed=None, scale=1.0, softcap=0.0):
    """Dense attention [n_tokens, n_head, dv] with an additive mask [n_tokens, n_kv] and
    optionally a boolean [n_head, n_tokens, n_kv] of the keys each row may use."""
    p = ref_probs(q, k, mask, scale, softcap, allowed)
    g = q.shape[0] // k.shape[0]
    return np.stack([p[h] @ v[h // g].astype(np.float64) for h in range(q.shape[0])], axis=1)
