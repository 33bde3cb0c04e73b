"""Budgeted prefill: an input longer than the context goes in as chunks, each cut back to the
budget, scored by the input's last tokens decoded after the chunk (chunk_probe) or by the
chunk's own last tokens."""
import numpy as np
import pytest
from conftest import assert_same_logits

from loopserve_edge import ContextFullError, LoopServeConfig, LoopServeError

GREEDY = dict(temperature=0, max_tokens=12)
LONG = " ".join(f"line {i} of a long document about ships and harbours." for i in range(40))


def _cfg(policy="loopserve", **kw):
    kw.setdefault("budget", 96)
    kw.setdefault("interval", 16)
    return LoopServeConfig(policy=policy, **kw)


@pytest.mark.parametrize("policy,granularity", [("loopserve", "cell"), ("loopserve", "head"),
                                                ("snapkv", "cell"), ("h2o", "head"), ("streaming", "cell")])
def test_an_input_several_times_the_context_goes_through_the_budget(tiny_model, make_llm, policy, granularity):
    cfg = _cfg(policy, granularity=granularity)
    llm = make_llm(tiny_model, n_ctx=256, loopserve=cfg)
    d = llm.dialogue()
    cuts, in_chunk = [], []
    real, real_compress = d.evictor.after_chunk, d.evictor.compress

    def spy(dlg, probe):
        # every chunk filled the free cells, no more, leaving room for the probe
        assert llm.cells_used + len(probe) <= llm.n_ctx - 1 and dlg.n_cells == len(dlg.tokens)
        assert len(probe) == (0 if policy == "streaming" else cfg.chunk_probe)
        in_chunk.append(True)
        real(dlg, probe)
        in_chunk.pop()
        assert dlg.n_cells <= cfg.budget

    def compress(dlg):
        if in_chunk:  # (scored policies) `window` tokens score the cut: the probe's
            cuts.append((llm.score_rows(dlg), dlg.n_cells))
        real_compress(dlg)

    d.evictor.after_chunk, d.evictor.compress = spy, compress
    assert len(llm.tokenize(LONG)) > 6 * llm.n_ctx
    reply = d.send(LONG, **GREEDY)
    s = d.last_stats
    assert s.prefill_chunks == len(cuts) + 1 >= 8
    assert s.prefilled_tokens > 6 * llm.n_ctx and s.kv_cells <= cfg.budget + cfg.interval
    if policy in ("loopserve", "snapkv"):
        assert all(rows == cfg.prefill_window for rows, _ in cuts)
    elif policy == "h2o":                        # scores accumulate: each chunk's and its probe's
        assert [r for r, _ in cuts] == [2 * cfg.prefill_window * (k + 1) for k in range(len(cuts))]
    # after the first cut, chunks fill what the budget leaves (all alike), less at most the cells
    # kept free for the reply's tokens before its deferred cut and for the probe
    filled = {n for _, n in cuts[1:]}
    assert len(filled) == 1 and llm.n_ctx - 1 - filled.pop() <= 1 + max(cfg.defer_cut, cfg.chunk_probe)
    assert np.all(np.diff(d.positions) > 0) and d.positions[-1] < llm.n_ctx_train
    assert isinstance(reply, str) and d.evicted > 0
    # and the dialogue goes on: the next turn fits and is not chunked
    d.send("and the last line?", **GREEDY)
    assert d.last_stats.prefill_chunks == 1 and d.last_stats.reused_tokens > 0


def test_each_chunk_cut_is_scored_by_the_end_of_the_input(tiny_model, make_llm):
    # the probe (the input's last tokens) is decoded right after the chunk and removed again;
    # the cut's scores are those the probe's last `window` tokens give the chunk's cells
    cfg = _cfg(granularity="head")
    llm = make_llm(tiny_model, n_ctx=256, loopserve=cfg)
    d = llm.dialogue()
    calls, cut_scores = [], []
    real_decode, real_compress = llm.decode, d.evictor.compress

    def decode(dlg, tokens, positions):
        calls.append((list(tokens), list(positions)))
        return real_decode(dlg, tokens, positions)

    def compress(dlg):
        if not cut_scores:
            pos, sc = llm.attention_scores(dlg)
            assert list(pos) == dlg.positions   # the probe's cells are gone
            cut_scores.append((pos, sc))
        real_compress(dlg)

    llm.decode, d.evictor.compress = decode, compress
    question = " Which line first mentions harbours, and what came before it?"
    d.send(LONG + question, **GREEDY)
    new = llm.tokenize(d._render(d.messages[:1]), add_bos=llm.add_bos)   # the input
    probe = new[-cfg.chunk_probe:]
    (chunk, at), (probed, probe_at) = calls[0], calls[1]
    assert chunk == new[:len(chunk)] and probed == probe
    assert probe_at == list(range(at[-1] + 1, at[-1] + 1 + len(probe)))
    assert d.positions[-1] < at[-1] + len(new) - len(chunk) + 1 + GREEDY["max_tokens"]

    # the same two decodes in a context of their own, scored by the probe's last tokens
    ref = make_llm(tiny_model, n_ctx=512).dialogue()
    ctx = ref.llm
    ctx.decode(ref, chunk, at)
    ctx.set_score_window(cfg.prefill_window)
    ctx.decode(ref, probe, probe_at)
    pos, sc = ctx.attention_scores(ref)
    got_pos, got = cut_scores[0]
    np.testing.assert_array_equal(pos[:len(chunk)], got_pos)
    np.testing.assert_allclose(sc[:len(chunk)], got, rtol=1e-3, atol=1e-6)


def test_without_a_probe_the_chunk_scores_its_own_cut(tiny_model, make_llm):
    llm = make_llm(tiny_model, n_ctx=256, loopserve=_cfg(chunk_probe=0))
    d = llm.dialogue()
    sizes, real = [], llm.decode
    llm.decode = lambda dlg, tokens, positions: (sizes.append(len(tokens)), real(dlg, tokens, positions))[1]
    d.send(LONG, **GREEDY)
    assert d.last_stats.prefill_chunks >= 8
    # chunks and generated tokens only: no probe decodes between the chunks
    assert sum(sizes[:d.last_stats.prefill_chunks]) == d.last_stats.prefilled_tokens


def test_an_input_that_fits_is_one_chunk(tiny_model, make_llm):
    d = make_llm(tiny_model, n_ctx=1024, loopserve=_cfg()).dialogue()
    d.send(LONG[:600], **GREEDY)
    assert d.last_stats.prefill_chunks == 1


def test_without_a_policy_a_long_input_is_still_refused(tiny_model, make_llm):
    d = make_llm(tiny_model, n_ctx=256).dialogue()
    with pytest.raises(ContextFullError, match="n_ctx=256"):
        d.send(LONG, **GREEDY)
    assert d.tokens == [] and d.messages == []


def test_a_chunk_that_fails_puts_the_dialogue_back(tiny_model, make_llm):
    llm = make_llm(tiny_model, n_ctx=256, loopserve=_cfg())
    d, twin = llm.dialogue(), llm.dialogue()
    for x in (d, twin):
        x.send("a first short turn", **GREEDY)
    before = (list(d.tokens), list(d.positions), list(d.messages), d.kv_text, d.evicted, d.n_cells)
    real, calls = llm.decode, []

    def failing(dlg, tokens, positions):
        calls.append(len(tokens))
        if dlg is d and len(calls) == 3:
            raise KeyboardInterrupt  # say, the user's Ctrl-C in the middle of a long input
        return real(dlg, tokens, positions)

    llm.decode = failing
    with pytest.raises(KeyboardInterrupt):
        d.send(LONG, **GREEDY)
    del llm.decode
    assert (d.tokens, d.positions, d.messages, d.kv_text, d.evicted, d.n_cells) == before
    assert d.send("next", **GREEDY) == twin.send("next", **GREEDY)
    # the same cells, but the new turn's may sit in other slots of the shared cache than the
    # twin's (the failed chunks' slots were freed), so the CPU sums them in another order; a
    # cell left over from the failed chunks would change the logits by far more
    assert_same_logits(d.first_token_logits, twin.first_token_logits, atol=1e-5)


def test_a_context_without_room_for_the_deferred_cuts_tokens_still_takes_the_input(tiny_model, make_llm):
    """n_ctx leaves room for chunks beside the budget but not for defer_cut more tokens as well:
    the chunks use that room, and the reply's deferred cut comes when the context fills."""
    cfg = _cfg(budget=190, defer_cut=64)
    llm = make_llm(tiny_model, n_ctx=256, loopserve=cfg)
    d = llm.dialogue()
    d.send(LONG, temperature=0, max_tokens=40, token_fn=lambda logits: int(np.argmax(logits)))
    s = d.last_stats
    assert s.prefill_chunks > 1 and s.finish_reason == "length" and s.decode_tokens == 40
    assert d.evicted > 0 and d.n_cells <= cfg.budget + cfg.interval and d.n_cells == len(d.tokens)


def test_a_context_with_no_room_beside_the_budget_is_refused_when_made(tiny_model, make_llm):
    """A budget that leaves no cells for new input is refused by the Llama, before any turn
    (it was accepted until the first long input); the least n_ctx it names is taken."""
    with pytest.raises(LoopServeError, match=r"n_ctx=256 .* beside the KV budget of 250.* at least 284\)"):
        make_llm(tiny_model, n_ctx=256, loopserve=_cfg(budget=250))
    # the least is taken (n_ctx stays 256: llama.cpp pads a context to 256 cells)
    d = make_llm(tiny_model, n_ctx=256, loopserve=_cfg(budget=222)).dialogue()
    d.send(LONG, **GREEDY)
    assert d.last_stats.prefill_chunks > 1 and d.n_cells <= 222 + 16
    with pytest.raises(LoopServeError, match="at least 257"):
        make_llm(tiny_model, n_ctx=256, loopserve=_cfg(budget=223))
    # unscored policies decode no probe after a chunk: one token of room is enough
    d = make_llm(tiny_model, n_ctx=256, loopserve=_cfg("streaming", budget=253)).dialogue()
    d.send(LONG, **GREEDY)
    assert d.last_stats.prefill_chunks > 1 and d.n_cells <= 253 + 16
    with pytest.raises(LoopServeError, match="at least 257"):
        make_llm(tiny_model, n_ctx=256, loopserve=_cfg("streaming", budget=254))
    # a non-uniform allocation keeps more cells than its budget: they count
    with pytest.raises(LoopServeError, match="cells with allocation 'pyramid'"):
        make_llm(tiny_model, n_ctx=256, flash_attn=True,
                 loopserve=_cfg(budget=150, granularity="head", allocation="pyramid"))
