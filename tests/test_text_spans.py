"""Turns whose chat template rewrites earlier text (a reasoning model's template drops a reply's
thinking once the next user message follows it): only what the rewrite reaches is recomputed,
with or without cuts before it (text_spans)."""
import dataclasses

import numpy as np
import pytest
from test_reasoning import chatml

from loopserve_edge import LoopServeConfig, StateFileError
from loopserve_edge.dialogue import Dialogue, common_start
from loopserve_edge.random_gguf import write_random_llama
from loopserve_edge.text_spans import of_pieces, rewind

THINKING = chatml()   # replies lose their thinking in the history, as Qwen3's and DeepSeek-R1's
# a reply that thinks, then answers
REPLY = dict(temperature=0, max_tokens=120, grammar='root ::= "<think>" [a-z ]{40,60} "</think>" [a-z ]{4,12}')
BUDGET = LoopServeConfig(policy="loopserve", budget=48, recent=16, interval=16, window=4)


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("thinking") / "thinking.gguf", seed=0, chat_template=THINKING)


def test_spans_of_pieces_are_exact_where_the_pieces_spell_the_text():
    assert of_pieces([b"ab", b"c", b"\xc3", b"\xa9"], 10, "abc\u00e9".encode()) == [(10, 12), (12, 13), (13, 14), (14, 15)]
    # a BOS the tokenizer added spells nothing of the text
    assert of_pieces([b"<s>", b"hi"], 0, b"hi", skip=1) == [(0, 0), (0, 2)]
    # pieces that do not spell it (a space prefix the tokenizer added): each spans all of it
    assert of_pieces([b" hi", b" there"], 5, b"hi there") == [(5, 13), (5, 13)]


def test_rewind_keeps_the_cells_before_the_first_one_a_rewrite_reaches():
    text = "abcd\u00e9f".encode()                   # the new render: bytes 4-5 are one character
    spans = [(0, 0), (0, 2), (2, 4), (4, 5), (5, 7)]  # BOS, then tokens; one ends inside the character
    assert rewind(spans, 7, text) == (5, 7)           # (the caller handles text that extends the cache)
    assert rewind(spans, 3, text) == (2, 2)           # a token the rewrite reaches goes whole
    assert rewind(spans, 5, text) == (3, 4)           # not inside a character, nor after half of it
    assert rewind(spans, 0, text) == (1, 0)           # the BOS stays
    # evicted text between kept cells: recomputed from where the texts part, not from the last kept cell
    assert rewind([(0, 2), (6, 7)], 5, b"abcdeXg") == (1, 5)
    # cells spanning a whole stretch (pieces that did not spell it) go together
    assert rewind([(0, 2), (2, 9), (2, 9)], 4, b"abcdefghi") == (1, 2)


def _spelled(llm, d) -> bool:
    """Every cell's span in kv_text holds its token's text (the cache is the text)."""
    kv = d.kv_text.encode()
    return all(kv[s:e] == llm._piece(t) for t, (s, e) in zip(d.tokens, d.spans))


@pytest.mark.parametrize("cfg,n_ctx,words", [(None, 1024, 1), (BUDGET, 1024, 1),
                                             (dataclasses.replace(BUDGET, granularity="head"), 1024, 1),
                                             (BUDGET, 256, 60)], ids=["full", "cut", "head-wise", "chunked"])
def test_a_template_dropping_past_reasoning_recomputes_only_the_last_reply(thinking_model, make_llm, cfg, n_ctx,
                                                                           words):
    """`chunked`: each question longer than the cells free beside the history, prefilled in chunks
    cut back to the budget one by one (budgeted prefill)."""
    llm = make_llm(thinking_model, n_ctx=n_ctx, loopserve=cfg)
    d = llm.dialogue()
    for k in range(5):
        question = f"question {k} " + "lorem ipsum " * words
        if k:
            before = [e for _, e in d.spans]
            kv = d.kv_text.encode()
            reply_start = len(kv) - len(d.messages[-1]["content"].encode())
            rendered = d._render(d.messages + [{"role": "user", "content": question}]).encode()
            assert common_start(kv, rendered) == reply_start   # the template dropped the thinking
        d.send(question, **REPLY)
        s = d.last_stats
        assert (s.prefill_chunks > 1) == (words > 1)
        assert "</think>" in d.messages[-1]["content"] and _spelled(llm, d)
        if k:
            # the cells before the reply stayed, cut or not; the answer without its thinking, the
            # new message and the template's glue were computed, nothing before them
            assert s.reused_tokens == sum(e <= reply_start for e in before) > 0
            assert s.prefilled_tokens == len(llm.tokenize(rendered[reply_start:]))
    assert (d.evicted > 0) == (cfg is not None)
    if cfg is None:   # the cache is what computing the conversation's tokens afresh gives
        prompt = d.tokens[:s.prompt_tokens]
        fresh = llm.dialogue()
        logits = llm.decode(fresh, prompt, list(range(len(prompt))))
        np.testing.assert_allclose(d.first_token_logits, logits, rtol=1e-3, atol=1e-3)


def test_a_reply_that_is_not_utf8_goes_whole_when_the_template_rewrites_it(tiny_model, make_llm):
    llm = make_llm(tiny_model, n_ctx=1024, loopserve=BUDGET)
    d = llm.dialogue()
    reply = d.send("hello", temperature=1.0, seed=3, max_tokens=100)
    assert "\ufffd" in reply   # the random model wrote bytes that are not UTF-8
    kv = d.kv_text.encode()
    start = len(d._render(d.messages[:-1]).encode())   # where the reply begins
    assert all(s >= start and (s, e) == (start, len(kv)) or e <= start for s, e in d.spans)
    # a client sends the reply back edited from its middle on
    edited = reply[:len(reply) // 2] + "EDIT"
    d.messages[-1] = {"role": "assistant", "content": edited}
    n_before = sum(e <= start for _, e in d.spans)
    d.send("next", temperature=0, max_tokens=4)
    assert d.last_stats.reused_tokens == n_before
    assert edited in d.kv_text


def test_spans_survive_a_state_file_and_older_files_get_them(thinking_model, make_llm, tmp_path):
    llm = make_llm(thinking_model, n_ctx=1024, loopserve=BUDGET)
    d = llm.dialogue()
    for k in range(2):
        d.send(f"question {k}", **REPLY)
    assert d.evicted > 0
    header = d.to_header()
    back = Dialogue.from_header(llm, d.evictor, header, tmp_path / "x.lsd")
    assert back.spans == d.spans
    # a file from before the spans: exact where nothing was cut, else each cell spans the text
    old = {**header, "dialogue": {k: v for k, v in header["dialogue"].items() if k != "spans"}}
    assert set(Dialogue.from_header(llm, d.evictor, old, tmp_path / "x.lsd").spans) == {(0, len(d.kv_text.encode()))}
    full = make_llm(thinking_model, n_ctx=1024)
    uncut = full.dialogue()
    uncut.send("hi", **REPLY)
    h = uncut.to_header()
    del h["dialogue"]["spans"]
    assert Dialogue.from_header(full, uncut.evictor, h, tmp_path / "y.lsd").spans == uncut.spans
    for bad in ([0, 1, 2], [5, 1] * len(d.tokens), [0, 10 ** 9] * len(d.tokens), [0, 1]):
        h = d.to_header()
        h["dialogue"]["spans"] = bad
        with pytest.raises(StateFileError):
            Dialogue.from_header(llm, d.evictor, h, tmp_path / "z.lsd")
