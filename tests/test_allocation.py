"""Budget allocation of head-wise cuts (PyramidKV, Ada-KV): per-head shares, rows hidden from
their own head, and what happens to those rows on a new token, a save, a swap and a rollback."""
import struct

import numpy as np
import pytest
from conftest import assert_same_logits
from test_head_wise import cfg, filled

from loopserve_edge import LoopServeConfig, LoopServeError
from loopserve_edge.allocation import ADA_FLOOR, hide_beyond, layer_shares_pyramid, row_shares

GREEDY = dict(temperature=0)
HIDE = np.array([10, 20, 30, 50, 77])  # cells hidden in these tests (of 120)


def next_logits(llm, d, pos=120):
    """The logits of one more token at `pos`, which is then removed again."""
    out = llm.decode(d, [7], [pos]).copy()
    llm.remove_positions(d._seq, pos)
    return out


def test_pyramid_shares_fall_layer_by_layer_with_the_budget_as_mean():
    for n_layers, free in ((2, 28), (30, 188), (16, 1980), (1, 50)):
        s = layer_shares_pyramid(n_layers, free)
        assert s.sum() == n_layers * free and np.all(np.diff(s) <= 0)
        if n_layers > 1:
            assert s[-1] in (free // 20, free // 20 + 1) and s[0] == 2 * free - free // 20


def test_ada_shares_follow_score_mass_within_each_layer():
    c = LoopServeConfig(policy="snapkv", budget=48, sink=4, recent=16, granularity="head", allocation="ada")
    free, cap = 48 - 20, c.cells - 20
    rng = np.random.default_rng(0)
    s = rng.random((6, 200))
    s[1] += 5.0  # layer 0's second head: every one of its scores beats the others'
    s[4] *= 1e-3  # layer 1's second head: none of its scores does
    shares = row_shares(s, [3, 3], c)
    floor = int(ADA_FLOOR * free)
    for layer in (shares[:3], shares[3:]):
        assert layer.sum() == 3 * free and layer.min() >= floor and layer.max() <= cap
    assert shares[1] == cap and shares[4] == floor
    # fewer cells than shares: each head keeps what there is
    assert np.all(row_shares(s[:, :10], [3, 3], c) <= 10)


def test_hide_beyond_keeps_the_fixed_cells_and_each_rows_best():
    s = np.array([[9.0, 1, 5, 3, 2, 0.5, 7], [9.0, 4, 4, 1, 0, 6, 7]])
    sel = np.array([[0, 1, 2, 3, 6], [0, 1, 2, 5, 6]])
    # lo 1 (sink: cell 0), hi 6 (recent: cell 6): each row keeps 2 fixed + its share
    h = hide_beyond(s, sel, 1, 6, np.array([3, 4]))
    assert h.tolist() == [[0, 1, 0, 1, 0], [0, 1, 0, 0, 0]]  # row 1: of the tied 4s, the later
    assert hide_beyond(s, sel, 1, 6, np.array([5, 5])) is None


def test_hiding_every_row_of_a_cell_is_removing_it(tiny_model, make_llm):
    """The per-head attention with its mask against llama.cpp's own removal of those cells."""
    llm, d = filled(make_llm, tiny_model, cfg())
    base = next_logits(llm, d)
    n_heads = sum(llm.layer_heads())
    hidden = np.zeros((n_heads, 120), np.uint8)
    hidden[:, HIDE] = 1
    llm.set_hidden(d, hidden)
    assert llm.hidden_rows(d).sum() == n_heads * len(HIDE)
    hid = next_logits(llm, d)
    ref_llm, ref = filled(make_llm, tiny_model, cfg())
    ref_llm.remove_cells(ref._seq, HIDE)
    removed = next_logits(ref_llm, ref)
    assert_same_logits(hid, removed, atol=1e-5)
    assert np.abs(hid - base).max() > 1e-3
    llm.set_hidden(d, None)  # shown again: the cache was never changed
    assert llm.hidden_rows(d).sum() == 0
    assert_same_logits(next_logits(llm, d), base, atol=1e-5)


def test_a_row_is_hidden_from_its_own_head_only(tiny_model, make_llm):
    llm, d = filled(make_llm, tiny_model, cfg())
    base = next_logits(llm, d)
    n_heads = sum(llm.layer_heads())
    outs = []
    for r in range(n_heads):
        hidden = np.zeros((n_heads, 120), np.uint8)
        hidden[r, HIDE] = 1
        llm.set_hidden(d, hidden)
        got = llm.hidden_rows(d)
        assert got[r, HIDE].all() and got.sum() == len(HIDE)
        outs.append(next_logits(llm, d))
    for r, out in enumerate(outs):
        assert np.abs(out - base).max() > 1e-4, f"row {r} changed nothing"
        for q in range(r):
            assert np.abs(out - outs[q]).max() > 1e-5, f"rows {q} and {r} hide the same"


@pytest.mark.parametrize("row", [0, 3])
def test_hiding_a_heads_rows_is_moving_them_out_of_that_head(tiny_model, make_llm, row):
    """An independent reference for which head a row of the mask reaches: the head-wise move
    (tested byte for byte against each head's K/V rows in test_head_wise) with that head keeping
    every cell but HIDE and the others every cell but X, against hiding exactly those rows."""
    other = np.array([5, 40, 60, 90, 100])
    llm, d = filled(make_llm, tiny_model, cfg())
    n_heads = sum(llm.layer_heads())
    hidden = np.zeros((n_heads, 120), np.uint8)
    hidden[:, other] = 1
    hidden[row, other] = 0
    hidden[row, HIDE] = 1
    llm.set_hidden(d, hidden)
    hid = next_logits(llm, d)
    ref_llm, ref = filled(make_llm, tiny_model, cfg())
    sel = np.stack([np.flatnonzero(hidden[r] == 0) for r in range(n_heads)]).astype(np.int32)
    assert ref_llm.keep_per_head(ref, sel) == 5
    assert_same_logits(hid, next_logits(ref_llm, ref), atol=1e-5)


def test_a_new_token_in_a_hidden_cell_is_seen_by_every_head(tiny_model, make_llm):
    llm, d = filled(make_llm, tiny_model, cfg())
    n_heads = sum(llm.layer_heads())
    hidden = np.zeros((n_heads, 120), np.uint8)
    hidden[:, -3:] = 1
    llm.set_hidden(d, hidden)
    llm.remove_positions(d._seq, 117)  # the last three cells go, flags and all
    llm.decode(d, d.tokens[117:], [117, 118, 119])  # the same tokens again
    assert llm.hidden_rows(d).sum() == 0
    # and the cells' tokens are attended: as a context that never hid them
    ref_llm, ref = filled(make_llm, tiny_model, cfg())
    assert_same_logits(next_logits(llm, d), next_logits(ref_llm, ref), atol=1e-5)


@pytest.mark.parametrize("alloc", ["pyramid", "ada"])
def test_an_allocated_cut_keeps_each_heads_share_in_the_largest_shares_cells(tiny_model, make_llm, alloc):
    c = cfg(allocation=alloc)
    llm = make_llm(tiny_model, loopserve=c)
    d = llm.dialogue()
    for _ in range(3):
        d.send("hello there " * 30, max_tokens=12, **GREEDY)
    hidden = llm.hidden_rows(d)
    assert d.layout == "head" and d.hidden is not None
    k = d.hidden.shape[1]
    assert k <= c.cells and np.array_equal(hidden[:, :k], d.hidden) and not hidden[:, k:].any()
    seen = k - d.hidden.sum(axis=1).astype(int)
    # the heads keep the budget on average (a whole cut of the fixed cells and the shares)
    assert seen.mean() == pytest.approx(c.budget, abs=1) and seen.max() == k
    assert not d.hidden[:, :c.sink].any()  # the sinks are every head's
    if alloc == "pyramid":
        per_layer = seen.reshape(len(llm.layer_heads()), -1)
        assert (per_layer == per_layer[:, :1]).all() and np.all(np.diff(per_layer[:, 0]) < 0)


def test_hidden_rows_survive_save_load_and_swap(tiny_model, make_llm, tmp_path):
    c = cfg(allocation="ada", max_resident=1)
    llm = make_llm(tiny_model, loopserve=c)
    d = llm.dialogue()
    for _ in range(3):
        d.send("a long story about cats " * 10, max_tokens=12, **GREEDY)
    assert d.hidden is not None
    path = d.save(tmp_path / "ada.lsd")
    assert struct.unpack_from("<I", path.read_bytes(), 8)[0] == 3
    e = llm.load_dialogue(path)
    assert np.array_equal(e.hidden, d.hidden)
    # the next token of each: e's load swaps d out (max_resident 1), d's comes back by a load
    # that shows every row, so both must hide theirs again
    n, pos = len(d.positions), d.positions[-1] + 1
    le = llm.decode(e, [5], [pos]).copy()
    llm.remove_positions(e._seq, pos)
    ld = llm.decode(d, [5], [pos]).copy()
    llm.remove_positions(d._seq, pos)
    assert_same_logits(ld, le)
    k = d.hidden.shape[1]
    assert np.array_equal(llm.hidden_rows(d)[:, :k], d.hidden) and len(d.positions) == n
    # a new context reads the file alike; without its hidden rows the same cells answer otherwise
    other = make_llm(tiny_model, loopserve=c)
    f = other.load_dialogue(path)
    lf = other.decode(f, [5], [pos]).copy()
    other.remove_positions(f._seq, pos)
    assert_same_logits(lf, ld, atol=1e-5)
    other.set_hidden(f, None)
    assert np.abs(other.decode(f, [5], [pos]) - ld).max() > 1e-4


def test_allocation_needs_head_granularity():
    with pytest.raises(ValueError, match="granularity='head'"):
        LoopServeConfig(policy="snapkv", budget=64, allocation="ada")
    with pytest.raises(ValueError, match="allocation must be"):
        LoopServeConfig(policy="snapkv", budget=64, granularity="head", allocation="adaptive")
    assert LoopServeConfig(policy="snapkv", budget=256, granularity="head", allocation="ada").cells == \
        4 + 64 + 2 * 188 - 188 // 20


def test_hiding_without_flash_attention_is_refused(tiny_model, make_llm):
    llm = make_llm(tiny_model, loopserve=LoopServeConfig(policy="snapkv", budget=48, sink=4, recent=16),
                   flash_attn=False)
    d = llm.dialogue()
    llm.decode(d, [5, 6, 7], [0, 1, 2])
    d.positions = [0, 1, 2]
    with pytest.raises(LoopServeError, match="flash attention"):
        llm.set_hidden(d, np.ones((sum(llm.layer_heads()), 3), np.uint8))
