"""Multi-turn dialogues: prefix reuse, several dialogues on one model, full contexts."""
import numpy as np
import pytest
from conftest import assert_same_logits

from loopserve_edge import ContextFullError, LoopServeConfig, LoopServeError

GREEDY = dict(temperature=0, max_tokens=12)


def test_turn_k_prefills_only_the_new_tokens(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    d = llm.dialogue(system="You are terse.")
    d.send("first question about apples", **GREEDY)
    s1 = d.last_stats
    assert s1.reused_tokens == 0 and s1.prefilled_tokens == s1.prompt_tokens
    for k, text in enumerate(["second one, about pears", "third: plums?"], start=2):
        before = len(d.tokens)
        d.send(text, **GREEDY)
        s = d.last_stats
        assert s.reused_tokens == before          # the whole history stayed in the cache
        assert s.prompt_tokens == before + s.prefilled_tokens
        # new tokens: the message (byte-level vocab, a few merges) and the template glue
        assert len(text.encode()) - 4 <= s.prefilled_tokens <= len(text.encode()) + 24
        assert s.kv_cells == len(d.tokens) == s.prompt_tokens + s.decode_tokens
        assert s.kv_capacity == llm.n_ctx
        assert s.ttft_s > 0 and d.turns == k


def test_reuse_gives_the_same_logits_as_prefilling_everything(tiny_model, make_llm):
    llm = make_llm(tiny_model, loopserve=LoopServeConfig(max_resident=2))
    d = llm.dialogue()
    d.send("tell me a story", **GREEDY)
    history = len(d.tokens)
    d.send("and another", **GREEDY)
    prompt = d.tokens[:d.last_stats.prompt_tokens]
    # The same tokens, computed in one go by a dialogue that has no cache yet.
    fresh = llm.dialogue()
    logits = llm.decode(fresh, prompt, list(range(len(prompt))))
    assert d.last_stats.reused_tokens == history > 0
    # (CPU agrees to ~1e-6; CUDA kernels differ with the batch size at ~2e-4)
    np.testing.assert_allclose(d.first_token_logits, logits, rtol=1e-3, atol=1e-3)


def test_stream_yields_the_reply_in_pieces(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    a, b = llm.dialogue(), llm.dialogue()
    pieces = list(a.send("hello there", stream=True, **GREEDY))
    assert "".join(pieces) == b.send("hello there", **GREEDY)
    assert a.messages[-1]["content"] == "".join(pieces)
    assert len(pieces) >= 1


def _run(d, turns):
    return [d.send(t, **GREEDY) for t in turns]


TURNS = {
    "a": ["alpha one", "alpha two", "alpha three"],
    "b": ["beta one", "beta two", "beta three"],
    "c": ["gamma one", "gamma two", "gamma three"],
}


@pytest.mark.parametrize("max_resident", [1, 2, 3])
def test_interleaved_dialogues_reply_as_if_alone(tiny_model, make_llm, max_resident):
    alone = {}
    llm = make_llm(tiny_model, loopserve=LoopServeConfig(max_resident=1))
    for name, turns in TURNS.items():
        alone[name] = _run(llm.dialogue(system=name), turns)

    llm2 = make_llm(tiny_model, loopserve=LoopServeConfig(max_resident=max_resident))
    ds = {name: llm2.dialogue(system=name) for name in TURNS}
    got = {name: [] for name in TURNS}
    for i in range(3):
        for name, d in ds.items():
            got[name].append(d.send(TURNS[name][i], **GREEDY))
            # switching back never prefills the history again
            assert d.last_stats.reused_tokens == len(d.tokens) - d.last_stats.prefilled_tokens - d.last_stats.decode_tokens
            if i > 0:
                assert d.last_stats.reused_tokens > 0
                assert d.last_stats.swapped_in == (max_resident < len(TURNS))
    assert got == alone
    assert len(llm2._resident) <= max_resident


def test_prompt_that_does_not_fit_leaves_the_dialogue_intact(tiny_model, make_llm):
    llm = make_llm(tiny_model, n_ctx=256)
    d = llm.dialogue()
    first = d.send("short", **GREEDY)
    snapshot = (list(d.tokens), list(d.positions), [dict(m) for m in d.messages], d.kv_text)
    with pytest.raises(ContextFullError, match="n_ctx=256"):
        d.send("x" * 400, **GREEDY)
    assert (d.tokens, d.positions, d.messages, d.kv_text) == snapshot
    assert d.n_cells == len(d.tokens)
    # and the dialogue goes on as if the failed turn never happened
    twin = llm.dialogue()
    twin.send("short", **GREEDY)
    assert d.send("next", **GREEDY) == twin.send("next", **GREEDY)
    assert first == twin.messages[1]["content"]


def test_reply_stops_when_the_context_fills(tiny_model, make_llm):
    llm = make_llm(tiny_model, n_ctx=256)
    d = llm.dialogue()
    d.send("y" * 200, temperature=0.9, seed=3, max_tokens=200)
    # the random model never says <|im_end|> on purpose: it runs into the limit
    assert d.last_stats.finish_reason in ("context_full", "stop")
    assert len(d.tokens) <= llm.n_ctx - 1
    if d.last_stats.finish_reason == "context_full":
        assert len(d.tokens) == llm.n_ctx - 1
        with pytest.raises(ContextFullError):
            d.send("more", **GREEDY)


def test_reset_forgets_the_conversation(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    d = llm.dialogue(system="sys")
    d.send("one", **GREEDY)
    d.reset()
    assert d.tokens == [] and d.messages == [] and d.n_cells == 0 and d.system == "sys"
    e = llm.dialogue(system="sys")
    assert d.send("two", **GREEDY) == e.send("two", **GREEDY)


def test_sampling_is_reproducible_with_a_seed(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    r = [llm.dialogue().send("hi", temperature=1.0, seed=7, max_tokens=16) for _ in range(2)]
    assert r[0] == r[1]
    assert llm.dialogue().send("hi", temperature=1.0, seed=8, max_tokens=16) != r[0]


def test_stop_strings_cut_the_reply_and_streaming_agrees(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    free = llm.dialogue()
    text = free.send("say something long", temperature=0, max_tokens=40)
    assert free.last_stats.finish_reason == "length" and len(text) > 12
    stop = text[5:8]                      # three characters from inside the reply
    cut = text.index(stop)
    d = llm.dialogue()
    reply = d.send("say something long", temperature=0, max_tokens=40, stop=["never there", stop])
    assert reply == text[:cut] and d.last_stats.finish_reason == "stop"
    assert d.messages[-1]["content"] == reply
    # the tokens that made the stop string stay in the cache, as an end of turn does
    assert d.last_stats.decode_tokens == len(d.tokens) - d.last_stats.prompt_tokens
    s = llm.dialogue()
    pieces = list(s.send("say something long", temperature=0, max_tokens=40, stream=True, stop=stop))
    assert "".join(pieces) == reply and all(stop not in p for p in pieces)
    with pytest.raises(LoopServeError, match="stop string"):
        llm.dialogue().send("x", stop="")


def test_completion_format_is_a_plain_transcript(tiny_model, make_llm):
    llm = make_llm(tiny_model, prompt_format="completion")
    assert llm.template.stops == ("\n",) and llm.context_settings()["prompt_format"] == "completion"
    msgs = [{"role": "system", "content": "Examples."}, {"role": "user", "content": "Text.\n\nQ?"},
            {"role": "assistant", "content": " A"}, {"role": "user", "content": "Q2?"}]
    bos = llm.template.bos_token
    assert llm.template.render(msgs) == bos + "Examples.\n\nText.\n\nQ?\nAnswer: A\n\nQ2?\nAnswer:"

    d = llm.dialogue(system="Examples.")
    reply = d.send("Text.\n\nQ?", temperature=0, max_tokens=30)
    assert "\n" not in reply and "<|im_start|>" not in d.kv_text
    with pytest.raises(LoopServeError, match="unknown prompt format 'markdown'; choose from auto, chat"):
        make_llm(tiny_model, prompt_format="markdown")


def test_auto_format_is_completion_without_a_chat_template(tiny_model, make_llm, tmp_path):
    from loopserve_edge.random_gguf import write_random_llama

    base = write_random_llama(tmp_path / "base.gguf", seed=0, chat_template=None)  # as a base model's GGUF
    llm = make_llm(base, prompt_format="auto")
    assert "tokenizer.chat_template" not in llm.metadata
    assert llm.prompt_format == "completion" and llm.template.stops == ("\n",)
    assert llm.context_settings()["prompt_format"] == "completion"   # what a state file records
    assert make_llm(base).prompt_format == "chat"                    # the Python API's default stays
    chat = make_llm(tiny_model, prompt_format="auto")                 # ChatML in its GGUF
    assert chat.prompt_format == "chat" and "<|im_start|>" in chat.template.render([{"role": "user", "content": "x"}])


def test_a_reply_prefix_is_continued_and_kept_in_the_message(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    d = llm.dialogue()
    reply = d.send("what is the key?", temperature=0, max_tokens=6, reply_prefix="The key is")
    assert d.messages[-1]["content"] == "The key is" + reply
    assert d.kv_text.endswith("The key is" + llm.detokenize(d.tokens[-d.last_stats.decode_tokens:]))
    before = len(d.tokens)
    d.send("and again?", temperature=0, max_tokens=4)
    assert d.last_stats.reused_tokens == before          # the prefix is history like any reply
    # the continuation conditions on the prompt and the prefix, as one prefill of both does
    e = llm.dialogue()
    e.send("what is the key?", temperature=0, max_tokens=1, reply_prefix="The key is")
    text = llm.template.render([{"role": "user", "content": "what is the key?"}]) + "The key is"
    bos = llm.template.bos_token
    toks = llm.tokenize(text, add_bos=llm.add_bos and not (bos and text.startswith(bos)))
    ref = llm.decode(llm.dialogue(), toks, list(range(len(toks))))
    assert_same_logits(e.first_token_logits, ref, atol=1e-4)


def test_a_tokens_text_is_the_runtimes_asked_again_or_not(tiny_model, make_llm):
    """Token texts are kept once asked for (Context._piece): every id, with and without its
    special text, gives what llama_token_to_piece gives, the second time from the store."""
    import ctypes

    from loopserve_edge.bindings import llama_c

    llm = make_llm(tiny_model)

    def runtime(t, special):
        buf = ctypes.create_string_buffer(256)
        n = llama_c.llama_token_to_piece(llm._vocab, t, buf, 256, 0, special)
        return buf.raw[:n]

    eos = int(llama_c.llama_vocab_eos(llm._vocab))
    assert runtime(eos, True) != runtime(eos, False)    # a control token: the flag matters
    for special in (True, False, True):
        assert [llm._piece(t, special) for t in range(llm.n_vocab)] == \
            [runtime(t, special) for t in range(llm.n_vocab)]


def test_a_replys_message_is_the_text_given_out_even_where_it_is_not_utf8(tiny_model, make_llm):
    """Clients send a reply back as they got it: the message the dialogue keeps (whose text the
    next request's history must match, or the dialogue branches) is that text, bytes that are not
    UTF-8 replaced as they came, not as a decoding of all the tokens at once would replace them."""
    llm = make_llm(tiny_model)
    differs = 0
    for seed in range(12):
        d = llm.dialogue()
        pieces = list(d.send("hello", stream=True, temperature=1.0, seed=seed, max_tokens=80))
        assert d.messages[-1]["content"] == "".join(pieces)
        differs += "".join(pieces) != llm.detokenize(d.reply_tokens, special=False)
        d.close()
    assert differs > 0   # the random model wrote such replies: the case this covers
