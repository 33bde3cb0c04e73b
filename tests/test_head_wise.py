"""Head-wise KV compression: each KV head keeps its own tokens, in fewer cells, for real."""
import dataclasses
import struct

import numpy as np
import pytest
from conftest import GPU_LAYERS, assert_same_logits, step_reply, whole_spans

from loopserve_edge import LoopServeConfig, LoopServeError

GREEDY = dict(temperature=0)
F16, Q4_0, Q8_0 = 1, 2, 8


def cfg(policy="loopserve", budget=48, **kw):
    kw.setdefault("sink", 4)
    kw.setdefault("recent", 16)
    kw.setdefault("interval", 8)
    kw.setdefault("window", 4)
    kw.setdefault("granularity", "head")
    return LoopServeConfig(policy=policy, budget=budget, **kw)


def parse_seq_state(blob: bytes, n_head_kv: int) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """llama_state_seq_get_data of one sequence (llama_kv_cache::state_write, V not
    transposed, no cell extension): (cell positions, per layer K rows and V rows as
    [n_cells, n_head_kv, bytes of one head's part])."""
    off = 8  # magic, seq id
    (n_stream,) = struct.unpack_from("<I", blob, off)
    off += 4
    for _ in range(n_stream):
        (n_cells,) = struct.unpack_from("<I", blob, off)
        off += 4
        if n_cells:
            break
    pos = []
    for _ in range(n_cells):
        p, n_seq = struct.unpack_from("<iI", blob, off)
        off += 8 + 4 * n_seq
        pos.append(p)
    v_trans, n_layer = struct.unpack_from("<II", blob, off)
    off += 8
    assert v_trans == 0
    parts = []
    for _ in range(2 * n_layer):  # every layer's K, then every layer's V
        _type, row = struct.unpack_from("<iQ", blob, off)
        off += 12
        rows = np.frombuffer(blob, np.uint8, n_cells * row, off).reshape(n_cells, n_head_kv, row // n_head_kv)
        off += n_cells * row
        parts.append(rows)
    assert blob[off:] == bytes(len(blob) - off) and (len(blob) - off) % 4 == 0  # empty streams after it
    return pos, parts[:n_layer], parts[n_layer:]


def filled(make_llm, model, c, n_tokens=120, **kw):
    """A context with one sequence of n_tokens random tokens at positions 0.. (no cut yet)."""
    llm = make_llm(model, loopserve=c, **kw)
    d = llm.dialogue()
    toks = [int(t) for t in np.random.default_rng(5).integers(3, 200, n_tokens)]
    llm.decode(d, toks, list(range(n_tokens)))
    d.tokens, d.positions = toks, list(range(n_tokens))
    return llm, d


def random_selection(n_heads, n, n_keep, seed=0):
    """Each head its own n_keep cells, the last one among them (llama.cpp wants a new token
    right after the highest position held)."""
    rng = np.random.default_rng(seed)
    rows = [np.sort(np.r_[rng.choice(n - 1, n_keep - 1, replace=False), n - 1]) for _ in range(n_heads)]
    return np.stack(rows).astype(np.int32)


@pytest.mark.parametrize("kv_type", [F16, Q8_0, Q4_0])
def test_each_head_keeps_exactly_its_chosen_rows(tiny_model, make_llm, kv_type):
    """The reference: per layer and KV head, the rows of its chosen cells, in order, byte for
    byte (K and V), in the first n_keep cells; positions the latest of each cell's tokens."""
    llm, d = filled(make_llm, tiny_model, cfg(), type_k=kv_type, type_v=kv_type)
    n_head_kv = next(iter(llm._scored_heads().values()))
    n_layer = len(llm._scored_heads())
    pos0, k0, v0 = parse_seq_state(llm.sequence_state(d._seq), n_head_kv)
    assert pos0 == list(range(120))
    sel = random_selection(n_layer * n_head_kv, 120, 40)
    assert llm.keep_per_head(d, sel) == 80
    assert llm.seq_cells(d._seq) == 40
    pos1, k1, v1 = parse_seq_state(llm.sequence_state(d._seq), n_head_kv)
    assert pos1 == sel.max(axis=0).tolist()   # rows sorted by position: cell j, latest head token
    for il in range(n_layer):
        for h in range(n_head_kv):
            row = sel[il * n_head_kv + h]
            assert np.array_equal(k1[il][:, h], k0[il][row, h]), (il, h)
            assert np.array_equal(v1[il][:, h], v0[il][row, h]), (il, h)
    # the heads really differ: a cell holds rows of different tokens
    assert (sel != sel[0]).any()


def dequantized_norms(v: np.ndarray, kv_type: int) -> np.ndarray:
    """[n_cells, n_head_kv] L2 norms of the V rows parse_seq_state gives (f16 or q8_0)."""
    n_cells, n_head, nbytes = v.shape
    raw = np.ascontiguousarray(v).reshape(n_cells * n_head, nbytes)
    if kv_type == F16:
        x = raw.view(np.float16).astype(np.float64)
    else:  # q8_0: blocks of an f16 scale and 32 int8
        blocks = raw.reshape(-1, 34)
        x = blocks[:, 2:].view(np.int8).astype(np.float64) * blocks[:, :2].copy().view(np.float16).astype(np.float64)
        x = x.reshape(n_cells * n_head, -1)
    return np.sqrt((x * x).sum(axis=1)).reshape(n_cells, n_head)


@pytest.mark.parametrize("kv_type", [F16, Q8_0])
def test_value_norms_are_each_heads_v_rows_and_follow_a_cut(tiny_model, make_llm, kv_type):
    """llama_loopserve_value_norms against the V rows of the sequence's state, before and after
    a head-wise cut (each head's norms move with its tokens), in the scores' layout."""
    llm, d = filled(make_llm, tiny_model, cfg(), type_k=kv_type, type_v=kv_type)
    n_head_kv = next(iter(llm._scored_heads().values()))
    n_layer = len(llm._scored_heads())
    sel = random_selection(n_layer * n_head_kv, 120, 40, seed=2)
    for step in range(2):
        if step:
            llm.keep_per_head(d, sel)
        _, _, v = parse_seq_state(llm.sequence_state(d._seq), n_head_kv)
        want = np.concatenate([dequantized_norms(v[il], kv_type).T for il in range(n_layer)])
        got = llm.value_norms(d)
        assert got.shape == want.shape == (n_layer * n_head_kv, 40 if step else 120)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        if not step:
            before = got
    np.testing.assert_allclose(got, np.take_along_axis(before, sel, axis=1), rtol=1e-6)


def test_each_heads_scores_follow_its_tokens_through_a_cut(tiny_model, make_llm):
    """After a head-wise cut each head's summed score at cell j is the one it had for the token
    it keeps there (h2o keeps its sums through cuts), and the positions are the latest of each
    cell's tokens."""
    llm, d = filled(make_llm, tiny_model, cfg("h2o"))
    llm.set_score_window(1)
    llm.decode(d, [11], [120])  # every head's scores over the 121 cells
    llm.set_score_window(0)
    pos0, before = llm.attention_scores_by_head(d)
    assert pos0.tolist() == list(range(121)) and (before[:, :120] > 0).all()
    sel = random_selection(before.shape[0], 121, 40, seed=8)
    llm.keep_per_head(d, sel)
    pos1, after = llm.attention_scores_by_head(d)
    assert pos1.tolist() == sel.max(axis=0).tolist()
    np.testing.assert_array_equal(after, np.take_along_axis(before, sel, axis=1))
    assert not np.array_equal(after, before[:, :40])  # scores left in place would not pass


def test_value_norms_without_flash_attention_are_refused_clearly(tiny_model, make_llm):
    llm, d = filled(make_llm, tiny_model, cfg("full", budget=None, granularity="cell"), flash_attn=False)
    with pytest.raises(LoopServeError, match="flash attention"):
        llm.value_norms(d)


def test_one_selection_for_every_head_is_the_cell_wise_cut(tiny_model, make_llm):
    """Every head keeping the same cells is a cell-wise cut: the same next logits (bit for bit
    once the cell-wise cut is packed too: flash attention on the CPU sums V in f16, so the
    order of the cells shows at ~1e-4)."""
    keep = random_selection(1, 120, 40, seed=1)[0]
    out = []
    for head_wise in (False, True):
        llm, d = filled(make_llm, tiny_model, cfg(compact_positions="never"))
        if head_wise:
            n_heads = sum(llm._scored_heads().values())
            llm.keep_per_head(d, np.tile(keep, (n_heads, 1)))
        else:
            llm.remove_cells(d._seq, np.setdiff1d(np.arange(120), keep))
            llm.compact(d)
        out.append(llm.decode(d, [7, 8, 9], [120, 121, 122]))
    np.testing.assert_array_equal(out[0], out[1])


def test_the_decode_after_a_cut_does_not_reuse_the_graph_before_it(tiny_model, make_llm):
    """The move runs its own graph on the context's scheduler. A decode of the same shape as
    the one before it (one token, scored: what h2o does at every step) would otherwise reuse
    that earlier graph over the move's allocation. Reference: the same cache in a new context."""
    c = cfg("h2o")
    llm, d = filled(make_llm, tiny_model, c)
    llm.set_score_window(1)
    llm.decode(d, [11], [120])
    n_heads = sum(llm._scored_heads().values())
    sel = random_selection(n_heads, 121, 40, seed=4)
    llm.keep_per_head(d, sel)
    blob = llm.sequence_state(d._seq)
    live = llm.decode(d, [12], [121])

    other = make_llm(tiny_model, loopserve=c)
    e = other.dialogue()
    e._swapped = blob
    other.set_score_window(1)
    np.testing.assert_array_equal(other.decode(e, [12], [121]), live)


def cut_from_768(make_llm, model, c):
    """600 tokens (n_kv 768) cut head-wise to 500 cells (512 unheld): the context, the dialogue,
    its heads and its sequence state after the cut."""
    llm, d = filled(make_llm, model, c, n_tokens=600, n_ctx=1024, n_batch=1024)
    assert llm.kv_n_kv() == 768
    n_heads = sum(llm._scored_heads().values())
    llm.keep_per_head(d, random_selection(n_heads, 600, 500, seed=6))
    return llm, d, n_heads, llm.sequence_state(d._seq)


def test_n_kv_holds_through_a_cut_of_one_padding_step_and_not_more(tiny_model, make_llm):
    """The decode graph attends over n_kv cells: those in use padded to 256. A cut back to the
    budget that takes n_kv one step down keeps it where it was (patch 0012), so the graph keeps
    its shape; the extra cells are masked: the logits are those of a context holding the same
    cache at the lower n_kv, to rounding (flash attention splits its sums by n_kv: ~1e-7 on the
    CPU). A drop of two steps shrinks it."""
    c = cfg()
    llm, d, n_heads, blob = cut_from_768(make_llm, tiny_model, c)
    live = llm.decode(d, [12], [600])
    assert llm.kv_n_kv() == 768        # 501 cells: 512 unheld

    other = make_llm(tiny_model, loopserve=c, n_ctx=1024)
    e = other.dialogue()
    e._swapped = blob
    # CUDA's flash attention tiles n_kv too, f16 sums in another order: up to 9.4e-4 on the H200
    # (a cell seen that should be masked moves logits by tenths)
    assert_same_logits(other.decode(e, [12], [600]), live, atol=1e-5 if GPU_LAYERS == 0 else 2e-3)
    assert other.kv_n_kv() == 512

    llm.keep_per_head(d, random_selection(n_heads, 501, 100, seed=7))
    llm.decode(d, [13], [601])
    assert llm.kv_n_kv() == 256        # 101 cells: two steps down


def test_n_kv_is_held_for_one_token_ubatches_only(tiny_model, make_llm):
    """An input of several tokens after the cut attends over the cells in use, padded, as
    llama.cpp's own n_kv: held at the n_kv a dialogue ended with, an input's first ubatch
    replied otherwise than full attention on the H200 (budget 512, session 29). A one-token
    step after a later cut is held again."""
    c = cfg()
    llm, d, n_heads, blob = cut_from_768(make_llm, tiny_model, c)
    live = llm.decode(d, [12, 13, 14], [600, 601, 602])
    assert llm.kv_n_kv() == 512        # 503 cells, not held at 768

    other = make_llm(tiny_model, loopserve=c, n_ctx=1024)
    e = other.dialogue()
    e._swapped = blob
    assert_same_logits(other.decode(e, [12, 13, 14], [600, 601, 602]), live)

    llm.decode(d, [15], [603])
    llm.keep_per_head(d, random_selection(n_heads, 504, 250, seed=8))
    llm.decode(d, [16], [604])
    assert llm.kv_n_kv() == 512        # 251 cells, held at 512 by a one-token step


def test_head_wise_cuts_change_the_cache_and_not_its_size(tiny_model, make_llm):
    """Other selections per head give other logits than any one shared selection would."""
    llm, d = filled(make_llm, tiny_model, cfg(compact_positions="never"))
    n_heads = sum(llm._scored_heads().values())
    sel = random_selection(n_heads, 120, 40, seed=2)
    llm.keep_per_head(d, sel)
    mixed = llm.decode(d, [7, 8, 9], [120, 121, 122])
    llm2, d2 = filled(make_llm, tiny_model, cfg(compact_positions="never"))
    llm2.keep_per_head(d2, np.tile(sel[0], (n_heads, 1)))
    shared = llm2.decode(d2, [7, 8, 9], [120, 121, 122])
    assert llm.seq_cells(d._seq) == llm2.seq_cells(d2._seq) == 43
    assert np.abs(mixed - shared).max() > 1e-3


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "loopserve"])
def test_a_budget_above_the_context_changes_nothing(tiny_model, make_llm, policy):
    full = make_llm(tiny_model, flash_attn=True).dialogue()
    ref = [full.send(t, max_tokens=24, **GREEDY) for t in ("one thing", "another thing")]
    d = make_llm(tiny_model, loopserve=cfg(policy, budget=448)).dialogue()
    assert [d.send(t, max_tokens=24, **GREEDY) for t in ("one thing", "another thing")] == ref
    np.testing.assert_array_equal(d.first_token_logits, full.first_token_logits)
    assert d.evicted == 0 and d.layout == "cell"


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "loopserve"])
def test_dialogues_cut_head_wise_stay_in_budget_and_differ_from_cell_wise(tiny_model, make_llm, policy):
    logits = {}
    for gran in ("cell", "head"):
        c = cfg(policy, granularity=gran)
        d = make_llm(tiny_model, loopserve=c, flash_attn=True).dialogue()
        for t in ("x" * 150, "y" * 90):
            d.send(t, max_tokens=40, **GREEDY)
        logits[gran] = d.first_token_logits
        assert d.evicted > 0 and d.n_cells <= c.budget + max(c.interval, d.last_stats.decode_tokens)
        assert d.n_cells == len(d.tokens) == len(d.positions) == d.llm.seq_cells(d._seq)
        assert d.positions == sorted(set(d.positions))
        assert d.layout == gran
    # same budget, other tokens kept (the tiny model's greedy replies may still agree)
    assert np.abs(logits["cell"] - logits["head"]).max() > 1e-3


def test_a_head_wise_dialogue_saves_loads_and_continues_identically(tiny_model, make_llm, tmp_path):
    from loopserve_edge import state_file

    c = cfg("loopserve")
    d = make_llm(tiny_model, loopserve=c).dialogue()
    d.send("v" * 150, max_tokens=30, **GREEDY)
    assert d.evicted > 0 and d.layout == "head"
    path = d.save(tmp_path / "h.lsd")
    assert state_file.read(path).header["dialogue"]["layout"] == "head"
    e = make_llm(tiny_model, loopserve=c).load_dialogue(path)
    assert (e.positions, e.tokens, e.layout) == (d.positions, d.tokens, "head")
    assert d.send("next", max_tokens=30, **GREEDY) == e.send("next", max_tokens=30, **GREEDY)
    np.testing.assert_allclose(d.first_token_logits, e.first_token_logits, atol=1e-5)


def test_a_thousand_turns_keep_memory_flat(tiny_model, make_llm):
    c = cfg("loopserve", budget=64, interval=16)
    d = make_llm(tiny_model, n_ctx=256, loopserve=c).dialogue()
    sizes, tops = [], []
    for i in range(1000):
        d.send(f"turn {i} " + "ab" * 8, max_tokens=4, **GREEDY)
        assert d.n_cells <= c.budget + c.interval + 40
        if i % 100 == 99:
            sizes.append(d.llm.sequence_state_size(d._seq))  # the KV part of a state file
            tops.append(d.positions[-1])
    assert d.evicted > 20000 and d.layout == "head"
    assert max(sizes) - min(sizes) < 0.05 * max(sizes)       # memory flat
    # positions compacted whenever past half the trained context ("auto")
    assert max(tops) < d.llm.n_ctx_train // 2 + c.budget + c.interval + 40 < d.llm.n_ctx_train


def test_what_head_wise_cannot_do_is_refused_at_construction(tiny_model, make_llm):
    with pytest.raises(LoopServeError, match="flash attention off"):
        make_llm(tiny_model, loopserve=cfg(), flash_attn=False)
    with pytest.raises(LoopServeError, match="other than f16, q8_0 or q4_0"):
        make_llm(tiny_model, loopserve=cfg(), type_k=3, type_v=3)   # q4_1
    with pytest.raises(ValueError, match="granularity must be one of"):
        cfg(granularity="layer")
    # with policy full too: a server's requests may each choose a policy that cuts
    with pytest.raises(LoopServeError, match="flash attention off"):
        make_llm(tiny_model, loopserve=LoopServeConfig(granularity="head"), flash_attn=False)


@pytest.mark.parametrize("granularity", ["cell", "head"])
def test_a_dialogue_with_spans_keeps_whole_spans_at_its_first_cut(tiny_model, make_llm, monkeypatch, granularity):
    """span > 1 reaches the cuts of a real dialogue: the cut after the prefill (cells in position
    order) keeps, between the sinks and the recent cells, whole spans of `span` cells but one."""
    c = cfg("loopserve", granularity=granularity, span=8, defer_cut=0)
    llm = make_llm(tiny_model, loopserve=c, flash_attn=True)
    d = llm.dialogue()
    cuts = []
    if granularity == "head":
        orig = llm.keep_per_head
        monkeypatch.setattr(llm, "keep_per_head", lambda dlg, sel: (cuts.append((len(dlg.positions), sel.copy())),
                                                                    orig(dlg, sel))[1])
    else:
        orig = llm.remove_cells

        def remove(seq, positions):
            n = len(d.positions)
            cuts.append((n, np.setdiff1d(np.arange(n), positions)[None]))
            return orig(seq, positions)
        monkeypatch.setattr(llm, "remove_cells", remove)
    d.send("x" * 150, max_tokens=4, **GREEDY)
    n, sel = cuts[0]
    assert n > c.budget and sel.shape[1] == c.budget
    lo, hi = c.sink, n - c.recent
    assert all(whole_spans(row, lo, hi, 8) for row in sel)
    if granularity == "head":
        assert len({tuple(r) for r in sel}) > 1  # the heads chose apart


@pytest.mark.parametrize("granularity", ["cell", "head"])
@pytest.mark.parametrize("policy", ["h2o", "loopserve"])
def test_a_dialogue_swapped_out_between_turns_cuts_as_one_that_stayed(tiny_model, make_llm, policy, granularity):
    """A state round trip (a swap-out and back, the packing after a big cut) starts the cells
    with no scores in the runtime: H2O then ranked its next cut by the rows since (its history
    gone), a reply swapped out before its deferred cut by the rows after it came back. The
    context holds the scores through it, moved with a head-wise cut and renumbered with the
    positions, so the dialogue cuts as one that stayed in the pool."""
    c = cfg(policy, granularity=granularity, defer_cut=16, compact_positions="always")
    llm = make_llm(tiny_model, loopserve=dataclasses.replace(c, max_resident=1), flash_attn=True)
    stay = make_llm(tiny_model, loopserve=dataclasses.replace(c, max_resident=2), flash_attn=True)
    d, other, twin = llm.dialogue(), llm.dialogue(), stay.dialogue()
    for x in (d, twin):
        x.send("x" * 150, max_tokens=12, **GREEDY)
    other.send("z", max_tokens=2, **GREEDY)   # d swapped out, its scores held
    assert d._seq is None and llm.pool_events["swap_out"] == 1

    def swap_d_out(k):   # mid-reply, before its cut
        if k == 8:
            other.send("w", max_tokens=1, **GREEDY)

    # the next turn stepped as the server does
    step_reply(llm, d, d.send_steps("y" * 90, temperature=0, max_tokens=24), between=swap_d_out)
    step_reply(stay, twin, twin.send_steps("y" * 90, temperature=0, max_tokens=24))
    assert llm.pool_events["swap_out"] >= 3 and d.evicted == twin.evicted > 0
    assert d.positions == twin.positions and d.tokens == twin.tokens
    np.testing.assert_allclose(d.first_token_logits, twin.first_token_logits, atol=1e-4)
    assert d.send("more", **GREEDY) == twin.send("more", **GREEDY)


@pytest.mark.parametrize("granularity", ["cell", "head"])
def test_a_dialogue_loaded_from_its_state_file_cuts_as_one_that_stayed(tiny_model, make_llm, tmp_path, granularity):
    """A state file kept no scores, so an H2O dialogue saved and loaded (the server's dialogues
    beyond its RAM limit, after a restart; a branched conversation) ranked its next cut without
    its history. The file now keeps them (the "scores" of its header), and a loaded dialogue
    cuts as the live one does."""
    from loopserve_edge import state_file

    c = cfg("h2o", granularity=granularity)
    live = make_llm(tiny_model, loopserve=c, flash_attn=True)
    d = live.dialogue()
    d.send("x" * 150, max_tokens=12, **GREEDY)
    path = d.save(tmp_path / "d.lsd")
    field = state_file.read(path).header["dialogue"]["scores"]
    assert field["n_rows"] == live.score_rows(d) > 0 and field["shape"] == [sum(live.layer_heads()), d.n_cells]
    e = make_llm(tiny_model, loopserve=c, flash_attn=True).load_dialogue(path)
    assert e.llm.score_rows(e) == live.score_rows(d)
    for got, want in zip(e.llm.attention_scores_by_head(e), live.attention_scores_by_head(d)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    step_reply(live, d, d.send_steps("y" * 90, temperature=0, max_tokens=24))
    step_reply(e.llm, e, e.send_steps("y" * 90, temperature=0, max_tokens=24))
    assert e.evicted == d.evicted > 0 and e.positions == d.positions and e.tokens == d.tokens
    np.testing.assert_allclose(e.first_token_logits, d.first_token_logits, atol=1e-4)
    assert e.send("more", **GREEDY) == d.send("more", **GREEDY)


def test_state_file_scores_that_do_not_fit_are_refused(tiny_model, make_llm, tmp_path):
    from loopserve_edge import state_file
    from loopserve_edge.errors import StateFileError

    c = cfg("h2o")
    llm = make_llm(tiny_model, loopserve=c, flash_attn=True)
    d = llm.dialogue()
    d.send("x" * 150, max_tokens=12, **GREEDY)
    st = state_file.read(d.save(tmp_path / "d.lsd"))
    good = st.header["dialogue"]["scores"]
    for bad in ({**good, "shape": [good["shape"][0] + 1, good["shape"][1]]}, {**good, "pos": good["pos"][:-8]},
                {**good, "n_rows": 0}, {**good, "rows": "not base64!"}, [1, 2]):
        st.header["dialogue"]["scores"] = bad
        state_file.write(tmp_path / "bad.lsd", st)
        with pytest.raises(StateFileError, match="malformed dialogue header"):
            llm.load_dialogue(tmp_path / "bad.lsd")
    del st.header["dialogue"]["scores"]   # a file without them (older): loads, no scores
    state_file.write(tmp_path / "old.lsd", st)
    e = llm.load_dialogue(tmp_path / "old.lsd")
    assert llm.score_rows(e) == 0 and e.positions == d.positions
