"""Adaptive vertical-slash sparse prefill: the ggml ops on the CPU backend against numpy
(through llama_loopserve_op_test_run), and the model path end to end."""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
from conftest import GPU_LAYERS

from loopserve_edge import LoopServeConfig
from loopserve_edge import sparse_ops as so
from loopserve_edge.random_gguf import write_random_llama

RNG = np.random.default_rng


def qkv(seed, n_head, n_head_kv, n_tokens, n_kv, d):
    r = RNG(seed)
    q = r.standard_normal((n_head, n_tokens, d)).astype(np.float32)
    k = r.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    v = r.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    return q, k, v


def f16(x):
    return x.astype(np.float16).astype(np.float32)


# -- sparse attention op ------------------------------------------------------------------

@pytest.mark.parametrize("type_k,v_trans", [("f32", False), ("f16", False), ("f16", True)])
def test_all_lines_equal_dense(type_k, v_trans):
    """Every column selected (or every diagonal): dense causal attention."""
    n_head, n_head_kv, n_tok, d = 6, 2, 150, 64
    start = 37  # the prompt follows 37 cells of history
    n_kv = start + n_tok + 5
    q, k, v = qkv(0, n_head, n_head_kv, n_tok, n_kv, d)
    cells = np.arange(start, start + n_tok)
    mask = so.causal_mask(cells, n_kv)
    scale = 1 / np.sqrt(d)
    kk, vv = (k, v) if type_k == "f32" else (f16(k), f16(v))
    want = so.ref_attention(q if type_k == "f32" else f16(q), kk, vv, mask, scale=scale)
    for lists in ([[list(range(n_kv)), []]] * n_head_kv, [[[], list(range(n_kv))]] * n_head_kv):
        out, _ = so.run(so.OP_SPARSE, q=q, k=k, v=v, mask=mask, cells=cells, sel=so.sel_array(lists, n_kv),
                        type_k=type_k, type_v=type_k, v_trans=v_trans, scale=scale)
        np.testing.assert_allclose(out[:n_tok], want, rtol=2e-3, atol=2e-3)
        # statistics row: everything causal computed
        causal = float(np.sum(cells + 1))
        np.testing.assert_allclose(out[n_tok, :, 0], causal, rtol=1e-6)
        np.testing.assert_allclose(out[n_tok, :, 1], causal, rtol=1e-6)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("n_head,n_head_kv,d,block_q", [(4, 4, 32, 16), (6, 2, 64, 64), (8, 1, 32, 32)])
def test_random_selection_equals_masked_dense(seed, n_head, n_head_kv, d, block_q):
    """Hand-built selections: dense attention under the equivalent mask, and the stats."""
    r = RNG(seed)
    n_tok = 97 + seed          # not a multiple of the block
    start = int(r.integers(0, 50))
    n_kv = start + n_tok + 3
    q, k, v = qkv(seed, n_head, n_head_kv, n_tok, n_kv, d)
    cells = np.arange(start, start + n_tok)
    mask = so.causal_mask(cells, n_kv)
    lists = []
    for _ in range(n_head_kv):
        cols = sorted(set(r.integers(0, n_kv, int(r.integers(0, 20))).tolist()))
        offs = sorted(set(r.integers(0, n_kv, int(r.integers(1, 15))).tolist()) | {0})
        lists.append([cols, offs])
    allowed = so.sparse_mask(lists, cells, n_kv, n_head, block_q)
    scale = 0.3
    want = so.ref_attention(q, k, v, mask, allowed, scale=scale, softcap=0.0)
    out, _ = so.run(so.OP_SPARSE, q=q, k=k, v=v, mask=mask, cells=cells, sel=so.sel_array(lists, n_kv),
                    type_k="f32", type_v="f32", scale=scale, block_q=block_q)
    np.testing.assert_allclose(out[:n_tok], want, rtol=1e-4, atol=1e-5)
    # computed pairs: allowed keys at or before each row's cell
    comp = (allowed & (np.arange(n_kv)[None, None, :] <= cells[None, :, None])).sum(axis=(1, 2))
    np.testing.assert_allclose(out[n_tok, :, 0], comp, rtol=1e-6)


def test_a_selection_over_fewer_cells_serves_a_longer_cache():
    """A selection made over the first n_sel cells (the previous ubatch's, reused) is read
    with its own row length: the same key sets as that selection written out for all n_kv."""
    r = RNG(5)
    n_head, n_head_kv, d, block_q, n_tok = 6, 2, 32, 16, 80
    n_sel, n_kv = 150, 230
    q, k, v = qkv(5, n_head, n_head_kv, n_tok, n_kv, d)
    cells = np.arange(n_kv - n_tok, n_kv)
    lists = [[sorted(set(r.integers(0, n_sel, 12).tolist())), sorted(set(r.integers(0, n_sel, 6).tolist()) | {0})]
             for _ in range(n_head_kv)]
    kw = dict(q=q, k=k, v=v, mask=None, cells=cells, type_k="f16", type_v="f16", scale=0.3, block_q=block_q)
    short, _ = so.run(so.OP_SPARSE, sel=so.sel_array(lists, n_sel), **kw)
    full, _ = so.run(so.OP_SPARSE, sel=so.sel_array(lists, n_kv), **kw)
    np.testing.assert_array_equal(short, full)
    want = so.ref_attention(f16(q), f16(k), f16(v), so.causal_mask(cells, n_kv),
                            so.sparse_mask(lists, cells, n_kv, n_head, block_q), scale=0.3)
    np.testing.assert_allclose(short[:n_tok], want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("v_trans", [False, True])
def test_key_sets_longer_than_a_cpu_chunk(v_trans):
    """Key sets spanning many of the CPU kernel's 64-key chunks (online softmax across them,
    peaky scores), with the mask and without it (causal in cells: the same numbers)."""
    n_head, n_head_kv, n_tok, d, block_q = 6, 2, 40, 64, 16
    start = 2600
    n_kv = start + n_tok
    q, k, v = qkv(5, n_head, n_head_kv, n_tok, n_kv, d)
    cells = np.arange(start, start + n_tok)
    mask = so.causal_mask(cells, n_kv)
    lists = [[list(range(0, n_kv, 2)), list(range(64))], [list(range(1, n_kv, 3)), list(range(0, 900, 7))]]
    allowed = so.sparse_mask(lists, cells, n_kv, n_head, block_q)
    scale = 0.5
    want = so.ref_attention(q, k, v, mask, allowed, scale=scale, softcap=0.0)
    kw = dict(q=q, k=k, v=v, cells=cells, sel=so.sel_array(lists, n_kv), type_k="f32", type_v="f32",
              v_trans=v_trans, scale=scale, block_q=block_q)
    out, _ = so.run(so.OP_SPARSE, mask=mask, **kw)
    np.testing.assert_allclose(out[:n_tok], want, rtol=1e-4, atol=1e-5)
    bare, _ = so.run(so.OP_SPARSE, mask=None, **kw)
    np.testing.assert_array_equal(bare, out)


@pytest.mark.parametrize("v_trans", [False, True])
@pytest.mark.parametrize("n_head,n_head_kv,d,block_q", [(3, 1, 18, 5), (10, 2, 40, 7)])
def test_shapes_off_the_cpu_kernels_blocks(v_trans, n_head, n_head_kv, d, block_q):
    """Head dims that are not whole vectors or register blocks (18, 40: f16 conversion and the
    output product's remainders), blocks whose pairs fill no whole vector (15, 35 lanes), a
    last block of 2 rows, f16 K and V in both V layouts; with the mask and without it."""
    r = RNG(11)
    n_tok, start = 5 * block_q + 2, 70
    n_kv = start + n_tok
    q, k, v = qkv(11, n_head, n_head_kv, n_tok, n_kv, d)
    cells = np.arange(start, start + n_tok)
    mask = so.causal_mask(cells, n_kv)
    lists = [[sorted(set(r.integers(0, n_kv, 25).tolist())), sorted(set(r.integers(0, n_kv, 9).tolist()) | {0, 1})]
             for _ in range(n_head_kv)]
    allowed = so.sparse_mask(lists, cells, n_kv, n_head, block_q)
    want = so.ref_attention(f16(q), f16(k), f16(v), mask, allowed, scale=0.4, softcap=0.0)
    kw = dict(q=q, k=k, v=v, cells=cells, sel=so.sel_array(lists, n_kv), type_k="f16", type_v="f16",
              v_trans=v_trans, scale=0.4, block_q=block_q)
    out, _ = so.run(so.OP_SPARSE, mask=mask, **kw)
    np.testing.assert_allclose(out[:n_tok], want, rtol=2e-3, atol=2e-3)
    bare, _ = so.run(so.OP_SPARSE, mask=None, **kw)
    np.testing.assert_array_equal(bare, out)


def test_softcap_q8_0_and_f16_mask():
    n_head, n_head_kv, n_tok, d = 4, 2, 70, 32
    n_kv = n_tok
    q, k, v = qkv(7, n_head, n_head_kv, n_tok, n_kv, d)
    cells = np.arange(n_tok)
    mask = so.causal_mask(cells, n_kv)
    lists = [[[0, 5, 9], [0, 1, 2, 30]], [[3], [0, 4]]]
    allowed = so.sparse_mask(lists, cells, n_kv, n_head, 64)
    want = so.ref_attention(q, k, v, mask, allowed, scale=0.5, softcap=3.0)
    out, _ = so.run(so.OP_SPARSE, q=q, k=k, v=v, mask=mask, cells=cells, sel=so.sel_array(lists, n_kv),
                    type_k="q8_0", type_v="q8_0", mask_f16=True, scale=0.5, softcap=3.0)
    np.testing.assert_allclose(out[:n_tok], want, atol=6e-2)  # q8_0 rounding of Q, K and V


def test_cells_modulo_stream_offset():
    """q_cells of stream s are offset by s * size: taken modulo cell_mod."""
    n_head, n_tok, n_kv, d = 2, 40, 50, 32
    q, k, v = qkv(9, n_head, n_head, n_tok, n_kv, d)
    cells = np.arange(10, 10 + n_tok)
    mask = so.causal_mask(cells, n_kv)
    lists = [[[1, 2], [0, 3]]] * n_head
    a, _ = so.run(so.OP_SPARSE, q=q, k=k, v=v, mask=mask, cells=cells, sel=so.sel_array(lists, n_kv),
                  type_k="f32", type_v="f32", cell_mod=512)
    b, _ = so.run(so.OP_SPARSE, q=q, k=k, v=v, mask=mask, cells=cells + 3 * 512, sel=so.sel_array(lists, n_kv),
                  type_k="f32", type_v="f32", cell_mod=512)
    np.testing.assert_array_equal(a, b)


# -- estimation and selection ops -------------------------------------------------------------

@pytest.mark.parametrize("n_head,n_head_kv", [(4, 4), (6, 2)])
def test_vs_scores_match_numpy(n_head, n_head_kv):
    r = RNG(4)
    n_rows, n_kv = 9, 130
    p = r.random((n_head, n_rows, n_kv)).astype(np.float32)
    cells = np.arange(n_kv - n_rows - 4, n_kv - 4)
    out, _ = so.run(so.OP_VS, p=p, cells=cells, n_head_kv=n_head_kv)
    np.testing.assert_allclose(out, so.ref_vs_scores(p, cells, n_head_kv), rtol=1e-5, atol=1e-5)


# 37 rows at 4 query heads a KV head: three of the CPU op's tasks of 16 rows, the last partial
@pytest.mark.parametrize("n_head,n_head_kv,d,softcap,n_rows", [(4, 4, 64, 0.0, 11), (6, 2, 128, 0.0, 11),
                                                                (8, 2, 64, 30.0, 11), (8, 2, 40, 0.0, 37)])
def test_fused_estimate_matches_numpy(n_head, n_head_kv, d, softcap, n_rows):
    # vs_estimate = vs_scores of the softmax; K goes to f16 (and Q with it for the dot)
    r = RNG(7)
    n_kv = 203
    q = r.standard_normal((n_head, n_rows, d)).astype(np.float32)
    k = r.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    cells = np.arange(n_kv - n_rows - 5, n_kv - 5)
    mask = so.causal_mask(cells, n_kv)
    mask[3] = -np.inf  # a row that sees nothing adds nothing
    scale = 1 / np.sqrt(d)
    out, _ = so.run(so.OP_ESTIMATE, q=q, k=k, mask=mask, cells=cells, type_k="f16", scale=scale, softcap=softcap)
    p = so.ref_probs(q.astype(np.float16), k.astype(np.float16), mask, scale, softcap)
    ref = so.ref_vs_scores(p, cells, n_head_kv)
    np.testing.assert_allclose(out, ref, rtol=2e-3, atol=2e-5)
    assert ref[:, 0].sum() == pytest.approx(n_head * (n_rows - 1), rel=1e-6)
    # the chain it replaces agrees where every row sees a key
    mask[3] = so.causal_mask(cells[3:4], n_kv)[0]
    fused, _ = so.run(so.OP_ESTIMATE, q=q, k=k, mask=mask, cells=cells, type_k="f16", scale=scale, softcap=softcap)
    chain, _ = so.run(so.OP_ESTIMATE_CHAIN, q=q, k=k, mask=mask, cells=cells, type_k="f16", scale=scale,
                      softcap=softcap)
    np.testing.assert_allclose(fused, chain, rtol=2e-3, atol=2e-5)


def test_no_mask_is_causal_in_cells():
    # without a mask the ops let a row see the keys whose cell is <= its own
    r = RNG(8)
    n_head, n_head_kv, d, n_tok, n_kv = 4, 2, 64, 70, 150
    q = r.standard_normal((n_head, n_tok, d)).astype(np.float32)
    k = r.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    v = r.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    cells = np.arange(n_kv - n_tok - 9, n_kv - 9)
    mask = so.causal_mask(cells, n_kv)
    lists = [[sorted(r.choice(n_kv, 20, replace=False).tolist()), sorted({0, 1, 2, 7, 30, 64})]
             for _ in range(n_head_kv)]
    kw = dict(q=q, k=k, v=v, cells=cells, sel=so.sel_array(lists, n_kv), type_k="f16", type_v="f16", block_q=16)
    a, _ = so.run(so.OP_SPARSE, mask=mask, **kw)
    b, _ = so.run(so.OP_SPARSE, mask=None, **kw)
    np.testing.assert_array_equal(a, b)
    ekw = dict(q=q[:, -16:], k=k, cells=cells[-16:], type_k="f16", scale=0.125)
    a, _ = so.run(so.OP_ESTIMATE, mask=mask[-16:], **ekw)
    b, _ = so.run(so.OP_ESTIMATE, mask=None, **ekw)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_ops_est_only_times_the_fused_estimation():
    # benchmarks/prefill.py ops --est-only (the estimation kernel's A/B on the GPU box): one row
    # a length, the fused estimation's time and nothing else
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks/prefill.py"
    r = subprocess.run([sys.executable, str(script), "ops", "--cpu", "--shape", "135m", "--lengths", "256,600",
                        "--est-only", "--iters", "1", "--threads", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["256", "600"]
    for row in rows:
        assert len(row) == 10 and float(row[8]) > 0
        assert set(row[1:8]) == {"-"} and row[9] == "-"


def test_select_alpha_clamps_sinks_local():
    r = RNG(5)
    n_kv, n_head_kv = 300, 3
    sc = (r.random((n_head_kv, 2, n_kv)) ** 8).astype(np.float32)
    sc[:, :, 250:] = 0.0  # lines without mass are never chosen by score
    for kw in (dict(alpha=0.5), dict(alpha=0.9), dict(alpha=1.0),
               dict(alpha=0.5, n_min_v=40, n_min_s=7), dict(alpha=0.99, n_max_v=10, n_max_s=3),
               dict(alpha=0.3, n_sink=4, n_local=64), dict(alpha=1.0, n_min_v=280)):
        out, _ = so.run(so.OP_SELECT, scores=sc, **kw)
        want = so.ref_select(sc, **kw)
        for g in range(n_head_kv):
            for kind in range(2):
                n = out[g, kind, 0]
                got = out[g, kind, 1:1 + n].tolist()
                assert got == want[g][kind], (kw, g, kind)
    # alpha semantics directly: the selection reaches alpha of the mass with the fewest lines
    out, _ = so.run(so.OP_SELECT, scores=sc, alpha=0.8)
    for g in range(n_head_kv):
        for kind in range(2):
            x = sc[g, kind]
            sel = out[g, kind, 1:1 + out[g, kind, 0]]
            assert x[sel].sum() >= 0.8 * x.sum() * (1 - 1e-6)
            rest = np.sort(x[sel])[1:]  # dropping the weakest must fall below alpha
            assert rest.sum() < 0.8 * x.sum()
    # alpha = 1: every line with mass, none without
    out, _ = so.run(so.OP_SELECT, scores=sc, alpha=1.0)
    assert out[0, 0, 0] == np.count_nonzero(sc[0, 0])


# -- end to end ---------------------------------------------------------------------------

SHAPE = dict(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=128)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("models") / "prefill.gguf", seed=11, std=0.05,
                              qk_std=0.35, embd_std=1.0, **SHAPE)


@pytest.fixture(scope="module")
def flat_model(tmp_path_factory):
    # N(0, 0.02) weights: every probability of the estimation rows is far from f32 underflow,
    # so alpha = 1 really selects every column (a peaked model may round some to 0)
    return write_random_llama(tmp_path_factory.mktemp("models") / "flat.gguf", seed=12, **SHAPE)


# alpha = 1 and no lines added: the sparse path computes the stock path's attention
ALL_LINES = LoopServeConfig(sparse_prefill=True, alpha=1.0, min_vertical=0, min_slash=0, local_window=0,
                            prefill_sink=0, sparse_min_tokens=100, last_q=16)


def tokens(seed, n):
    return [int(t) for t in RNG(seed).integers(0, 256, n)]


def prefill(llm, toks, history=0):
    dlg = llm.dialogue()
    if history:
        llm.decode(dlg, toks[:history], list(range(history)))
    logits = llm.decode(dlg, toks[history:], list(range(history, len(toks))))
    return logits, llm.prefill_stats()


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_alpha_one_matches_stock(flat_model, make_llm, flash_attn):
    """alpha = 1 selects every column the last row sees: the stock path's logits."""
    toks = tokens(1, 300)
    kw = dict(n_ctx=512, n_batch=256, n_ubatch=256, flash_attn=flash_attn)
    model = flat_model
    stock = make_llm(model, **kw)
    want, st0 = prefill(stock, toks, history=40)
    assert st0["n_ubatch_sparse"] == 0
    sparse = make_llm(model, loopserve=ALL_LINES, **kw)
    got, st = prefill(sparse, toks, history=40)
    assert st["n_ubatch_sparse"] == 1 and st["n_tokens_sparse"] == 256
    assert st["n_ubatch_cell_causal"] == 1  # one sequence, cells in position order
    assert st["n_ubatch_stock"] == 1  # the 4-token tail
    assert st["density"] == pytest.approx(1.0)
    assert all(d == pytest.approx(1.0) for d in st["layer_density"])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("flash_attn,saved", [(False, True), (True, True), (True, False)],
                         ids=["fa-off", "fa-on", "fa-on-eager"])
def test_a_sparse_prefill_scores_the_cache_as_the_stock_one(flat_model, make_llm, flash_attn, saved):
    """The cut after a sparse prefill is scored by the input's last tokens as after a stock
    one: its layers compute the window's scores too (they used to skip them, and the cut then
    chose its cells blindly). A ubatch that scores in its graph keeps its mask for them; with
    flash attention its rows' queries are saved (scored when read, with a mask of their own), so
    it goes without the mask where its cells are causal."""
    toks = tokens(2, 300)
    kw = dict(n_ctx=512, n_batch=512, n_ubatch=512, flash_attn=flash_attn)
    got = {}
    for name, cfg in (("stock", LoopServeConfig(saved_queries=saved)),
                      ("sparse", replace(ALL_LINES, saved_queries=saved))):
        llm = make_llm(flat_model, loopserve=cfg, **kw)
        d = llm.dialogue()
        llm.set_score_window(4)
        llm.decode(d, toks, list(range(len(toks))))
        got[name] = llm.attention_scores_by_head(d), llm.prefill_stats()
    (pos_s, rows_s), _ = got["stock"]
    (pos_p, rows_p), st = got["sparse"]
    assert st["n_ubatch_sparse"] == 1 and st["n_ubatch_cell_causal"] == int(flash_attn and saved)
    assert list(pos_s) == list(pos_p) and rows_s.shape == rows_p.shape and rows_s.sum() > 0
    np.testing.assert_allclose(rows_p, rows_s, rtol=2e-3, atol=1e-5)


def test_alpha_one_matches_stock_with_holes(flat_model, make_llm):
    """Cells freed in the middle of the history take the new input's first tokens, out of
    position order: the KQ mask is then no longer causal in cells, and the sparse path must
    keep reading it (on the GPU it otherwise does without it) to match the stock path."""
    toks = tokens(3, 300)
    kw = dict(n_ctx=512, n_batch=256, n_ubatch=256, flash_attn=True)

    def run(llm):
        dlg = llm.dialogue()
        llm.decode(dlg, toks[:40], list(range(40)))
        llm.remove_positions(dlg._seq, 10, 20)
        return llm.decode(dlg, toks[40:], list(range(40, 300))), llm.prefill_stats()

    want, _ = run(make_llm(flat_model, **kw))
    got, st = run(make_llm(flat_model, loopserve=ALL_LINES, **kw))
    assert st["n_ubatch_sparse"] == 1 and st["n_ubatch_cell_causal"] == 0
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-3)


def gemma_256(tmp_path, n_head=4):
    """A tiny Gemma 3 at its head dim, 256: layers 1 and 3 full attention, 0 and 2 a window of 32."""
    from loopserve_edge.random_gguf import write_random_gemma3

    return write_random_gemma3(tmp_path / "g256.gguf", n_layer=4, n_embd=256, n_head=n_head, n_head_kv=1,
                               head_dim=256, n_swa=32, swa_pattern=2)


@pytest.mark.parametrize("flash_attn,smem", [(False, None), (True, None), (True, 48 * 1024)],
                         ids=["fa-off", "fa-on", "fa-on-48kib"])
def test_alpha_one_matches_stock_at_head_dim_256(tmp_path, make_llm, monkeypatch, flash_attn, smem):
    """Gemma 3's head dim (on the GPU, the tensor-core kernel's variant with Q in shared
    memory): the full-attention layers run sparse, the sliding-window ones stock, and the
    logits are the stock path's.
    48kib: GPUs before sm_70 give a block 48 KiB of shared memory (LOOPSERVE_CUDA_SMEM_MAX makes
    this GPU such a one). There the fused estimation does not fit even without a mask (4 warps:
    87 KiB), nor does the tensor-core attention (71 KiB: the SIMT kernel runs) or the selection
    (64 KiB: the scheduler runs it on the CPU). The estimation takes stock ops on the device,
    reading the mask although the ubatch is causal in cells. The estimation and the selection
    assert at launch that they fit, so one that reached a launch would abort. On the CPU the cap
    changes nothing."""
    if smem is not None:
        monkeypatch.setenv("LOOPSERVE_CUDA_SMEM_MAX", str(smem))
    model = gemma_256(tmp_path)
    toks = tokens(6, 300)
    kw = dict(n_ctx=512, n_batch=256, n_ubatch=256, flash_attn=flash_attn)
    want, _ = prefill(make_llm(model, **kw), toks, history=40)
    got, st = prefill(make_llm(model, loopserve=ALL_LINES, **kw), toks, history=40)
    assert st["n_ubatch_sparse"] == 1 and st["n_tokens_sparse"] == 256
    # layers 1 and 3 see every position, 0 and 2 the last 32
    assert [d is not None for d in st["layer_density"]] == [False, True, False, True]
    assert st["density"] == pytest.approx(1.0)
    assert st["n_layer_est_chain"] == (2 if GPU_LAYERS != 0 and smem is not None else 0)
    if smem is not None:
        assert st["n_ubatch_cell_causal"] == 1
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("n_head", [2, 4], ids=["gqa2", "gqa4"])
def test_head_dim_256_with_a_mask_within_a_consumer_gpus_shared_memory(tmp_path, make_llm, monkeypatch, n_head):
    """A consumer GPU gives a block 99 KiB of shared memory (sm_86, sm_89), an H100 227 KiB.
    With a mask (cells out of position order) at head dim 256, the fused estimation's CTA of 8
    warps needs more than 99 KiB: 4 warps fit at a GQA ratio of 4, and at 2 nothing does, so the
    graph estimates with stock ops on the device. LOOPSERVE_CUDA_SMEM_MAX makes this GPU offer
    what a consumer one does. On the CPU the estimation is its own and the cap changes nothing."""
    monkeypatch.setenv("LOOPSERVE_CUDA_SMEM_MAX", str(99 * 1024))
    model = gemma_256(tmp_path, n_head)
    toks = tokens(9, 300)
    kw = dict(n_ctx=512, n_batch=256, n_ubatch=256, flash_attn=True)

    def run(llm):
        dlg = llm.dialogue()
        llm.decode(dlg, toks[:40], list(range(40)))
        llm.remove_positions(dlg._seq, 10, 20)  # a hole the input's first tokens fill: a mask
        return llm.decode(dlg, toks[40:], list(range(40, 300))), llm.prefill_stats()

    want, _ = run(make_llm(model, **kw))
    got, st = run(make_llm(model, loopserve=ALL_LINES, **kw))
    assert st["n_ubatch_sparse"] == 1 and st["n_ubatch_cell_causal"] == 0
    # the two full-attention layers (1 and 3) of the one sparse ubatch
    assert st["n_layer_est_chain"] == (2 if GPU_LAYERS != 0 and n_head == 2 else 0)
    assert st["density"] == pytest.approx(1.0)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-3)


def test_ttft_repeats_print_the_median_and_the_range(model):
    # benchmarks/prefill.py ttft --repeats (single runs on the GPU box move by ~5%): the median
    # run's time and stats, the speedup of the medians, the range of each path's runs
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks/prefill.py"
    base = [sys.executable, str(script), "ttft", "--model", str(model), "--lengths", "1500", "--ubatch", "1024",
            "--threads", "2"]
    r = subprocess.run([*base, "--repeats", "3", "--profile"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.split() and line.split()[0] == "1500")
    m = re.search(r"3 runs: stock ([\d.]+)-([\d.]+) s, sparse ([\d.]+)-([\d.]+) s$", row)
    assert m, row
    s_lo, s_hi, p_lo, p_hi = map(float, m.groups())
    f = row.split()
    stock, sparse = float(f[1]), float(f[2])
    assert s_lo <= stock <= s_hi and p_lo <= sparse <= p_hi
    # the ratio of the medians, which are printed rounded to the millisecond
    ratio = float(f[3].rstrip("x"))
    assert (stock - 5e-4) / (sparse + 5e-4) - 0.005 <= ratio <= (stock + 5e-4) / (sparse - 5e-4) + 0.005
    assert f[5] == "1/2"  # the second ubatch (476 tokens) is under sparse_min_tokens
    r = subprocess.run([*base, "--repeats", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--repeats must be at least 1" in r.stderr


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_sparse_selection_runs(model, make_llm, flash_attn):
    """alpha < 1 computes less than the causal matrix, and stays close to dense."""
    toks = tokens(2, 500)
    kw = dict(n_ctx=1024, n_batch=512, n_ubatch=512, flash_attn=flash_attn)
    want, _ = prefill(make_llm(model, **kw), toks)
    # a random model has no vertical-slash structure and 64-row blocks widen each diagonal
    # into a 64-key range: on 500 tokens only a small alpha leaves part of the matrix out
    cfg = LoopServeConfig(sparse_prefill=True, alpha=0.05, min_vertical=1, min_slash=1, local_window=8,
                          prefill_sink=2, sparse_min_tokens=256)
    got, st = prefill(make_llm(model, loopserve=cfg, **kw), toks)
    assert st["n_ubatch_sparse"] == 1
    assert 0.0 < st["density"] < 0.99
    assert all(0.0 < d < 1.0 for d in st["layer_density"])
    assert np.isfinite(got).all()
    assert np.corrcoef(got, want)[0, 1] > 0.5


def test_profile_times_each_stage(model, make_llm):
    """Profile mode times the estimation, the selection and the attention of each sparse
    layer apart (benchmarks/prefill.py prints them beside the TTFT); off, they stay 0."""
    toks = tokens(2, 500)
    kw = dict(n_ctx=1024, n_batch=512, n_ubatch=512)
    cfg = LoopServeConfig(sparse_prefill=True, alpha=0.05, min_vertical=1, min_slash=1, local_window=8,
                          prefill_sink=2, sparse_min_tokens=256)
    llm = make_llm(model, loopserve=cfg, **kw)
    _, st = prefill(llm, toks)
    assert st["n_ubatch_sparse"] == 1
    assert st["t_estimate_ms"] == st["t_select_ms"] == st["t_attend_ms"] == 0.0
    llm.set_prefill_profile(True)
    t0 = time.perf_counter()
    _, st = prefill(llm, toks)
    wall_ms = (time.perf_counter() - t0) * 1000
    assert st["n_ubatch_sparse"] == 1
    stages = (st["t_estimate_ms"], st["t_select_ms"], st["t_attend_ms"])
    assert all(t > 0.0 for t in stages) and sum(stages) < wall_ms


def test_reused_selection_with_every_line_matches_stock(flat_model, make_llm):
    """prefill_reuse: a ubatch attends over the previous ubatch's stored selection. With
    alpha = 1 that selection holds every column the previous ubatch saw and every offset up
    to its length, which together cover all keys of the next ubatch: the stock logits."""
    toks = tokens(6, 1024)
    kw = dict(n_ctx=1024 + 64, n_batch=1024, n_ubatch=256)
    want, _ = prefill(make_llm(flat_model, **kw), toks)
    got, st = prefill(make_llm(flat_model, loopserve=replace(ALL_LINES, prefill_reuse=2), **kw), toks)
    assert st["n_ubatch_sparse"] == 4 and st["n_ubatch_reused"] == 2
    # 1.4e-5 apart on the CPU build; 3.2e-4 on the CUDA build, whose batched matmuls run on
    # the GPU even with no layer there. Selections one diagonal cap short of every key
    # (density 0.993) are 1e-2 apart.
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_reuse_counts_and_stays_within_one_decode_call(model, make_llm):
    """A selection serves the next prefill_reuse - 1 ubatches of its input, in one decode
    call only (the cache may change between calls); reusing a stale selection is not the
    same as estimating afresh."""
    toks = tokens(7, 1024)
    sparse = dict(sparse_prefill=True, alpha=0.05, min_vertical=1, min_slash=1, local_window=8, prefill_sink=2,
                  sparse_min_tokens=256)

    def run(reuse, n_batch):
        llm = make_llm(model, loopserve=LoopServeConfig(**sparse, prefill_reuse=reuse), n_ctx=1024 + 64,
                       n_batch=n_batch, n_ubatch=256)
        return prefill(llm, toks)

    fresh, st1 = run(1, 1024)
    assert st1["n_ubatch_sparse"] == 4 and st1["n_ubatch_reused"] == 0
    got3, st3 = run(3, 1024)
    assert st3["n_ubatch_sparse"] == 4 and st3["n_ubatch_reused"] == 2   # 2nd and 3rd; the 4th estimates
    assert not np.allclose(got3, fresh)
    # a batch of two ubatches per decode call: the second of each call reuses, no more
    _, st4 = run(4, 512)
    assert st4["n_ubatch_sparse"] == 4 and st4["n_ubatch_reused"] == 2


def test_prefill_block_reaches_the_runtime(model, make_llm):
    """A diagonal covers about prefill_block keys per block of rows: larger blocks compute
    more of the matrix for the same selection; the default is the runtime's 64 / GQA."""
    toks = tokens(4, 500)
    kw = dict(n_ctx=1024, n_batch=512, n_ubatch=512)

    def density(block):
        cfg = LoopServeConfig(sparse_prefill=True, alpha=0.05, min_vertical=1, min_slash=1, local_window=8,
                              prefill_sink=2, sparse_min_tokens=256, prefill_block=block)
        _, st = prefill(make_llm(model, loopserve=cfg, **kw), toks)
        return st["density"]

    default = so.default_block(SHAPE["n_head"], SHAPE["n_head_kv"])
    assert density(None) == pytest.approx(density(default))
    assert density(16) < density(64) < density(128)


def test_off_and_short_batches_are_stock(model, make_llm):
    cfg = LoopServeConfig(sparse_prefill=True, sparse_min_tokens=400)
    llm = make_llm(model, loopserve=cfg, n_ctx=512)
    _, st = prefill(llm, tokens(3, 100))
    assert st["enabled"] and st["n_ubatch_sparse"] == 0 and st["density"] is None
    llm.set_sparse_prefill(None)
    assert not llm.prefill_stats()["enabled"]


def test_refuses_unsupported_kv_type(model, make_llm):
    from loopserve_edge.errors import LoopServeError
    with pytest.raises(LoopServeError, match="f16, q8_0"):
        make_llm(model, loopserve=LoopServeConfig(sparse_prefill=True), type_k=2, type_v=2,
                 flash_attn=True)  # q4_0


def test_config_validation():
    with pytest.raises(ValueError):
        LoopServeConfig(sparse_prefill=True, alpha=0.0)
    with pytest.raises(ValueError):
        LoopServeConfig(sparse_prefill=True, min_vertical=10, max_vertical=5)
    with pytest.raises(ValueError):
        LoopServeConfig(sparse_prefill=True, prefill_block=0)
    with pytest.raises(ValueError):
        LoopServeConfig(sparse_prefill=True, prefill_reuse=0)
    c = LoopServeConfig(sparse_prefill=True)
    assert LoopServeConfig.from_dict(c.to_dict()) == c


def test_sparse_graph_buffers_are_reserved(model, tmp_path):
    """Turning sparse prefill on reserves the compute buffers for its graph (with flash
    attention it needs more than the stock one): they do not grow as the cache fills. The
    runtime warns at close when they did; a fresh process captures its log. (One resident
    dialogue: a cache of several streams reserves with its ubatch split across them.)"""
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(f"""
from loopserve_edge import Llama, LoopServeConfig
cfg = LoopServeConfig(sparse_prefill=True, alpha=0.5, sparse_min_tokens=256, max_resident=1)
llm = Llama({str(model)!r}, loopserve=cfg, n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=2,
            flash_attn=True, verbose=True)
d = llm.dialogue()
toks = [i % 200 + 3 for i in range(1800)]
llm.decode(d, toks, list(range(len(toks))))
print("sparse ubatches", llm.prefill_stats()["n_ubatch_sparse"])
llm.close()
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sparse ubatches 4" in r.stdout
    assert "compute buffer size is" in r.stderr  # the check ran
    assert "does not match expectation" not in r.stderr
