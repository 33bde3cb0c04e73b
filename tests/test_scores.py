"""Observation-window attention scores (llama_loopserve_scores_*) against a numpy
reference computed from the GGUF weights.

The model gets far larger Q/K weights than the tiny chat models: the reference is only a
strong check when attention is far from uniform (with N(0, 0.02) weights every row
attends almost uniformly, and a wrong head or row mapping would still match).
"""
from __future__ import annotations

import ctypes
import os

import gguf
import numpy as np
import pytest

from loopserve_edge import Llama, LoopServeConfig
from loopserve_edge.bindings import llama_c
from loopserve_edge.random_gguf import write_random_llama

SHAPE = dict(n_layer=3, n_embd=64, n_head=4, n_head_kv=2, n_ff=96)
ROPE_BASE = 10000.0
EPS = 1e-5


def write_model(path, *, seed, n_layer, n_embd, n_head, n_head_kv, n_ff):
    # Q/K far larger than the chat models' N(0, 0.02): attention must be peaked for a
    # wrong head or row mapping to show. The tests feed byte token ids directly.
    return write_random_llama(path, seed=seed, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                              n_head_kv=n_head_kv, n_ff=n_ff, std=0.05, qk_std=0.35, embd_std=1.0)


# -- numpy reference ------------------------------------------------------------------

def read_weights(path) -> dict[str, np.ndarray]:
    r = gguf.GGUFReader(path)
    return {t.name: np.asarray(t.data, dtype=np.float32) for t in r.tensors}


def rms_norm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def rope_norm(x, pos):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM (arch llama): rotates adjacent pairs."""
    d = x.shape[-1]
    theta = pos[:, None].astype(np.float64) * ROPE_BASE ** (-np.arange(0, d, 2) / d)  # [T, d/2]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out.astype(np.float32)


def f16(x):
    # the KV cache holds f16, and the Q.K product runs in f16 on the CPU
    return x.astype(np.float16).astype(np.float32)


def reference_probs(weights, tokens, shape) -> list[np.ndarray]:
    """Per layer, attention probabilities [n_head, T, T] of a causal pass over tokens at
    positions 0..T-1."""
    n_head, n_head_kv = shape["n_head"], shape["n_head_kv"]
    hd = shape["n_embd"] // n_head
    gqa = n_head // n_head_kv
    T = len(tokens)
    pos = np.arange(T)
    x = weights["token_embd.weight"][np.asarray(tokens)]
    causal = np.where(pos[None, :] <= pos[:, None], 0.0, -np.inf)
    probs = []
    for il in range(shape["n_layer"]):
        b = f"blk.{il}."
        h = rms_norm(x, weights[b + "attn_norm.weight"])
        q = rope_norm((h @ weights[b + "attn_q.weight"].T).reshape(T, n_head, hd), pos)
        k = rope_norm((h @ weights[b + "attn_k.weight"].T).reshape(T, n_head_kv, hd), pos)
        v = (h @ weights[b + "attn_v.weight"].T).reshape(T, n_head_kv, hd)
        q, k, v = f16(q), f16(k), f16(v)
        kh = np.repeat(k, gqa, axis=1)  # query head j uses KV head j // gqa
        vh = np.repeat(v, gqa, axis=1)
        logits = np.einsum("thd,shd->hts", q, kh) / np.sqrt(hd) + causal
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        probs.append(p)
        att = np.einsum("hts,shd->thd", p, vh).reshape(T, n_head * hd)
        x = x + att @ weights[b + "attn_output.weight"].T
        h = rms_norm(x, weights[b + "ffn_norm.weight"])
        g = h @ weights[b + "ffn_gate.weight"].T
        u = h @ weights[b + "ffn_up.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ weights[b + "ffn_down.weight"].T
    return probs


def reference_scores(probs, rows, n_head_kv) -> dict[int, np.ndarray]:
    """{layer: [n_head_kv, T]}: probabilities of the query rows `rows`, summed over the
    rows and over the query heads of each KV head."""
    out = {}
    for il, p in enumerate(probs):
        n_head, T, _ = p.shape
        s = p[:, rows, :].sum(axis=1)  # [n_head, T]
        out[il] = s.reshape(n_head_kv, n_head // n_head_kv, T).sum(axis=1)
    return out


# -- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("models") / "scores.gguf", seed=3, **SHAPE)


@pytest.fixture(scope="module")
def weights(model):
    return read_weights(model)


def tokens_for(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 256, n)]


def check_close(got: dict, want: dict, positions, label=""):
    for il, w in want.items():
        g = got[il]
        assert g.shape == (w.shape[0], len(positions)), label
        # layer 0 differs from the reference only where q or k rounds to another f16
        # value (llama.cpp's f32 RoPE vs numpy's f64); deeper layers also inherit the f16
        # rounding of V and of the probabilities (differently with and without FA). A wrong
        # row, head or cell mapping is off by O(0.1..1).
        tol = dict(rtol=5e-3, atol=2e-3) if il == 0 else dict(rtol=2e-2, atol=5e-3)
        np.testing.assert_allclose(g, w[:, positions], **tol, err_msg=f"{label} layer {il}")


# -- tests ----------------------------------------------------------------------------

@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_scores_match_numpy(model, weights, make_llm, flash_attn):
    """A prompt batch (window = its last 8 tokens) then three single-token decodes:
    per-layer, per-KV-head accumulators equal the reference sums."""
    llm = make_llm(model, flash_attn=flash_attn)
    dlg = llm.dialogue()
    prompt = tokens_for(1, 40)
    gen = tokens_for(2, 3)
    llm.set_score_window(8)
    assert llm.score_window == 8
    llm.decode(dlg, prompt, list(range(40)))
    for i, t in enumerate(gen):
        llm.decode(dlg, [t], [40 + i])

    probs = reference_probs(weights, prompt + gen, SHAPE)
    rows = list(range(32, 43))  # the prompt's last 8, then each generated token
    want = reference_scores(probs, rows, SHAPE["n_head_kv"])

    pos, by_layer = llm.attention_scores_by_layer(dlg)
    assert list(pos) == list(range(43))
    assert sorted(by_layer) == list(range(SHAPE["n_layer"]))
    check_close(by_layer, want, pos, f"fa={flash_attn}")
    pos_h, by_head = llm.attention_scores_by_head(dlg)  # all layers in one call
    assert list(pos_h) == list(pos)
    assert np.array_equal(by_head, np.concatenate([by_layer[il] for il in sorted(by_layer)]))

    # the aggregate is the sum over layers and KV heads; every row spreads n_head units of
    # probability per layer over the cells
    pos2, total = llm.attention_scores(dlg)
    assert list(pos2) == list(pos)
    np.testing.assert_allclose(total, sum(v.sum(0) for v in by_layer.values()), rtol=1e-5, atol=1e-6)
    assert llm.score_rows(dlg) == len(rows)
    np.testing.assert_allclose(total.sum(), len(rows) * SHAPE["n_layer"] * SHAPE["n_head"], rtol=1e-4)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_window_spans_ubatches(model, weights, make_llm, flash_attn):
    """A window larger than the last ubatch: its rows come from two ubatches, and a second
    resident dialogue (another KV stream) is scored on its own cells."""
    llm = make_llm(model, flash_attn=flash_attn, n_ubatch=16, n_batch=64)
    other = llm.dialogue()
    llm.decode(other, tokens_for(7, 5), list(range(5)))  # seq 0 busy, unscored
    dlg = llm.dialogue()
    prompt = tokens_for(4, 40)
    llm.set_score_window(20)
    llm.decode(dlg, prompt, list(range(40)))
    assert dlg._seq == 1

    want = reference_scores(reference_probs(weights, prompt, SHAPE), list(range(20, 40)), SHAPE["n_head_kv"])
    pos, by_layer = llm.attention_scores_by_layer(dlg)
    check_close(by_layer, want, pos, f"fa={flash_attn}")
    assert llm.score_rows(dlg) == 20
    _, other_scores = llm.attention_scores(other)
    assert not other_scores.any()


@pytest.mark.parametrize("mode", ["1", "2"])
def test_group_maximum_of_the_ablation(model, weights, make_llm, monkeypatch, mode):
    """LOOPSERVE_GQA_MAX (an ablation, benchmarks/results/gqa-max-dev/): each KV head scored by
    the maximum over its query heads instead of their mean, of their means over the rows reduced
    together (1: here the prompt's window, then each decode alone, each read after it: a read
    scores the rows saved since the last) or row by row (2), times the group's size as the host
    counts it."""
    monkeypatch.setenv("LOOPSERVE_GQA_MAX", mode)
    llm = make_llm(model, flash_attn=True)
    dlg = llm.dialogue()
    prompt, gen = tokens_for(1, 40), tokens_for(2, 3)
    llm.set_score_window(8)
    llm.decode(dlg, prompt, list(range(40)))
    llm.attention_scores_by_layer(dlg)
    for i, t in enumerate(gen):
        llm.decode(dlg, [t], [40 + i])
        llm.attention_scores_by_layer(dlg)

    gqa = SHAPE["n_head"] // SHAPE["n_head_kv"]
    probs = reference_probs(weights, prompt + gen, SHAPE)
    want = {}
    for il, p in enumerate(probs):
        g = p.reshape(SHAPE["n_head_kv"], gqa, *p.shape[1:])  # [KV head, group, rows, cells]
        if mode == "1":
            s = 8 * g[:, :, 32:40].mean(axis=2).max(axis=1) + sum(g[:, :, r].max(axis=1) for r in range(40, 43))
        else:
            s = g[:, :, 32:43].max(axis=1).sum(axis=1)
        want[il] = gqa * s
    pos, by_layer = llm.attention_scores_by_layer(dlg)
    check_close(by_layer, want, pos, f"LOOPSERVE_GQA_MAX={mode}")
    # not the mean: somewhere the group's query heads disagree
    mean = reference_scores(probs, list(range(32, 43)), SHAPE["n_head_kv"])
    assert max(np.abs(by_layer[il] - mean[il][:, pos]).max() for il in mean) > 0.1


def test_disabled_and_reset(model, make_llm):
    llm = make_llm(model)
    dlg = llm.dialogue()
    llm.decode(dlg, tokens_for(5, 20), list(range(20)))
    pos, sc = llm.attention_scores(dlg)
    assert len(pos) == 20 and not sc.any() and llm.score_rows(dlg) == 0
    assert llm.score_window == 0

    llm.set_score_window(4)
    llm.decode(dlg, [1], [20])
    _, sc = llm.attention_scores(dlg)
    assert sc.sum() == pytest.approx(SHAPE["n_layer"] * SHAPE["n_head"], rel=1e-4)
    assert llm.score_rows(dlg) == 1

    llm.reset_scores(dlg)
    _, sc = llm.attention_scores(dlg)
    assert not sc.any() and llm.score_rows(dlg) == 0

    # off again: decoding adds nothing, and what was accumulated stays
    llm.decode(dlg, [2], [21])
    before = llm.attention_scores(dlg)[1]
    llm.set_score_window(0)
    llm.decode(dlg, [3], [22])
    _, after = llm.attention_scores(dlg)
    np.testing.assert_array_equal(after[:22], before)
    assert after[22] == 0 and llm.score_rows(dlg) == 1


@pytest.mark.parametrize("score_new", [False, True], ids=["refill-unscored", "refill-scored"])
def test_reused_cells_start_from_zero(model, weights, make_llm, score_new):
    """Cells freed with llama_memory_seq_rm and filled again hold new tokens: they must not
    keep the old tokens' scores, whether or not the refill itself is scored."""
    llm = make_llm(model)
    dlg = llm.dialogue()
    first = tokens_for(8, 30)
    llm.set_score_window(30)
    llm.decode(dlg, first, list(range(30)))
    _, old = llm.attention_scores(dlg)
    assert (old > 0).all()

    llm.remove_positions(dlg._seq, 20)
    second = tokens_for(9, 10)
    llm.set_score_window(1 if score_new else 0)
    llm.decode(dlg, second, list(range(20, 30)))
    pos, new = llm.attention_scores(dlg)
    assert list(pos) == list(range(30))

    # the last decode's only scored row is the new token at position 29
    fresh = np.zeros(30, np.float32)
    if score_new:
        ref = reference_scores(reference_probs(weights, first[:20] + second, SHAPE), [29], SHAPE["n_head_kv"])
        fresh = sum(v.sum(0) for v in ref.values())
    np.testing.assert_allclose(new[20:], fresh[20:], rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(new[:20], old[:20] + fresh[:20], rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("flash_attn", [False, True])
def test_scores_are_held_through_a_state_round_trip(model, make_llm, flash_attn):
    """A dialogue swapped out and back in gets its cells from a state load, which starts them
    with no scores in the runtime (as does the packing after a cut): the reply's deferred cut,
    or H2O's history, was then ranked by zeros. The context holds the scores read before and
    adds them, so the dialogue reads what it would have had it stayed; a reset drops them."""
    llm = make_llm(model, loopserve=LoopServeConfig(max_resident=1), flash_attn=flash_attn)
    twin_llm = make_llm(model, loopserve=LoopServeConfig(max_resident=2), flash_attn=flash_attn)
    a, b, twin = llm.dialogue(), llm.dialogue(), twin_llm.dialogue()
    for ctx, d in ((llm, a), (twin_llm, twin)):
        ctx.set_score_window(4)
        ctx.decode(d, tokens_for(10, 12), list(range(12)))
    pos0, sc0 = llm.attention_scores(a)
    heads0 = llm.attention_scores_by_head(a)[1]
    assert sc0.any() and llm.score_rows(a) > 0
    llm.decode(b, tokens_for(11, 12), list(range(12)))  # swaps a out (one resident)
    assert a._seq is None and llm.attention_scores(a)[0].size == 0
    llm.make_resident(a)  # swaps b out, loads a's state into the same cells
    pos, sc = llm.attention_scores(a)
    np.testing.assert_array_equal(pos, pos0)
    np.testing.assert_allclose(sc, sc0, rtol=1e-6)
    np.testing.assert_allclose(llm.attention_scores_by_head(a)[1], heads0, rtol=1e-6)
    _, layers = llm.attention_scores_by_layer(a)
    np.testing.assert_allclose(np.concatenate(list(layers.values())), heads0, rtol=1e-6)
    # rows scored after it came back add to them, as to the twin's that never left; a packing
    # (Context.compact) and the batch-invariant repack keep them, a removal drops its cells' part
    for ctx, d in ((llm, a), (twin_llm, twin)):
        ctx.decode(d, tokens_for(12, 6), list(range(12, 18)))
        ctx.compact(d)
        ctx._repack()
        ctx.remove_positions(d._seq, 16)
    assert llm.score_rows(a) == twin_llm.score_rows(twin) > 0
    for got, want in ((llm.attention_scores(a), twin_llm.attention_scores(twin)),
                      (llm.attention_scores_by_head(a), twin_llm.attention_scores_by_head(twin))):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)
    llm.reset_scores(a)
    assert not llm.attention_scores(a)[1].any() and llm.score_rows(a) == 0


def test_bad_window_and_layer_queries(model, make_llm):
    llm = make_llm(model)
    with pytest.raises(Exception):
        llm.set_score_window(-1)
    # per-layer queries outside the model say "not scored"
    from loopserve_edge import bindings
    assert bindings.llama_loopserve_scores_n_head_kv(llm._ctx.ctx, SHAPE["n_layer"]) == 0
    assert bindings.llama_loopserve_scores_n_head_kv(llm._ctx.ctx, 0) == SHAPE["n_head_kv"]


@pytest.mark.parametrize("n_prompt", [150, 130], ids=["long-tail", "short-tail"])
def test_prompt_of_several_batches_is_scored_by_its_own_last_tokens(model, weights, make_llm, n_prompt):
    """llama.cpp scores the last tokens of each llama_decode call; Llama.decode splits a
    prompt longer than n_batch so that only the prompt's last `window` tokens are scored
    (with 130 tokens and batches of 64 the last batch has 2 tokens: it grows to hold the
    window), and leaves the window as it was."""
    llm = make_llm(model, n_batch=64, n_ubatch=16)
    dlg = llm.dialogue()
    prompt = tokens_for(12, n_prompt)
    llm.set_score_window(8)
    llm.decode(dlg, prompt, list(range(n_prompt)))
    assert llm.score_window == 8 and llm.score_rows(dlg) == 8
    want = reference_scores(reference_probs(weights, prompt, SHAPE), list(range(n_prompt - 8, n_prompt)),
                            SHAPE["n_head_kv"])
    pos, by_layer = llm.attention_scores_by_layer(dlg)
    check_close(by_layer, want, pos, "multi-batch")


# -- saved queries (LoopServeConfig.saved_queries) -------------------------------------

def saved_and_eager(make_llm, model):
    """Two contexts of the model with flash attention: one saving its scored rows' queries
    (scored when read), one scoring each decode as it runs."""
    return [make_llm(model, flash_attn=True, loopserve=LoopServeConfig(saved_queries=s)) for s in (True, False)]


def decode_scored(llm, d, seeds, n_prompt, n_steps):
    """A prompt, then single-token decodes, every decode scored by its last token."""
    llm.set_score_window(1)
    llm.decode(d, tokens_for(seeds[0], n_prompt), list(range(n_prompt)))
    for i, t in enumerate(tokens_for(seeds[1], n_steps)):
        llm.decode(d, [t], [n_prompt + i])


def assert_same_heads(saved, eager, ds, de):
    ps, hs = saved.attention_scores_by_head(ds)
    pe, he = eager.attention_scores_by_head(de)
    assert list(ps) == list(pe)
    # the same probabilities, summed in another order (rows of one graph against one at a time;
    # on the GPU by another kernel); a row scored against other cells is off by O(0.1)
    np.testing.assert_allclose(hs, he, rtol=5e-3, atol=1e-4)
    assert saved.score_rows(ds) == eager.score_rows(de)
    return hs


def test_saved_rows_are_scored_as_the_decodes_would_have_been(model, weights, make_llm):
    """A prompt's window and single-token decodes, saved: nothing is read back until the
    scores are read; then the sums equal scoring each decode as it ran, and the reference."""
    saved, eager = saved_and_eager(make_llm, model)
    ds, de = saved.dialogue(), eager.dialogue()
    prompt, gen = tokens_for(21, 40), tokens_for(22, 6)
    for llm, d in ((saved, ds), (eager, de)):
        llm.set_score_window(8)
        llm.decode(d, prompt, list(range(40)))
        llm.set_score_window(1)
        for i, t in enumerate(gen):
            llm.decode(d, [t], [40 + i])
    assert saved.saved_rows == 8 + 6 and eager.saved_rows == 0
    hs = assert_same_heads(saved, eager, ds, de)
    assert saved.saved_rows == 0  # the read scored them
    want = reference_scores(reference_probs(weights, prompt + gen, SHAPE), list(range(32, 46)), SHAPE["n_head_kv"])
    _, by_layer = saved.attention_scores_by_layer(ds)
    check_close(by_layer, want, list(range(46)), "saved")
    assert hs.shape[0] == SHAPE["n_layer"] * SHAPE["n_head_kv"]


def test_saved_rows_are_scored_before_their_cells_change(model, make_llm):
    """Rows saved, then their last cells removed and filled again at the same positions (a
    probe removed, a rollback): the rows are scored against the cells they attended to, not the
    new ones; a removal in the middle (a cell-wise cut's) likewise sees them first."""
    saved, eager = saved_and_eager(make_llm, model)
    ds, de = saved.dialogue(), eager.dialogue()
    for llm, d in ((saved, ds), (eager, de)):
        decode_scored(llm, d, (23, 24), 30, 5)
        llm.set_score_window(0)
    assert saved.saved_rows == 6
    for llm, d in ((saved, ds), (eager, de)):
        llm.remove_positions(d._seq, 32)
        llm.decode(d, tokens_for(25, 3), [32, 33, 34])
    assert saved.saved_rows == 0
    assert_same_heads(saved, eager, ds, de)
    # rows saved again, then the cells compacted by a removal in the middle
    for llm, d in ((saved, ds), (eager, de)):
        llm.set_score_window(1)
        llm.decode(d, [5], [35])
        llm.remove_cells(d._seq, np.array([3, 4, 5]))
    assert_same_heads(saved, eager, ds, de)


def test_saved_rows_of_another_dialogue_survive_a_reset(model, make_llm):
    """Two dialogues save rows; resetting one drops its rows and zeroes its cells, the other
    dialogue's rows are still scored."""
    saved, eager = saved_and_eager(make_llm, model)
    pairs = []
    for llm in (saved, eager):
        a, b = llm.dialogue(), llm.dialogue()
        llm.set_score_window(2)
        llm.decode(a, tokens_for(26, 20), list(range(20)))
        llm.decode(b, tokens_for(27, 20), list(range(20)))
        llm.set_score_window(1)
        llm.decode_batch([(a, 3, 20), (b, 4, 20)], scored=True)
        llm.reset_scores(a)
        llm.decode(a, [6], [21])
        pairs.append((a, b))
    (sa, sb), (ea, eb) = pairs
    assert_same_heads(saved, eager, sb, eb)
    assert_same_heads(saved, eager, sa, ea)
    assert saved.score_rows(sa) == 1 and saved.score_rows(sb) == 3


def test_rows_beyond_the_saved_room_flush_first(model, make_llm):
    """More scored decodes than the saved rows hold: the decode that would overflow scores
    the saved ones first; the sums are unchanged. Without flash attention nothing is saved."""
    saved, eager = saved_and_eager(make_llm, model)
    ds, de = saved.dialogue(), eager.dialogue()
    room = saved.saved_room
    for llm, d in ((saved, ds), (eager, de)):
        decode_scored(llm, d, (28, 29), 10, room + 6)
    assert 0 < saved.saved_rows <= room
    assert_same_heads(saved, eager, ds, de)
    assert saved.score_rows(ds) == room + 7
    off = make_llm(model, flash_attn=False)
    d = off.dialogue()
    off.set_score_window(1)
    off.decode(d, tokens_for(28, 10), list(range(10)))
    assert off.saved_rows == 0 and off.attention_scores(d)[1].any()


def test_a_dialogue_counts_its_own_rows_in_a_sequence_another_used(model, make_llm):
    """The runtime counts scored rows per sequence, and a dialogue swapped in takes a free
    sequence that the last occupant's rows were counted in (its scores were held, its cells
    gone): the count (score_rows, a state file's) is the dialogue's own."""
    llm = make_llm(model, loopserve=LoopServeConfig(max_resident=1))
    a, b = llm.dialogue(), llm.dialogue()
    llm.set_score_window(3)
    llm.decode(a, tokens_for(30, 12), list(range(12)))
    llm.set_score_window(0)
    llm.decode(b, tokens_for(31, 12), list(range(12)))   # a out (held: 3 rows), b in its sequence
    assert llm.score_rows(b) == 0 and llm.score_rows(a) == 3
    llm.make_resident(a)
    assert llm.score_rows(a) == 3 and llm.score_rows(b) == 0


@pytest.mark.skipif(int(os.environ.get("LOOPSERVE_TEST_GPU_LAYERS", "0")) != 0,
                    reason="CUDA's kernels are not covered (the CPU backend's switch)")
@pytest.mark.parametrize("invariant", [False, True])
def test_batch_invariant_scores_follow_neither_placement_nor_flushes(default_model, make_llm, invariant):
    """With batch_invariant, a dialogue's scores are the same to the bit at any cells of the
    pool, decoded alone or beside another dialogue, its saved rows scored in one flush or
    several (another dialogue's removal scores every saved row first): a cut then keeps the same
    tokens alone and on a busy server. Without it the softmax sums follow where the visible
    cells fall among the backend's vector lanes, and a flush scales the mean of whatever rows it
    holds (here the two differ). (The default model: its quantized products give a row the
    same sums at any batch size, the tiny models' float32 ones do not.)"""
    llm = make_llm(default_model, n_ctx=1024, n_threads=2, flash_attn=True,
                   loopserve=LoopServeConfig(max_resident=3, batch_invariant=invariant))
    rng = np.random.default_rng(40)
    prompt, gen = [int(t) for t in rng.integers(300, 40000, 150)], [int(t) for t in rng.integers(300, 40000, 12)]
    n = len(prompt)

    def run(d, other=None, n_other=0):
        llm.set_score_window(8)
        llm.decode(d, prompt, list(range(n)))
        llm.set_score_window(1)
        for i, t in enumerate(gen):
            if other is None:
                llm.decode(d, [t], [n + i])
            else:   # beside a step of the other dialogue, unscored, which is then removed
                llm.decode_batch([(d, t, n + i), (other, 7, n_other)], scored=[True, False])
                llm.remove_positions(llm.make_resident(other), n_other)
        assert llm.score_rows(d) == 8 + len(gen)
        return llm.attention_scores_by_head(d)

    a = llm.dialogue()
    pa, sa = run(a)                                   # the pool's first cells
    other = llm.dialogue()
    llm.set_score_window(0)
    llm.decode(other, [int(t) for t in rng.integers(300, 40000, 13)], list(range(13)))
    b = llm.dialogue()
    pb, sb = run(b, other, 13)                        # 13 cells higher, batched, flushed in parts
    assert list(pa) == list(pb)
    assert np.array_equal(sa, sb) == invariant


@pytest.mark.parametrize("flash_attn", [
    pytest.param(False, id="scored-as-decoded"),
    # on the GPU the saved rows stay in device memory, where a flush adds their mean times their
    # number (the per-row, split-invariant flush is the CPU's): the sums follow the swap's split
    pytest.param(True, id="saved-batch-invariant", marks=pytest.mark.skipif(
        int(os.environ.get("LOOPSERVE_TEST_GPU_LAYERS", "0")) != 0, reason="the CPU's split-invariant flush")),
])
def test_scores_go_on_through_a_round_trip_as_without_it(model, make_llm, flash_attn):
    """A dialogue swapped out and back in (its state loaded, its scores held on the host
    meanwhile) and one that stayed have the same scores to the bit after more scored decodes:
    the held scores go back into the runtime, which adds to the same floats. (Added to the
    runtime's at each read, the sums ran in another order, and an H2O cut on a busy server
    could rank a near-tie the other way than alone.) Saved rows are flushed at the swap, so
    there the sums are split-invariant only with batch_invariant."""
    prompt, more = tokens_for(50, 40), tokens_for(51, 8)

    def run(swap):
        llm = make_llm(model, flash_attn=flash_attn,
                       loopserve=LoopServeConfig(max_resident=1, batch_invariant=flash_attn))
        a = llm.dialogue()
        llm.set_score_window(4)
        llm.decode(a, prompt, list(range(40)))
        llm.set_score_window(1)
        for i, t in enumerate(more):
            if swap and i == 4:   # b takes the only sequence, then a comes back
                b = llm.dialogue()
                llm.decode(b, tokens_for(52, 10), list(range(10)))
                assert a._seq is None and a._held_scores is not None
            llm.decode(a, [t], [40 + i])
        assert a._held_scores is None
        return llm.attention_scores_by_head(a), llm.attention_scores(a)[1], llm.score_rows(a)

    (p0, h0), c0, n0 = run(False)
    (p1, h1), c1, n1 = run(True)
    assert list(p0) == list(p1) and n0 == n1 == 4 + 8
    assert np.array_equal(h0, h1) and np.array_equal(c0, c1)


def test_a_repack_while_a_dialogue_is_packed_keeps_its_scores(model, make_llm):
    """With batch_invariant, packing one dialogue's cells (compact, after a big cut) can need a
    repack of the pool between the removal of its cells and their reload: its scores, held for
    that round trip, come back as they were. (The repack held them again, read from the
    removed cells: none, with the row count doubled; on a busy server H2O's history was lost.)"""
    from loopserve_edge import bindings

    llm = make_llm(model, n_ctx=256, flash_attn=True,
                   loopserve=LoopServeConfig(max_resident=2, batch_invariant=True))
    a, b = llm.dialogue(), llm.dialogue()
    ta, tb = tokens_for(60, 100), tokens_for(61, 100)
    llm.set_score_window(8)
    llm.decode(a, ta, list(range(100)))
    llm.set_score_window(0)
    llm.decode(b, tb, list(range(100)))
    llm.remove_positions(a._seq, 70)
    a.tokens, a.positions = ta[:70], list(range(70))
    b.tokens, b.positions = tb, list(range(100))
    (p0, s0), n0 = llm.attention_scores_by_head(a), llm.score_rows(a)
    assert bindings.llama_loopserve_kv_tail(llm._ctx.ctx) < 70 and n0 == 8   # the pack needs a repack
    repacks = llm.pool_events["repack"]
    llm.compact(a)
    assert llm.pool_events["repack"] == repacks + 1
    (p1, s1), n1 = llm.attention_scores_by_head(a), llm.score_rows(a)
    assert list(p1) == list(p0) and n1 == n0
    assert np.array_equal(s1, s0)
