"""Progressive KV compression: budgets hold, positions stay right, nothing else changes."""
import types

import numpy as np
import pytest
from conftest import whole_spans

from loopserve_edge import LoopServeConfig, bindings, eviction
from loopserve_edge.config import N_KV_PAD
from loopserve_edge.errors import LoopServeError
from loopserve_edge.eviction import aggregate, choose_keep, choose_keep_rows, pool

GREEDY = dict(temperature=0)
SCORED_POLICIES = ["snapkv", "h2o", "loopserve"]


def cfg(policy, budget, **kw):
    kw.setdefault("sink", 4)
    kw.setdefault("recent", 16)
    kw.setdefault("interval", 8)
    kw.setdefault("window", 4)
    return LoopServeConfig(policy=policy, budget=budget, **kw)


# -- selection, without a model ---------------------------------------------------------

def test_choose_keep_keeps_sinks_recent_and_the_best_scores():
    c = cfg("loopserve", budget=24, pooling=1)
    scores = np.zeros(100)
    scores[[30, 50, 60, 70]] = [5, 4, 3, 2]
    keep = choose_keep(100, scores, c, budget=24)
    assert keep.sum() == 24
    assert keep[:4].all() and keep[-16:].all()
    assert keep[[30, 50, 60, 70]].all()
    recency = choose_keep(100, None, c, budget=24)
    assert recency[:4].all() and recency[-20:].all() and recency.sum() == 24


@pytest.mark.parametrize("pooling", [1, 4, 7])
@pytest.mark.parametrize("n,budget", [(300, 100), (100, 24), (41, 24), (20, 24), (30, 21)])
def test_head_rows_keep_what_choose_keep_keeps_row_by_row(pooling, n, budget):
    """The head-wise cut chooses for all rows at once (in blocks): the same cells, ties too."""
    rng = np.random.default_rng(n + budget + pooling)
    rows = rng.random((21, n)).astype(np.float32)
    rows[:, ::3] = 0.5  # ties
    rows[3] = 0.0       # a row with nothing scored
    c = cfg("loopserve", budget=budget, pooling=pooling)
    got = choose_keep_rows(rows, c, budget)
    want = np.stack([np.flatnonzero(choose_keep(n, r.astype(np.float64), c, budget)) for r in rows])
    assert got.shape == (21, min(n, budget))
    np.testing.assert_array_equal(got, want)


def _tied_rows(h, n, seed):
    rng = np.random.default_rng(seed)
    rows = rng.random((h, n)).astype(np.float32)
    rows[:, ::3] = 0.5    # ties
    rows[1] = 0.0         # a row with nothing scored
    rows[2, 40:] = 0.25   # a long run of equal scores: ties at the threshold
    return rows


class _NumpyAsDevice:
    """cupy's calls that choose_keep_rows makes, done by numpy: the device path's blocks and
    dispatch, on a machine without a GPU."""
    float64 = np.float64
    pad, partition = staticmethod(np.pad), staticmethod(np.partition)
    cumsum, nonzero = staticmethod(np.cumsum), staticmethod(np.nonzero)
    cuda = types.SimpleNamespace(memory=types.SimpleNamespace(OutOfMemoryError=MemoryError))

    def __init__(self, fail=None):
        self.blocks, self.fail, self.released = [], fail, 0
        pool = types.SimpleNamespace(free_all_blocks=self._release)
        self.get_default_memory_pool = self.get_default_pinned_memory_pool = lambda: pool

    def _release(self):
        self.released += 1

    def asarray(self, a):
        if self.fail is not None:
            raise self.fail
        self.blocks.append(a.shape)
        return np.array(a)

    asnumpy = staticmethod(np.asarray)


@pytest.mark.parametrize("mode,device_used", [("on", True), ("auto", False), ("off", False)])
def test_the_device_path_runs_where_asked_in_blocks_and_keeps_the_same_cells(monkeypatch, mode, device_used):
    rows = _tied_rows(21, 300, 0)
    c = cfg("loopserve", budget=100, pooling=7, cupy_select=mode)
    want = choose_keep_rows(rows, cfg("loopserve", budget=100, pooling=7, cupy_select="off"), 100)
    dev = _NumpyAsDevice()
    monkeypatch.setattr(eviction.cupy_device, "module", lambda: dev)
    monkeypatch.setattr(eviction, "CUPY_BLOCK", 5 * 300)  # blocks of 5 rows: 21 rows in 5 blocks
    got = choose_keep_rows(rows, c, 100)
    np.testing.assert_array_equal(got, want)
    assert dev.blocks == ([(5, 300)] * 4 + [(1, 300)] if device_used else [])


def _attention_like(h, n, seed):
    """A few large scores and many small, rounded to f16 so that many tie, and a zero row."""
    rng = np.random.default_rng(seed)
    rows = (rng.random((h, n), dtype=np.float32) ** 8).astype(np.float16).astype(np.float32)
    rows[0] = 0.0
    return rows


def _sampled_high(h, n, seed):
    """Rows whose high scores sit just at the cells the runtime samples (every n // 2048th) for
    its shortcut to the k-th highest: the sample's bound then admits too few cells, and the
    whole row is searched (with pooling 1; wider pooling spreads each peak over its window)."""
    rows = _attention_like(h, n, seed) * 1e-3
    step = max(1, n // 2048)
    rows[:, ::step] = 1 + np.random.default_rng(seed).random((h, len(range(0, n, step))), dtype=np.float32)
    return rows


@pytest.mark.parametrize("rows_of", [_tied_rows, _attention_like, _sampled_high])
@pytest.mark.parametrize("h,n,budget,pooling", [(37, 500, 100, 7), (21, 300, 100, 1), (5, 41, 24, 4),
                                                (9, 90, 88, 7), (64, 2176, 2048, 7),
                                                # a long history: the k-th highest from a sample's bound
                                                (6, 20000, 512, 7), (4, 40000, 2048, 1), (3, 16384, 300, 5)])
def test_the_runtimes_choice_keeps_what_numpys_keeps(rows_of, h, n, budget, pooling):
    """The host's choice runs in the runtime's C++ (llama_loopserve_select_rows); numpy's
    (_keep_rows, which the device path runs through cupy) is the reference: the same cells, the
    pooling's rounding and the ties included. 64 x 2176 (a periodic cut at budget 2048) runs on
    several threads."""
    rows = rows_of(h, n, h + n)
    c = cfg("loopserve", budget=budget, pooling=pooling, cupy_select="off")
    want = eviction._keep_rows(rows, pooling, c.sink, n - c.recent, budget)
    got = choose_keep_rows(rows, c, budget)
    assert got.shape == (h, budget)
    np.testing.assert_array_equal(got, want)


def test_the_runtimes_threads_keep_the_cells_one_thread_keeps():
    rows = _attention_like(67, 2176, 5)  # 67 rows over 8 threads: the last thread's share is short
    out = {}
    for threads in (1, 8):
        o = np.empty((67, 2048), np.int32)
        assert bindings.llama_loopserve_select_rows(rows.ctypes.data_as(bindings._f32p), 67, 2176, 7, 4, 2112, 2048,
                                                    threads, o.ctypes.data_as(bindings._i32p)) == 0
        out[threads] = o
    np.testing.assert_array_equal(out[1], out[8])
    np.testing.assert_array_equal(out[1], eviction._keep_rows(rows, 7, 4, 2112, 2048))


def test_scores_that_cannot_be_ranked_get_a_clear_error():
    rows = _tied_rows(4, 300, 0)
    rows[2, 50] = np.nan
    with pytest.raises(LoopServeError, match="cannot be ranked"):
        choose_keep_rows(rows, cfg("loopserve", budget=100, cupy_select="off"), 100)
    o = np.empty((1, 10), np.int32)
    ok = np.zeros((1, 20), np.float32)
    # a budget below the sinks and recent cells, or above the cells: refused
    for lo, hi, budget in ((4, 10, 9), (0, 20, 21), (5, 3, 10)):
        assert bindings.llama_loopserve_select_rows(ok.ctypes.data_as(bindings._f32p), 1, 20, 1, lo, hi, budget, 1,
                                                    o.ctypes.data_as(bindings._i32p)) == -1


def test_a_device_out_of_memory_falls_back_to_the_host_for_that_cut(monkeypatch):
    rows = _tied_rows(9, 200, 1)
    c = cfg("loopserve", budget=64, cupy_select="on")
    dev = _NumpyAsDevice(fail=MemoryError("out of device memory"))
    monkeypatch.setattr(eviction.cupy_device, "_cupy", dev)
    got = choose_keep_rows(rows, c, 64)
    np.testing.assert_array_equal(got, choose_keep_rows(rows, cfg("loopserve", budget=64, cupy_select="off"), 64))
    assert dev.released == 2  # the device's pool and the pinned one
    assert eviction.cupy_device.module() is dev  # tried again at the next cut


def test_any_other_device_failure_is_said_once_and_the_host_does_the_work_from_then_on(monkeypatch):
    rows = _tied_rows(9, 200, 2)
    c = cfg("loopserve", budget=64, cupy_select="on")
    monkeypatch.setattr(eviction.cupy_device, "_cupy", _NumpyAsDevice(fail=RuntimeError("no NVRTC")))
    with pytest.warns(RuntimeWarning, match="cupy failed .*no NVRTC.*on the host instead"):
        got = choose_keep_rows(rows, c, 64)
    np.testing.assert_array_equal(got, choose_keep_rows(rows, cfg("loopserve", budget=64, cupy_select="off"), 64))
    assert eviction.cupy_device.module() is None


@pytest.mark.parametrize("granularity,mode,policy,warmed", [("head", "on", "loopserve", True),
                                                          ("head", "auto", "loopserve", False),
                                                          ("head", "off", "loopserve", False),
                                                          ("cell", "on", "loopserve", False),
                                                          ("head", "on", "streaming", False)])
def test_a_head_wise_evictor_warms_the_device_once(monkeypatch, granularity, mode, policy, warmed):
    """cupy's start (and, once a machine, its kernels' compilation) is paid when the Llama is
    made, not by the first cut."""
    dev = _NumpyAsDevice()
    monkeypatch.setattr(eviction.cupy_device, "module", lambda: dev)
    monkeypatch.setattr(eviction, "_warm", False)
    c = cfg(policy, budget=64, granularity=granularity, cupy_select=mode)
    pool = types.SimpleNamespace(n_ctx=512, sliding_window=False)   # what the Evictor reads of its context
    eviction.Evictor(pool, c)
    eviction.Evictor(pool, c)
    assert len(dev.blocks) == (1 if warmed else 0)


def test_ties_at_the_threshold_go_to_the_latest_cells():
    c = cfg("loopserve", budget=24, pooling=1)
    scores = np.full(100, 0.5)
    scores[[30, 31]] = 2.0
    keep = choose_keep(100, scores, c, budget=24)
    # 4 sinks, 16 recent, the two best, then the two latest of the tied ones
    assert np.flatnonzero(keep[4:84]).tolist() == [26, 27, 78, 79]


@pytest.mark.skipif(eviction.cupy_device.module() is None, reason="needs cupy and a CUDA device")
@pytest.mark.parametrize("h,n,budget", [(21, 300, 100), (64, 5000, 1024), (256, 33000, 2048)])
def test_cupy_chooses_the_cells_numpy_chooses(h, n, budget):
    rows = _tied_rows(h, n, h + n)
    got = choose_keep_rows(rows, cfg("loopserve", budget=budget, cupy_select="on"), budget)
    want = choose_keep_rows(rows, cfg("loopserve", budget=budget, cupy_select="off"), budget)
    np.testing.assert_array_equal(got, want)


def test_aggregate_normalises_each_row_then_takes_mean_or_max():
    rows = np.array([[1.0, 1.0, 2.0], [0.0, 30.0, 10.0]], np.float32)
    norm = rows / rows.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(aggregate(rows, "mean"), norm.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(aggregate(rows, "max"), norm.max(axis=0), rtol=1e-6)
    assert aggregate(np.zeros((2, 3), np.float32), "mean").tolist() == [0, 0, 0]  # nothing scored yet


def test_pooling_spreads_a_peak_to_its_neighbours():
    s = np.zeros(20)
    s[10] = 7.0
    p = pool(s, 7)
    assert p.shape == s.shape
    assert np.allclose(p[7:14], 1.0) and p[6] == 0 and p[14] == 0


@pytest.mark.parametrize("span", [2, 8, 32])
@pytest.mark.parametrize("n,budget", [(300, 100), (100, 24), (41, 24), (301, 251)])
def test_spans_keep_whole_spans_ranked_by_their_summed_scores(span, n, budget):
    rng = np.random.default_rng(n + span)
    rows = (rng.random((9, n), dtype=np.float32) ** 6)
    rows[:, ::5] = 0.5  # ties
    rows[2] = 0.0       # a row with nothing scored
    c = cfg("loopserve", budget=budget, span=span, cupy_select="off")
    got = choose_keep_rows(rows, c, budget)  # the runtime's C++ on the host
    lo, hi = c.sink, n - c.recent
    for r, row in zip(got, rows):
        assert len(r) == budget and set(range(lo)) | set(range(hi, n)) <= set(r)
        assert whole_spans(np.asarray(r), lo, hi, span)
        # the reference: spans by their sums (float32), the best first, ties to the latest
        sums = [float(np.float32(row[st:min(st + span, hi)].astype(np.float64).sum())) for st in range(lo, hi, span)]
        order = sorted(range(len(sums)), key=lambda i: (-sums[i], -i))
        want, left = set(range(lo)) | set(range(hi, n)), budget - lo - (n - hi)
        for i in order:
            cells = list(range(lo + i * span, min(lo + (i + 1) * span, hi)))
            want |= set(cells[-left:]) if left < len(cells) else set(cells)
            left -= len(cells)
            if left <= 0:
                break
        assert set(r) == want
    # row by row what the cell-wise choice keeps, and numpy's (the device path's) alike
    np.testing.assert_array_equal(got, np.stack([np.flatnonzero(choose_keep(n, r.astype(np.float64), c, budget))
                                                 for r in rows]))
    np.testing.assert_array_equal(got, eviction._keep_rows(eviction.span_sums(rows, lo, hi, span), 1, lo, hi, budget))


def test_a_span_outranks_a_sharper_lone_peak():
    """Pooled cell by cell a lone peak wins; by spans the run of moderate scores does."""
    rows = np.zeros((1, 100), np.float32)
    rows[0, 30] = 1.0          # a sharp peak
    rows[0, 52:60] = 0.2       # a span of 8 (from the sink at 4: 52..59) that sums to 1.6
    by_cell = choose_keep_rows(rows, cfg("loopserve", budget=28, pooling=1, cupy_select="off"), 28)[0]
    by_span = choose_keep_rows(rows, cfg("loopserve", budget=28, span=8, cupy_select="off"), 28)[0]
    assert 30 in by_cell and 30 not in by_span
    assert set(range(52, 60)) <= set(by_span)


def test_default_interval_follows_the_budget():
    # a sixteenth, within 16..128 ...
    assert LoopServeConfig(policy="loopserve", budget=1024).interval == 64
    assert LoopServeConfig(policy="loopserve", budget=128).interval == 16
    assert LoopServeConfig(policy="loopserve", budget=256).interval == 16
    assert LoopServeConfig(policy="loopserve", budget=1000).interval == 62
    # ... up to llama.cpp's next padding step of n_kv where that is at most an eighth
    assert LoopServeConfig(policy="loopserve", budget=2048).interval == 256
    assert LoopServeConfig(policy="loopserve", budget=1200).interval == 80
    assert LoopServeConfig(policy="loopserve", budget=1 << 20).interval == 256
    assert LoopServeConfig(policy="loopserve", budget=3000).interval == 328
    for budget in range(96, 20000, 37):
        iv = LoopServeConfig(policy="loopserve", budget=budget).interval
        base = min(128, max(16, budget // 16))
        assert base <= iv <= max(base, budget // 8)
        # the padded n_kv at the most cells between cuts: never more than the sixteenth's
        assert -(-(budget + iv) // N_KV_PAD) == -(-(budget + base) // N_KV_PAD)
    assert LoopServeConfig(policy="loopserve", budget=1024, interval=7).interval == 7
    c = LoopServeConfig(policy="h2o", budget=512)
    assert LoopServeConfig.from_dict(c.to_dict()) == c


def test_a_budget_alone_asks_for_loopserve_and_full_takes_none():
    assert LoopServeConfig().policy == "full" and LoopServeConfig().budget is None
    assert LoopServeConfig(budget=512).policy == "loopserve"
    assert LoopServeConfig(policy="snapkv", budget=512).policy == "snapkv"
    c = LoopServeConfig(budget=512)
    assert LoopServeConfig.from_dict(c.to_dict()) == c
    # before, "full" kept a given budget and never evicted: a budget that did nothing
    with pytest.raises(ValueError, match="takes no budget"):
        LoopServeConfig(policy="full", budget=512)


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="needs a budget"):
        LoopServeConfig(policy="loopserve")
    with pytest.raises(ValueError, match="no room"):
        LoopServeConfig(policy="streaming", budget=10, sink=4, recent=16)
    with pytest.raises(ValueError, match="unknown policy"):
        LoopServeConfig(policy="lru", budget=100)
    with pytest.raises(ValueError, match="span must be"):
        LoopServeConfig(policy="loopserve", budget=100, span=0)
    with pytest.raises(ValueError, match="needs allocation='uniform'"):
        LoopServeConfig(policy="loopserve", budget=100, span=8, granularity="head", allocation="ada")


# -- on a model -------------------------------------------------------------------------

def test_bulk_removal_equals_range_removal(tiny_model, make_llm):
    """llama_loopserve_seq_rm_positions leaves the cache exactly as one seq_rm per run."""
    rng = np.random.default_rng(3)
    toks = [int(t) for t in rng.integers(3, 200, 120)]
    drop = np.sort(rng.choice(np.arange(4, 110), 40, replace=False))
    logits = []
    for bulk in (False, True):
        llm = make_llm(tiny_model, n_ctx=256, loopserve=LoopServeConfig(max_resident=1))
        d = llm.dialogue()
        llm.decode(d, toks, list(range(len(toks))))
        if bulk:
            llm.remove_cells(d._seq, drop)
        else:
            for p in drop:
                llm.remove_positions(d._seq, int(p), int(p) + 1)
        pos, _ = llm.attention_scores(d)
        assert list(pos) == sorted(set(range(len(toks))) - set(drop.tolist()))
        logits.append(llm.decode(d, [5, 6], [120, 121]))
    assert np.array_equal(logits[0], logits[1])



@pytest.mark.parametrize("policy", ["streaming", *SCORED_POLICIES])
def test_a_budget_above_the_context_changes_nothing(tiny_model, make_llm, policy):
    full = make_llm(tiny_model).dialogue()
    ref = [full.send(t, max_tokens=24, **GREEDY) for t in ("one thing", "another thing")]
    ref_logits = full.first_token_logits
    # above the dialogue's length, below n_ctx (512), as an n_ctx at or below the budget is refused
    llm = make_llm(tiny_model, loopserve=cfg(policy, budget=448))
    d = llm.dialogue()
    got = [d.send(t, max_tokens=24, **GREEDY) for t in ("one thing", "another thing")]
    assert got == ref
    np.testing.assert_array_equal(d.first_token_logits, ref_logits)
    assert d.evicted == 0


@pytest.mark.parametrize("policy", ["streaming", "h2o", "loopserve"])
def test_cells_never_exceed_budget_plus_interval(tiny_model, make_llm, policy):
    c = cfg(policy, budget=64)
    llm = make_llm(tiny_model, loopserve=c)
    d = llm.dialogue()
    most = 0
    for _ in d.send("x" * 40, stream=True, max_tokens=300, temperature=0.8, seed=1):
        most = max(most, d.n_cells)
        assert d.n_cells == len(d.tokens) == len(d.positions)
    assert most <= c.budget + c.interval
    assert d.evicted > 0 and d.last_stats.kv_evicted == d.evicted
    assert d.last_stats.kv_cells <= c.budget + c.interval
    # which generated tokens paid for scoring: none, all, or the window before each cut
    s = d.last_stats
    if policy == "streaming":
        assert s.scored_tokens == 0 and s.score_overhead_s == 0
    elif policy == "h2o":  # every token scored: no unscored base to compare with
        assert s.scored_tokens == s.decode_tokens and s.score_overhead_s == 0
    else:
        assert 0 < s.scored_tokens <= s.decode_tokens * c.window // c.interval + c.window


@pytest.mark.parametrize("policy", ["streaming", *SCORED_POLICIES])
def test_kept_cells_keep_their_positions_and_new_tokens_follow(tiny_model, make_llm, policy):
    """compact_positions="never" (and "auto" below half the trained context): each kept token
    keeps its position, gaps stay."""
    c = cfg(policy, budget=48, compact_positions="never")
    llm = make_llm(tiny_model, loopserve=c)
    d = llm.dialogue()
    d.send("y" * 120, max_tokens=20, **GREEDY)
    before = list(d.positions)
    grown = d.last_stats.decode_tokens if policy == "snapkv" else c.interval  # snapkv: prefill only
    assert len(before) <= c.budget + grown and d.evicted > 0
    assert before == sorted(before) and before[: c.sink] == list(range(c.sink))
    top = before[-1]
    d.send("z", max_tokens=20, **GREEDY)
    after = d.positions
    kept_old = [p for p in after if p <= top]
    assert set(kept_old) <= set(before)
    s = d.last_stats
    # new tokens continue after the highest position (no reuse of freed positions)
    assert after == sorted(set(after))
    assert after[-1] == top + s.prefilled_tokens + s.decode_tokens
    # the cache really holds exactly these positions
    pos, _ = llm.attention_scores(d) if policy in SCORED_POLICIES else (np.array(after), None)
    assert list(pos) == after


@pytest.mark.parametrize("policy", ["streaming", "loopserve"])
def test_cuts_close_the_position_gaps(tiny_model, make_llm, policy):
    """compact_positions="always": after each cut the kept cells hold positions 0..n-1, in the
    cache as in the dialogue, and new tokens follow them."""
    c = cfg(policy, budget=48, compact_positions="always")
    llm = make_llm(tiny_model, loopserve=c)
    d = llm.dialogue()
    for text in ("y" * 120, "z" * 60, "w" * 90):
        d.send(text, max_tokens=20, **GREEDY)
        assert d.positions == list(range(len(d.tokens))) and d.evicted > 0
        pos, _ = llm.attention_scores(d) if policy == "loopserve" else (np.array(d.positions), None)
        assert list(pos) == d.positions
        assert d.positions[-1] < c.budget + c.interval + 120 + 20


def test_auto_compacts_once_past_half_the_trained_context(tiny_model, make_llm, monkeypatch):
    from loopserve_edge.context import Context

    monkeypatch.setattr(Context, "n_ctx_train", property(lambda self: 400))
    llm = make_llm(tiny_model, loopserve=cfg("streaming", budget=48))   # "auto", the default
    d = llm.dialogue()
    d.send("y" * 60, max_tokens=8, **GREEDY)
    assert d.evicted > 0 and d.positions[-1] > len(d.positions)       # below 200: gaps stay
    tops = []
    for text in ("z" * 60, "w" * 60, "v" * 60, "u" * 60, "t" * 60):
        d.send(text, max_tokens=8, **GREEDY)
        tops.append(d.positions[-1])
    assert max(tops) < 200 + 8 + 70 + 8        # compacted whenever a cut found it past 200
    assert any(t < 200 for t in tops[1:])      # ... back to the cells' count, then growing again


def test_compaction_re_rotates_keys_as_llama_cpp_context_shift_does(tiny_model, make_llm):
    """One bulk call equals llama.cpp's own position shift (llama_memory_seq_add, one call per
    run of kept positions, its K-shift graph at the next decode): the same logits after."""
    from loopserve_edge.bindings import llama_c

    text = "y" * 120 + " some more words to read"
    d = make_llm(tiny_model, n_ctx=512, loopserve=cfg("streaming", budget=48, compact_positions="always")).dialogue()
    d.send(text, max_tokens=6, **GREEDY)
    old = make_llm(tiny_model, n_ctx=512, loopserve=cfg("streaming", budget=48, compact_positions="never"))
    e = old.dialogue()
    e.send(text, max_tokens=6, **GREEDY)
    assert e.tokens == d.tokens and d.evicted > 0
    assert d.positions == list(range(len(d.tokens))) and e.positions != d.positions
    probe = d.llm.tokenize("abc")
    n = len(d.tokens)
    moved = d.llm.decode(d, probe, list(range(n, n + len(probe))))
    # upstream: shift each run of consecutive kept positions down to its rank
    runs, start = [], 0
    for k in range(1, n + 1):
        if k == n or e.positions[k] != e.positions[k - 1] + 1:
            runs.append((e.positions[start], e.positions[k - 1] + 1, start - e.positions[start]))
            start = k
    assert len(runs) > 1
    for p0, p1, delta in runs:
        llama_c.llama_memory_seq_add(old._mem, e._seq, p0, p1, delta)
    shifted = old.decode(e, probe, list(range(n, n + len(probe))))
    np.testing.assert_allclose(moved, shifted, atol=1e-4, rtol=0)
    # and the positions matter: without the shift the same cache gives other logits
    f = make_llm(tiny_model, n_ctx=512, loopserve=cfg("streaming", budget=48, compact_positions="never")).dialogue()
    f.send(text, max_tokens=6, **GREEDY)
    gaps = f.llm.decode(f, probe, list(range(f.positions[-1] + 1, f.positions[-1] + 1 + len(probe))))
    assert np.abs(gaps - shifted).max() > 10 * np.abs(moved - shifted).max()


def test_a_model_that_cannot_shift_is_refused_past_its_trained_context(tiny_model, make_llm, monkeypatch):
    from loopserve_edge import LoopServeError
    from loopserve_edge.context import Context

    monkeypatch.setattr(Context, "can_shift", property(lambda self: False))
    monkeypatch.setattr(Context, "can_compact", property(lambda self: False))
    monkeypatch.setattr(Context, "n_ctx_train", property(lambda self: 300))
    llm = make_llm(tiny_model, loopserve=cfg("streaming", budget=48))
    d = llm.dialogue()
    d.send("y" * 120, max_tokens=8, **GREEDY)          # within 300 positions: fine
    assert d.positions[-1] > len(d.positions)           # cut, and the gaps stay
    with pytest.raises(LoopServeError, match="cannot be shifted.*trained context"):
        d.send("z" * 200, max_tokens=8, **GREEDY)


def test_snapkv_compresses_once_per_prefill(tiny_model, make_llm):
    c = cfg("snapkv", budget=48)
    llm = make_llm(tiny_model, loopserve=c)
    d = llm.dialogue()
    d.send("w" * 120, max_tokens=40, **GREEDY)
    # after the prefill's cut only generated tokens are added
    assert d.n_cells == c.budget + d.last_stats.decode_tokens
    assert llm.score_window == 0


def test_compressed_dialogue_saves_loads_and_continues_identically(tiny_model, make_llm, tmp_path):
    c = cfg("loopserve", budget=48)
    llm = make_llm(tiny_model, loopserve=c)
    d = llm.dialogue()
    d.send("v" * 150, max_tokens=30, **GREEDY)
    assert d.evicted > 0
    path = d.save(tmp_path / "c.lsd")
    full_size = len(d.tokens) + d.evicted
    other = make_llm(tiny_model, loopserve=c)
    e = other.load_dialogue(path)
    assert e.positions == d.positions and e.evicted == d.evicted and e.n_cells == d.n_cells
    assert d.send("next", max_tokens=30, **GREEDY) == e.send("next", max_tokens=30, **GREEDY)
    # the loaded cells are packed, the live ones have holes: summation order differs
    np.testing.assert_allclose(d.first_token_logits, e.first_token_logits, atol=1e-5)
    assert d.positions == e.positions
    assert e.n_cells < full_size


def test_a_turn_larger_than_the_context_fits_after_eviction(tiny_model, make_llm):
    c = cfg("loopserve", budget=64)
    llm = make_llm(tiny_model, n_ctx=256, loopserve=c)
    d = llm.dialogue()
    for i in range(6):  # ~6 x 120 tokens through a 256-cell context
        d.send(f"{i}" * 120, max_tokens=8, **GREEDY)
        assert d.n_cells <= c.budget + c.interval
    assert d.turns == 6


def test_long_dialogue_keeps_memory_flat(tiny_model, make_llm):
    psutil = pytest.importorskip("psutil")
    c = cfg("loopserve", budget=96)
    llm = make_llm(tiny_model, n_ctx=512, loopserve=c)
    d = llm.dialogue()
    proc = psutil.Process()
    rss, cells = [], []
    for i in range(1000):
        d.send(f"turn {i}: more words", max_tokens=4, **GREEDY)
        cells.append(d.n_cells)
        if i % 100 == 99:
            rss.append(proc.memory_info().rss)
    assert max(cells) <= c.budget + c.interval
    assert d.turns == 1000 and d.evicted > 10000
    # messages grow (they are text), the KV cache and the process do not
    assert rss[-1] - rss[1] < 32 * 2**20, [r // 2**20 for r in rss]


FILLER = ("The committee met on a grey morning to review the quarterly figures, the staffing plan "
          "and the schedule for the new building, and then adjourned without a decision. ") * 12


@pytest.mark.parametrize("policy", ["full", "streaming", "loopserve"])
def test_model_still_answers_about_kept_content(default_model, make_llm, policy):
    c = LoopServeConfig(policy=policy, budget=None if policy == "full" else 160,
                        sink=4, recent=96, interval=16, window=8)
    llm = make_llm(default_model, n_ctx=2048, loopserve=c)
    d = llm.dialogue()
    d.send(FILLER + "Summarise this in one sentence.", max_tokens=48, **GREEDY)
    reply = d.send("My cat is called Pixel. What is my cat called? Answer with the name only.",
                   max_tokens=12, **GREEDY)
    assert "Pixel" in reply
    if policy != "full":
        # far more was read than kept; well within the trained context the positions keep gaps
        assert d.evicted > 200 and d.positions[-1] > 300


def test_a_context_that_fills_before_the_deferred_cut_cuts_there(tiny_model, make_llm):
    """An input that fits but leaves fewer free cells than defer_cut: the reply does not end
    at the full context, the deferred cut comes early, scored by the tokens so far."""
    c = cfg("loopserve", budget=48, defer_cut=64)
    llm = make_llm(tiny_model, n_ctx=256, loopserve=c)
    d = llm.dialogue()
    cells = []

    def greedy(logits):
        cells.append(d.n_cells)
        return int(np.argmax(logits))

    d.send("u" * 230, max_tokens=80, token_fn=greedy)
    prompt = d.last_stats.prompt_tokens
    assert llm.n_ctx - 64 < prompt < llm.n_ctx  # not chunked, and short of the 64 tokens' room
    assert d.last_stats.finish_reason == "length" and len(cells) == 80
    # (token_fn sees the cells before its token is decoded: the last full count, then the cut)
    full = llm.n_ctx - 1 - prompt
    assert cells[:full + 1] == [prompt + k for k in range(full + 1)]
    assert cells[full + 1] == c.budget + 1 and max(cells[full + 1:]) <= c.budget + c.interval
    assert d.n_cells == len(d.tokens) and d.evicted > 0


@pytest.mark.parametrize("defer", [0, 4, 20])   # 20: beyond the interval (8)
def test_loopserve_can_defer_the_post_prefill_cut_to_the_first_generated_tokens(tiny_model, make_llm, defer):
    c = cfg("loopserve", budget=48, defer_cut=defer)
    llm = make_llm(tiny_model, loopserve=c)
    d = llm.dialogue()
    cells = []

    def greedy(logits):  # called before each generated token is decoded
        cells.append(d.n_cells)
        return int(np.argmax(logits))

    d.send("u" * 120, max_tokens=40, token_fn=greedy)
    assert len(cells) == 40
    prompt = d.last_stats.prompt_tokens
    if defer:
        # the first `defer` tokens are decoded over the whole prompt, then the cut
        assert cells[:defer] == [prompt + k for k in range(defer)]
        assert cells[defer] <= c.budget
    else:
        assert cells[0] <= c.budget
    assert max(cells[defer:]) <= c.budget + c.interval
    # a reply that ends before `defer` tokens is cut when the turn ends
    d.send("v" * 120, max_tokens=2, **GREEDY)
    assert d.n_cells <= c.budget + (0 if defer else 2) and llm.score_window == 0


@pytest.mark.parametrize("policy", ["snapkv", "loopserve"])
def test_an_input_is_scored_by_its_prefill_window_and_decoding_by_window(tiny_model, make_llm, policy):
    c = cfg(policy, budget=48, prefill_window=16, window=4, defer_cut=4 if policy == "loopserve" else None)
    llm = make_llm(tiny_model, loopserve=c)
    d = llm.dialogue()
    rows, real = [], d.evictor.compress

    def compress(dlg):
        rows.append(llm.score_rows(dlg))
        real(dlg)

    d.evictor.compress = compress
    d.send("w" * 120, max_tokens=40, **GREEDY)
    if policy == "snapkv":
        assert rows == [16]                        # its one cut: the input's last 16 tokens
    else:
        # the deferred cut: the input's last 16 and the first 4 generated; then each
        # compression every `interval` tokens: the `window` tokens before it
        assert rows[0] == 16 + 4 and set(rows[1:]) == {4} and len(rows) > 1
    assert LoopServeConfig(policy=policy, budget=256, window=8).prefill_window == 8   # None: `window`


@pytest.mark.parametrize("scored", [None, 0, 3])
def test_defer_scored_limits_the_generated_tokens_that_score_the_deferred_cut(tiny_model, make_llm, scored):
    c = cfg("loopserve", budget=48, prefill_window=16, window=4, defer_cut=12, defer_scored=scored)
    llm = make_llm(tiny_model, loopserve=c)
    d = llm.dialogue()
    rows, windows, real = [], [], d.evictor.compress

    def compress(dlg):
        rows.append(llm.score_rows(dlg))
        real(dlg)

    def greedy(logits):  # before each generated token is decoded: is that decode scored?
        windows.append(llm.score_window)
        return int(np.argmax(logits))

    d.evictor.compress = compress
    d.send("w" * 120, max_tokens=40, token_fn=greedy)
    n = 12 if scored is None else scored
    # the input's last 16 tokens and the first n generated ones; the cut still waits for 12
    assert rows[0] == 16 + n and set(rows[1:]) == {4}
    assert [w > 0 for w in windows[:12]] == [k < n for k in range(12)]
    assert d.evicted > 0 and d.n_cells <= c.budget + c.interval
    with pytest.raises(ValueError, match="defer_scored"):
        LoopServeConfig(policy="loopserve", budget=256, defer_scored=-1)


def test_defer_cut_is_64_by_default_whatever_the_interval():
    assert LoopServeConfig(policy="loopserve", budget=256).defer_cut == 64   # interval 16
    assert LoopServeConfig(policy="loopserve", budget=4096).defer_cut == 64  # interval 128
    c = LoopServeConfig(policy="loopserve", budget=256)
    assert LoopServeConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="defer_cut"):
        LoopServeConfig(policy="loopserve", budget=256, defer_cut=-1)
