"""`Llama.create_chat_completion` and `create_completion`: llama-cpp-python's calls over
dialogues that carry on."""
import numpy as np
import pytest

from loopserve_edge import ContextFullError, LoopServeConfig, LoopServeError
from loopserve_edge.completions import Completions
from loopserve_edge.openai_api import RequestError

GREEDY = dict(temperature=0, max_tokens=12)
SYSTEM = {"role": "system", "content": "You are terse."}


def _text(r):
    return r["choices"][0]["message"]["content"]


def test_a_completion_is_the_dialogue_reply_and_the_next_call_reuses_the_conversation(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    m = [SYSTEM, {"role": "user", "content": "first question about apples"}]
    r = llm.create_chat_completion(m, **GREEDY)
    d = make_llm(tiny_model).dialogue(system="You are terse.")
    assert _text(r) == d.send("first question about apples", **GREEDY)
    assert r["object"] == "chat.completion" and r["model"] == str(tiny_model)
    c = r["choices"][0]
    assert c["message"]["role"] == "assistant" and c["finish_reason"] in ("stop", "length")
    assert c["logprobs"] is None
    u = r["usage"]
    assert u["prompt_tokens"] == d.last_stats.prompt_tokens and u["prompt_tokens_details"]["cached_tokens"] == 0
    assert u["completion_tokens"] == d.last_stats.decode_tokens

    m += [{"role": "assistant", "content": _text(r)}, {"role": "user", "content": "second one, about pears"}]
    r2 = llm.create_chat_completion(m, **GREEDY)
    assert _text(r2) == d.send("second one, about pears", **GREEDY)
    # the whole first turn stayed in the cache: only the new message was prefilled
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert r2["usage"]["prompt_tokens"] == d.last_stats.prompt_tokens
    assert r2["loopserve"]["dialogue_id"] == r["loopserve"]["dialogue_id"]


def test_a_stream_gives_the_same_reply_in_chunks(tiny_model, make_llm):
    m = [{"role": "user", "content": "hello there"}]
    whole = make_llm(tiny_model).create_chat_completion(m, **GREEDY)
    chunks = list(make_llm(tiny_model).create_chat_completion(m, stream=True, stream_options={"include_usage": True},
                                                              **GREEDY))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == _text(whole)
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_a_stream_stopped_early_ends_the_turn_with_the_reply_so_far(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    m = [{"role": "user", "content": "tell me a story"}]
    it = llm.create_chat_completion(m, temperature=0, max_tokens=40, stream=True)
    got = [next(it) for _ in range(4)]
    it.close()
    partial = "".join(c["choices"][0]["delta"]["content"] for c in got)
    assert partial
    r = llm.create_chat_completion(m + [{"role": "assistant", "content": partial},
                                        {"role": "user", "content": "go on"}], **GREEDY)
    # the dialogue was free again and held the partial reply: nothing before "go on" recomputed
    (entry,) = llm._completions.store.entries.values()
    assert r["loopserve"]["dialogue_id"] == entry.id
    assert entry.dialogue.messages[1]["content"] == partial
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= r["usage"]["prompt_tokens"] - 16


def test_an_edited_history_branches_and_the_original_goes_on(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    m = [{"role": "user", "content": "Pick a fruit."}]
    a = _text(llm.create_chat_completion(m, **GREEDY))
    edited = llm.create_chat_completion(m + [{"role": "assistant", "content": "Zzz, qwerty."},
                                             {"role": "user", "content": "Why?"}], **GREEDY)
    cached = edited["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < edited["usage"]["prompt_tokens"]
    orig = llm.create_chat_completion(m + [{"role": "assistant", "content": a}, {"role": "user", "content": "Why?"}],
                                      **GREEDY)
    assert orig["usage"]["prompt_tokens_details"]["cached_tokens"] > cached
    assert orig["loopserve"]["dialogue_id"] != edited["loopserve"]["dialogue_id"]


def test_logprobs_cover_the_reply(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    r = llm.create_chat_completion([{"role": "user", "content": "count to ten"}], logprobs=True, top_logprobs=2,
                                   temperature=0, max_tokens=8)
    content = r["choices"][0]["logprobs"]["content"]
    # one entry a token (the tiny model's byte tokens need not make whole UTF-8 characters)
    assert len(content) == r["usage"]["completion_tokens"] - (r["choices"][0]["finish_reason"] == "stop")
    assert b"".join(bytes(e["bytes"]) for e in content).decode(errors="replace") == _text(r)
    for e in content:   # greedy: the chosen token is the most likely one
        assert len(e["top_logprobs"]) == 2 and e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"])
    # llama-cpp-python's logit_bias has integer keys: a token pushed up is chosen
    biased = llm.create_chat_completion([{"role": "user", "content": "count to ten"}], logprobs=True,
                                        logit_bias={200: 100}, temperature=0, max_tokens=1)
    assert [e["token"] for e in biased["choices"][0]["logprobs"]["content"]] == [llm.detokenize([200])]


def test_bad_calls_raise_naming_the_parameter_and_lose_nothing(tiny_model, make_llm):
    llm = make_llm(tiny_model, n_ctx=256)
    m = [{"role": "user", "content": "hi"}]
    first = llm.create_chat_completion(m, **GREEDY)
    cases = [(dict(temperature=5), "temperature"), (dict(response_format={"type": "xml"}), "response_format"),
             (dict(logit_bias={10 ** 6: 1}), "vocabulary"), (dict(loopserve={"policy": "loopserve"}), "budget"),
             (dict(loopserve={"granularity": "head"}), "granularity")]
    for kw, what in cases:
        with pytest.raises(RequestError, match=what):
            llm.create_chat_completion(m, **kw)
    with pytest.raises(ValueError, match="non-empty"):
        llm.create_chat_completion([])
    # llama-cpp-python's other samplers: accepted where they do nothing, else refused by name
    assert _text(llm.create_chat_completion(m, repeat_penalty=1.0, mirostat_mode=0, mirostat_tau=4.0,
                                            grammar=None, **GREEDY)) == _text(first)
    with pytest.raises(RequestError, match="typical_p=0.9 is not supported"):
        llm.create_chat_completion(m, typical_p=0.9)
    with pytest.raises(RequestError, match="'repeat_penalty' must be above 0"):
        llm.create_chat_completion(m, repeat_penalty=0)
    with pytest.raises(TypeError, match="n_probs"):
        llm.create_chat_completion(m, n_probs=3)
    with pytest.raises(ContextFullError):
        llm.create_chat_completion(m + [{"role": "assistant", "content": _text(first)},
                                        {"role": "user", "content": "word " * 400}], **GREEDY)
    again = llm.create_chat_completion(m + [{"role": "assistant", "content": _text(first)},
                                            {"role": "user", "content": "and?"}], **GREEDY)
    u = first["usage"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_a_conversation_opening_with_the_assistant_goes_on_in_its_dialogue(tiny_model, make_llm):
    """A greeting before the user's first message (as chat pages send): the reply is the one a
    dialogue holding the greeting gives, and the next turn prefills only its new message."""
    llm = make_llm(tiny_model)
    hello = {"role": "assistant", "content": "Hello! What shall we talk about?"}
    m = [SYSTEM, hello, {"role": "user", "content": "apples, please"}]
    r = llm.create_chat_completion(m, **GREEDY)
    d = make_llm(tiny_model).dialogue(system="You are terse.")
    d.messages = [hello]   # what the dialogue store sets from a request's history
    assert _text(r) == d.send("apples, please", **GREEDY)
    assert r["usage"]["prompt_tokens"] == d.last_stats.prompt_tokens
    m += [{"role": "assistant", "content": _text(r)}, {"role": "user", "content": "and pears?"}]
    r2 = llm.create_chat_completion(m, **GREEDY)
    assert _text(r2) == d.send("and pears?", **GREEDY)
    u = r["usage"]
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_messages_the_chat_template_refuses_raise_and_lose_nothing(tmp_path, make_llm):
    """A template's own check (Gemma's and Mistral's refuse a conversation that opens with the
    assistant) is a ChatTemplateError naming it, raised before anything is computed: the
    conversations already held go on from their caches."""
    from loopserve_edge import ChatTemplateError
    from loopserve_edge.chat_template import CHATML
    from loopserve_edge.random_gguf import write_random_llama

    strict = ("{% if messages[0]['role'] == 'assistant' %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
              "{% endif %}{% for m in messages %}{% if m['content'] == 'BOOM' %}"
              "{{ raise_exception('no BOOM here') }}{% endif %}{% endfor %}" + CHATML)
    llm = make_llm(write_random_llama(tmp_path / "strict.gguf", chat_template=strict))
    m = [{"role": "user", "content": "apples"}]
    first = llm.create_chat_completion(m, **GREEDY)
    m += [{"role": "assistant", "content": _text(first)}]
    hello = {"role": "assistant", "content": "Hello!"}
    with pytest.raises(ChatTemplateError, match="cannot render these messages: Conversation roles must"):
        llm.create_chat_completion([hello] + m + [{"role": "user", "content": "more"}], **GREEDY)
    # a request that goes on from the first conversation, with more history than its dialogue holds
    with pytest.raises(ChatTemplateError, match="no BOOM here"):
        llm.create_chat_completion(m + [{"role": "user", "content": "BOOM"}, {"role": "assistant", "content": "x"},
                                        {"role": "user", "content": "next"}], **GREEDY)
    held = llm._completions.store.entries[first["loopserve"]["dialogue_id"]]
    assert held.dialogue.messages == held.messages == m   # what its cache holds, not the refused history
    again = llm.create_chat_completion(m + [{"role": "user", "content": "and?"}], **GREEDY)
    u = first["usage"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert again["loopserve"]["dialogue_id"] == first["loopserve"]["dialogue_id"]


def test_repeat_penalty_over_llama_cpp_pythons_window(tiny_model, make_llm):
    m = [SYSTEM, {"role": "user", "content": "apples apples apples and pears"}]
    for size in (None, 4):
        llm = make_llm(tiny_model, **({} if size is None else {"last_n_tokens_size": size}))
        r = llm.create_chat_completion(m, repeat_penalty=100.0, **GREEDY)
        d = make_llm(tiny_model).dialogue(system="You are terse.")
        assert _text(r) == d.send("apples apples apples and pears", repeat_penalty=100.0,
                                  repeat_last_n=size or 64, **GREEDY)
        t = llm.create_completion("apples apples apples", repeat_penalty=100.0, **GREEDY)["choices"][0]["text"]
        assert t != llm.create_completion("apples apples apples", **GREEDY)["choices"][0]["text"]
    assert _text(r) != _text(make_llm(tiny_model).create_chat_completion(m, **GREEDY))


def test_the_config_and_each_call_settings_bound_the_cache(tiny_model, make_llm):
    llm = make_llm(tiny_model, loopserve=LoopServeConfig(policy="loopserve", budget=64, interval=8, recent=16))
    m = []
    for k in range(4):
        m.append({"role": "user", "content": f"part {k}: " + "lorem ipsum dolor sit amet " * 8})
        r = llm.create_chat_completion(m, **GREEDY)
        assert r["loopserve"]["kv_cells"] <= 64 + 8
        m.append({"role": "assistant", "content": _text(r)})
    assert r["loopserve"]["kv_evicted"] > 0
    # a call's own settings: a smaller budget for this conversation
    m.append({"role": "user", "content": "and more " * 20})
    r = llm.create_chat_completion(m, loopserve={"budget": 32, "interval": 4}, **GREEDY)
    assert r["loopserve"]["kv_cells"] <= 32 + 4


def test_conversations_beyond_the_ram_limit_are_forgotten(tiny_model, make_llm):
    llm = make_llm(tiny_model, loopserve=LoopServeConfig(max_resident=1))
    chats = Completions(llm, ram_limit=0)
    a = [{"role": "user", "content": "alpha one"}]
    ra = chats.chat(dict(messages=a, **GREEDY))
    chats.chat(dict(messages=[{"role": "user", "content": "beta one"}], **GREEDY))
    # a was swapped out to make room for b, and over the limit of 0 bytes: gone
    assert [e.messages[0]["content"] for e in chats.store.entries.values()] == ["beta one"]
    r = chats.chat(dict(messages=a + [{"role": "assistant", "content": _text(ra)},
                                        {"role": "user", "content": "alpha two"}], **GREEDY))
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


# -- text completions --------------------------------------------------------------------

PROMPT = "Once upon a time, in a land far away,"


def _greedy_by_hand(llm, prompt, n):
    d = llm.dialogue()
    toks = llm.tokenize(prompt, add_bos=llm.add_bos)
    logits = llm.decode(d, toks, list(range(len(toks))))
    out = []
    for i in range(n):
        t = int(np.argmax(logits))
        if llm.is_eog(t):
            break
        out.append(t)
        logits = llm.decode(d, [t], [len(toks) + i])
    return len(toks), llm.detokenize(out, special=False)


def test_a_text_completion_continues_the_prompt_as_given(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    r = llm(PROMPT, max_tokens=8, temperature=0)     # __call__, as llama-cpp-python's
    n_prompt, want = _greedy_by_hand(make_llm(tiny_model), PROMPT, 8)
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    c = r["choices"][0]
    assert c["text"] == want and c["logprobs"] is None and c["finish_reason"] in ("stop", "length")
    # no chat template around it: the prompt's own tokens only
    assert r["usage"]["prompt_tokens"] == n_prompt and r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    # a prompt that goes on from the last one's text reuses all of it
    more = PROMPT + c["text"] + " and then"
    r2 = llm.create_completion(more, max_tokens=4, temperature=0)
    assert r2["choices"][0]["text"] == _greedy_by_hand(make_llm(tiny_model), more, 4)[1]
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] >= n_prompt
    assert r2["loopserve"]["dialogue_id"] == r["loopserve"]["dialogue_id"]
    # an unrelated prompt gets a dialogue of its own and leaves that one whole
    other = llm.create_completion("Zebras", max_tokens=4, temperature=0)
    assert other["loopserve"]["dialogue_id"] != r["loopserve"]["dialogue_id"]
    r3 = llm.create_completion(more + r2["choices"][0]["text"], max_tokens=2, temperature=0)
    assert r3["usage"]["prompt_tokens_details"]["cached_tokens"] >= r2["usage"]["prompt_tokens"]
    # chat requests never land in a text dialogue (nor the other way)
    chat = llm.create_chat_completion([{"role": "user", "content": PROMPT}], **GREEDY)
    assert chat["loopserve"]["dialogue_id"] not in {r["loopserve"]["dialogue_id"], other["loopserve"]["dialogue_id"]}


def test_echo_streams_and_text_logprobs(tiny_model, make_llm):
    whole = make_llm(tiny_model).create_completion(PROMPT, max_tokens=8, temperature=0, echo=True)
    assert whole["choices"][0]["text"].startswith(PROMPT)
    chunks = list(make_llm(tiny_model).create_completion(PROMPT, max_tokens=8, temperature=0, echo=True,
                                                         stream=True, stream_options={"include_usage": True}))
    assert chunks[0]["choices"][0]["text"] == PROMPT
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    r = make_llm(tiny_model).create_completion(PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp, text = r["choices"][0]["logprobs"], r["choices"][0]["text"]
    n = r["usage"]["completion_tokens"] - (r["choices"][0]["finish_reason"] == "stop")
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert "".join(lp["tokens"]) == text and lp["text_offset"][0] == 0
    for tok, x, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(x)   # greedy: its own best
    streamed = [c["choices"][0]["logprobs"] for c in make_llm(tiny_model).create_completion(
        PROMPT, max_tokens=6, temperature=0, logprobs=3, stream=True) if c["choices"][0]["logprobs"]]
    assert sum((s["tokens"] for s in streamed), []) == lp["tokens"]
    assert sum((s["text_offset"] for s in streamed), []) == lp["text_offset"]
    with pytest.raises(RequestError, match="not streamed"):
        make_llm(tiny_model).create_completion(PROMPT, echo=True, logprobs=1, stream=True)
    with pytest.raises(RequestError, match="prompt"):
        make_llm(tiny_model).create_completion("")


def test_echo_with_logprobs_scores_the_prompt_token_by_token(tiny_model, make_llm, monkeypatch):
    """OpenAI's legacy scoring of a text (what lm-eval's completion models send): each prompt
    token's log-probability after the ones before it, and its most likely tokens there."""
    from loopserve_edge import context
    from loopserve_edge.sampling import logprobs

    monkeypatch.setattr(context, "SCORE_CHUNK", 5)   # several chunks of every-row logits
    llm = make_llm(tiny_model)
    other = llm.create_completion("Zebras run", max_tokens=3, temperature=0)   # a dialogue beside it
    cells = llm.cells_used
    r = llm.create_completion(PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2)
    c, lp = r["choices"][0], r["choices"][0]["logprobs"]
    toks = llm.tokenize(PROMPT, add_bos=False)
    n = len(toks) + r["usage"]["completion_tokens"] - (c["finish_reason"] == "stop")
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert "".join(lp["tokens"]) == c["text"] and c["text"].startswith(PROMPT)
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(n)]
    # by hand: one token at a time, each after BOS (where the model has one) and those before it
    ref = make_llm(tiny_model)
    d, ctx = ref.dialogue(), ([llm.bos_id] if llm.add_bos else []) + toks
    by_hand = []
    for i, t in enumerate(ctx):
        lg = ref.decode(d, [t], [i])
        if i + 1 < len(ctx):
            by_hand.append(logprobs(lg, ctx[i + 1], 2))
    head = 0 if llm.add_bos else 1
    assert lp["token_logprobs"][:head] == [None] * head and lp["top_logprobs"][:head] == [None] * head
    for (tok, x, best), got, top in zip(by_hand, lp["token_logprobs"][head:], lp["top_logprobs"][head:]):
        assert got == pytest.approx(x, abs=1e-3)
        assert len(top) <= 2 and max(top.values()) == pytest.approx(best[0][1], abs=1e-3)
    # the reply's own entries follow, as without echo
    plain = make_llm(tiny_model).create_completion(PROMPT, max_tokens=3, temperature=0, logprobs=2)
    want = plain["choices"][0]["logprobs"]["token_logprobs"]
    assert lp["token_logprobs"][len(toks):] == pytest.approx(want, abs=1e-3)
    # the other dialogue and the pool are as they were, beside the scored text's cells (kept
    # for the next text that starts as it does); max_tokens 0: the prompt alone
    assert llm.score_cache_cells == r["usage"]["prompt_tokens"] + llm.add_bos
    assert llm.cells_used == cells + llm.score_cache_cells + r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    again = llm.create_completion("Zebras run" + other["choices"][0]["text"], max_tokens=2, temperature=0)
    assert again["loopserve"]["dialogue_id"] == other["loopserve"]["dialogue_id"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    from loopserve_edge.openai_api import parse_text
    only = parse_text({"model": "m", "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert only.max_tokens == 0
    with pytest.raises(RequestError, match="max_tokens"):
        parse_text({"model": "m", "prompt": PROMPT, "max_tokens": 0})


def test_a_prompt_of_token_ids_is_their_text(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    ids = llm.tokenize(PROMPT, add_bos=llm.add_bos)
    r = llm.create_completion(ids, max_tokens=6, temperature=0, echo=True)
    want = make_llm(tiny_model).create_completion(PROMPT, max_tokens=6, temperature=0, echo=True)
    assert r["choices"][0]["text"] == want["choices"][0]["text"]
    assert r["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    for bad, what in (([llm.n_vocab], "vocabulary"), ([3, -1], "negative"), ([[1], [2]], "one prompt"),
                      ([[1], 2], "must be a string")):
        with pytest.raises(RequestError, match=what):
            llm.create_completion(bad, max_tokens=2)


def test_a_budgeted_text_dialogue_stays_within_its_budget(tiny_model, make_llm):
    llm = make_llm(tiny_model, loopserve=LoopServeConfig(policy="loopserve", budget=64, interval=8, recent=16))
    text = PROMPT
    for k in range(4):
        text += f" Part {k}: " + "lorem ipsum dolor sit amet " * 6
        r = llm.create_completion(text, max_tokens=6, temperature=0)
        assert r["loopserve"]["kv_cells"] <= 64 + 8
        text += r["choices"][0]["text"]
    assert r["loopserve"]["kv_evicted"] > 0 and r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_more_stop_strings_than_openais_four(tiny_model, make_llm):
    """lm-eval's code tasks stop at five line starts; llama-cpp-python takes any number."""
    plain = make_llm(tiny_model).create_completion(PROMPT, max_tokens=8, temperature=0)["choices"][0]["text"]
    s = plain[3:5]
    assert len(s) == 2
    stops = [f"zq{i}" for i in range(4)] + [s]
    r = make_llm(tiny_model).create_completion(PROMPT, max_tokens=8, temperature=0, stop=stops)
    assert r["choices"][0]["text"] == plain[:plain.find(s)] and r["choices"][0]["finish_reason"] == "stop"
    with pytest.raises(RequestError, match="at most 32"):
        make_llm(tiny_model).create_completion(PROMPT, stop=[f"zq{i}" for i in range(33)])


def test_scored_token_ids_get_an_entry_each_and_the_end_token_its_own(tmp_path, make_llm):
    """lm-eval reads a scored prompt's entries by its own token count (token_logprobs[ctxlen:-1],
    the one token it asked for dropped), so every id it sent has an entry, a BOS among them,
    and a reply that ended at once on the end token still has that token's."""
    from loopserve_edge.bindings import llama_c
    from loopserve_edge.random_gguf import write_random_llama
    from loopserve_edge.sampling import logprobs

    tiny_model = write_random_llama(tmp_path / "bos.gguf", add_bos=True)   # starts with BOS, as Gemma's
    llm = make_llm(tiny_model)
    assert llm.add_bos
    eos = int(llama_c.llama_vocab_eos(llm._vocab))
    ids = [llm.bos_id] + llm.tokenize(PROMPT, add_bos=False)
    r = llm.create_completion(ids, max_tokens=1, temperature=0, echo=True, logprobs=1, logit_bias={eos: 100})
    c, lp = r["choices"][0], r["choices"][0]["logprobs"]
    assert c["finish_reason"] == "stop" and c["text"] == PROMPT
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids) + 1
    assert lp["tokens"][0] == lp["tokens"][-1] == "" and lp["token_logprobs"][0] is None
    ref = make_llm(tiny_model)
    lg = ref.decode(ref.dialogue(), ids, list(range(len(ids))))
    assert lp["token_logprobs"][-1] == pytest.approx(logprobs(lg, eos, 1)[1], abs=1e-3)   # the model's own, unbiased
    # the text alone: BOS added where the model wants one, each token scored after it
    t = llm.create_completion(PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=1, logit_bias={eos: 100})
    assert t["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][1:], abs=1e-3)
    assert len(t["choices"][0]["logprobs"]["tokens"]) == len(ids)
    # without echo nothing changes: the end token is not a token of the text
    plain = llm.create_completion(PROMPT, max_tokens=1, temperature=0, logprobs=1, logit_bias={eos: 100})
    assert plain["choices"][0]["logprobs"]["tokens"] == []


def test_a_scoring_request_is_answered_by_the_scoring_pass_alone(tiny_model, make_llm):
    """What scoring tools send (echo, logprobs, one token or none): no dialogue made or
    prefilled, the answer a dialogue would give."""
    llm = make_llm(tiny_model)
    one = llm.create_completion(PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=2)
    assert one["loopserve"]["dialogue_id"] is None and not llm._calls().store.entries
    assert llm.cells_used == llm.score_cache_cells == one["usage"]["prompt_tokens"]   # the text scored, kept
    two = make_llm(tiny_model).create_completion(PROMPT, max_tokens=2, temperature=0, echo=True, logprobs=2)
    assert two["loopserve"]["dialogue_id"] is not None   # two tokens: through a dialogue
    lp1, lp2 = one["choices"][0]["logprobs"], two["choices"][0]["logprobs"]
    n = len(lp1["tokens"])
    assert lp1["tokens"] == lp2["tokens"][:n] and lp1["text_offset"] == lp2["text_offset"][:n]
    assert lp1["token_logprobs"] == pytest.approx(lp2["token_logprobs"][:n], abs=1e-3)
    assert two["choices"][0]["text"].startswith(one["choices"][0]["text"])
    assert one["usage"]["prompt_tokens"] == two["usage"]["prompt_tokens"] and one["usage"]["completion_tokens"] == 1
    # sampled, the seed's choice as a dialogue makes it
    s1 = llm.create_completion(PROMPT, max_tokens=1, temperature=1.5, seed=11, echo=True, logprobs=0)
    s2 = make_llm(tiny_model).create_completion(PROMPT, max_tokens=1, temperature=1.5, seed=11, logprobs=0)
    assert s1["choices"][0]["text"] == PROMPT + s2["choices"][0]["text"]


def _counting_rows(monkeypatch):
    """The rows each llama_decode of a scoring pass takes (SCORE_CHUNK 5: several chunks)."""
    from loopserve_edge import context

    monkeypatch.setattr(context, "SCORE_CHUNK", 5)
    rows, real = [], context.Context._decode_chunk

    def counting(self, seq, tokens, positions, last, every=False):
        if every:
            rows.append(len(tokens))
        return real(self, seq, tokens, positions, last, every)

    monkeypatch.setattr(context.Context, "_decode_chunk", counting)
    return rows


def test_scoring_goes_on_from_the_text_it_scored_last(tiny_model, make_llm, monkeypatch):
    """lm-eval sends a question once per answer, the question first: each text after the
    first decodes only from where it leaves the last one (one token before, for the logits
    there), and its entries are those it gets scored alone."""
    import os

    rows = _counting_rows(monkeypatch)
    llm, alone = make_llm(tiny_model), make_llm(tiny_model)
    question = llm.tokenize(PROMPT + " Which of them came first?", add_bos=llm.add_bos)
    answers = [llm.tokenize(a) for a in (" the red one", " the red and blue ones", " neither")]
    last = None
    for k, a in enumerate(answers):
        ids = question + a
        rows.clear()
        r = llm.create_completion(ids, max_tokens=1, temperature=0, echo=True, logprobs=2)
        shared = 0 if last is None else len(os.path.commonprefix([last, ids]))
        reused = max(0, shared - 1)
        assert sum(rows) == len(ids) - reused and (k == 0 or reused >= len(question) - 1)
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == reused
        assert llm.score_cache_cells == len(ids) and r["loopserve"]["dialogue_id"] is None
        want = alone.create_completion(ids, max_tokens=1, temperature=0, echo=True, logprobs=2)
        alone.drop_score_cache()
        got, ref = r["choices"][0]["logprobs"], want["choices"][0]["logprobs"]
        assert got["tokens"] == ref["tokens"] and r["choices"][0]["text"] == want["choices"][0]["text"]
        assert got["token_logprobs"][1:] == pytest.approx(ref["token_logprobs"][1:], abs=1e-3)
        for mine, theirs in zip(got["top_logprobs"][1:], ref["top_logprobs"][1:]):
            assert list(mine) == list(theirs)
        last = ids
    # a prefix of the last text: one token decoded, for the logits after it
    rows.clear()
    r = llm.create_completion(question, max_tokens=1, temperature=0, echo=True, logprobs=2)
    assert sum(rows) == 1 and r["usage"]["prompt_tokens_details"]["cached_tokens"] == len(question) - 1
    one = alone.create_completion(question, max_tokens=1, temperature=0, echo=True, logprobs=2)
    assert r["choices"][0]["text"] == one["choices"][0]["text"]
    # another number of best tokens: scored afresh
    rows.clear()
    r = llm.create_completion(question, max_tokens=1, temperature=0, echo=True, logprobs=1)
    assert sum(rows) == len(question) and r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert all(len(t) <= 1 for t in r["choices"][0]["logprobs"]["top_logprobs"][1:])


def test_a_dialogue_drops_the_scored_text_before_it_swaps_out_another(tiny_model, make_llm, monkeypatch):
    """The last scored text's cells and sequence go first when a dialogue needs them, freely
    (nothing is saved); the next scoring pass starts over, and a failed one leaves nothing."""
    rows = _counting_rows(monkeypatch)
    llm = make_llm(tiny_model, n_ctx=256, loopserve=LoopServeConfig(max_resident=2))
    text = PROMPT
    while len(llm.tokenize(text)) < 140:   # more than half the pool
        text += " the quick brown fox"
    first = llm.create_completion("Zebras run", max_tokens=2, temperature=0)   # one dialogue
    s = llm.create_completion(text, max_tokens=1, temperature=0, echo=True, logprobs=1)
    n = s["usage"]["prompt_tokens"]
    assert llm.score_cache_cells == n > 100
    # a second dialogue: a sequence and more cells than are free
    other = llm.create_completion(text + " and a reply", max_tokens=2, temperature=0)
    assert llm.pool_events["score_cache_drop"] == 1 and llm.pool_events["swap_out"] == 0
    assert llm.score_cache_cells == 0
    again = llm.create_completion("Zebras run" + first["choices"][0]["text"], max_tokens=1, temperature=0)
    assert again["loopserve"]["dialogue_id"] == first["loopserve"]["dialogue_id"]
    assert other["loopserve"]["dialogue_id"] != first["loopserve"]["dialogue_id"]
    rows.clear()
    s2 = llm.create_completion(text, max_tokens=1, temperature=0, echo=True, logprobs=1)
    assert sum(rows) == n and s2["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert s2["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        s["choices"][0]["logprobs"]["token_logprobs"][1:], abs=1e-3)
    # a text the pool cannot hold fails whole, and the text before it is scored afresh after
    with pytest.raises(ContextFullError):
        llm.create_completion(text * 3, max_tokens=1, temperature=0, echo=True, logprobs=1)
    assert llm.score_cache_cells == 0
    rows.clear()
    s3 = llm.create_completion(text, max_tokens=1, temperature=0, echo=True, logprobs=1)
    assert sum(rows) == n and s3["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        s2["choices"][0]["logprobs"]["token_logprobs"][1:], abs=1e-3)


def test_with_batch_invariant_placement_the_scored_text_goes_before_a_repack(tiny_model, make_llm):
    """New tokens go after the highest cell in use; where the last scored text holds the cells
    at the pool's end, dropping it makes the room that a repack (every resident's state moved)
    would have."""
    from loopserve_edge import bindings

    rng = np.random.default_rng(3)
    a_toks, b_toks, text, d_toks = ([int(t) for t in rng.integers(3, 250, n)] for n in (100, 100, 250, 100))
    llm = make_llm(tiny_model, n_ctx=512, n_threads=2, flash_attn=True,
                   loopserve=LoopServeConfig(max_resident=4, batch_invariant=True))
    a, b = llm.dialogue(), llm.dialogue()
    llm.decode(a, a_toks, list(range(100)))
    llm.decode(b, b_toks, list(range(100)))
    llm.prompt_logprobs(text, 1)
    a.close()   # free cells below; 62 at the end
    assert bindings.llama_loopserve_kv_tail(llm._ctx.ctx) == 512 - 450 and llm.score_cache_cells == 250
    d = llm.dialogue()
    llm.decode(d, d_toks, list(range(100)))
    assert llm.pool_events["score_cache_drop"] == 1 and llm.pool_events["repack"] == 0
    assert llm.score_cache_cells == 0 and bindings.llama_loopserve_kv_tail(llm._ctx.ctx) == 512 - 300


def test_a_seed_of_minus_one_is_random_and_a_lone_surrogate_is_refused(tiny_model, make_llm):
    """llama-cpp-python's callers pass seed=-1 for "random" (a ValueError from numpy before); a
    string holding a lone UTF-16 surrogate (a JSON "\\ud800" escape) is a RequestError naming
    the parameter (a UnicodeEncodeError before), and the conversation is left as it was."""
    llm = make_llm(tiny_model)
    m = [{"role": "user", "content": "tell me a story"}]
    sampled = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=8)
    assert len({_text(llm.create_chat_completion(m, seed=-1, **sampled)) for _ in range(4)}) > 1
    assert _text(llm.create_chat_completion(m, seed=-9, **sampled)) == \
        _text(llm.create_chat_completion(m, seed=-9, **sampled))
    with pytest.raises(RequestError, match="lone UTF-16 surrogate") as e:
        llm.create_chat_completion([*m, {"role": "assistant", "content": "x"}, {"role": "user", "content": "a\ud800"}])
    assert e.value.param == "messages"
    with pytest.raises(RequestError, match="lone UTF-16 surrogate") as e:
        llm.create_completion("b\udfff")
    assert e.value.param == "prompt"
    d = llm.dialogue()
    d.send("hello", **GREEDY)
    before = (list(d.messages), list(d.tokens))
    with pytest.raises(LoopServeError, match="not valid Unicode"):
        d.send("c\ud801", **GREEDY)
    assert (list(d.messages), list(d.tokens)) == before
