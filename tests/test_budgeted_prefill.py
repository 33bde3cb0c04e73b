"""Budgeted prefill: an input longer than the context goes in as chunks, each cut back to the
budget, scored by the chunk's own last tokens."""
import numpy as np
import pytest

from loopserve_edge import ContextFullError, LoopServeConfig

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
    cuts = []
    real = d.evictor.after_chunk

    def spy(dlg):
        # every chunk filled the free cells, no more, and (scored policies) its last
        # `window` tokens are what scores the cut
        assert llm.cells_used <= llm.n_ctx - 1 and dlg.n_cells == len(dlg.tokens)
        cuts.append((llm.score_rows(dlg), dlg.n_cells))
        real(dlg)
        assert dlg.n_cells <= cfg.budget

    d.evictor.after_chunk = spy
    assert len(llm.tokenize(LONG)) > 6 * llm.n_ctx
    reply = d.send(LONG, **GREEDY)
    s = d.last_stats
    assert s.prefill_chunks == len(cuts) + 1 >= 8
    assert s.prefilled_tokens > 6 * llm.n_ctx and s.kv_cells <= cfg.budget + cfg.interval
    assert all(n > 200 for _, n in cuts[1:])   # after the first cut, chunks fill what the budget leaves
    if policy in ("loopserve", "snapkv"):
        assert all(rows == cfg.window for rows, _ in cuts)
    elif policy == "h2o":                        # scores accumulate over every chunk
        assert [r for r, _ in cuts] == [cfg.window * (k + 1) for k in range(len(cuts))]
    assert np.all(np.diff(d.positions) > 0) and d.positions[-1] < llm.n_ctx_train
    assert isinstance(reply, str) and d.evicted > 0
    # and the dialogue goes on: the next turn fits and is not chunked
    d.send("and the last line?", **GREEDY)
    assert d.last_stats.prefill_chunks == 1 and d.last_stats.reused_tokens > 0


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
    np.testing.assert_array_equal(d.first_token_logits, twin.first_token_logits)


def test_a_context_with_no_room_beside_the_budget_says_so(tiny_model, make_llm):
    d = make_llm(tiny_model, n_ctx=256, loopserve=_cfg(budget=250)).dialogue()
    with pytest.raises(ContextFullError, match="beside the KV budget of 250"):
        d.send(LONG, **GREEDY)
    assert d.tokens == [] and d.n_cells == 0
