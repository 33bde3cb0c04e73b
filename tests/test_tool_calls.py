"""Tool calls: OpenAI's tools / tool_choice / tool messages, held by a grammar to tool_calls.py's
JSON form; a reply renders back to the text the model generated, so that the next request's
history finds the dialogue that holds it."""
import itertools
import json

import pytest

from loopserve_edge import tool_calls
from loopserve_edge.bindings import llama_c
from loopserve_edge.openai_api import RequestError, parse_chat

UNIT = {"type": "object", "properties": {"unit": {"enum": ["C", "F"]}, "exact": {"type": "boolean"}},
        "required": ["unit", "exact"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather", "parameters": UNIT}},
         {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {},
                                                                        "additionalProperties": False}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


def _call(name="get_weather", args='{"unit":"C","exact":true}', cid="call_1"):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def _rendered(msg: dict, parallel: bool = False) -> str:
    """The text an OpenAI assistant message is shown to the model as, in a next request."""
    req = parse_chat({"model": "m", "messages": USER + [msg, {"role": "user", "content": "next"}],
                      "tools": TOOLS, "parallel_tool_calls": parallel})
    return req.history[-1]["content"]


@pytest.mark.parametrize("choice,parallel", [("required", False), ("required", True), ("auto", False),
                                             ({"type": "function", "function": {"name": "now"}}, False)])
def test_replies_are_in_the_form_and_render_back_to_the_same_text(tiny_model, make_llm, choice, parallel):
    llm = make_llm(tiny_model, n_ctx=2048)   # the tools' description: ~600 byte tokens
    # with "auto" the random model's choice between '{"tool_call"' and '{"response"' (a 't' or
    # an 'r') leans as its weights do (on the GPU no call in 16 seeds): 't' is favoured so that
    # calls come, whose text replies rarely close within max_tokens anyway
    bias = {str(llm.tokenize("t")[0]): 4.0} if choice == "auto" else None
    kinds = set()
    for seed in range(16):
        r = llm.create_chat_completion(USER, tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel,
                                       temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, max_tokens=96,
                                       logit_bias=bias)
        ch = r["choices"][0]
        msg = ch["message"]
        raw = llm._calls().store.entries[r["loopserve"]["dialogue_id"]].dialogue.messages[-1]["content"]
        if ch["finish_reason"] == "length":   # cut short: what there is of a text or of the calls
            reader = tool_calls.ReplyReader()
            deltas = reader.feed(raw)
            assert not reader.done
            # (where the random bytes are not UTF-8, the reply and the dialogue's copy may differ
            # in their replacement characters)
            if reader.form == "text":
                assert "\ufffd" in raw or msg["content"] == "".join(d["content"] for d in deltas)
            elif reader.form is not None:
                assert msg["content"] is None and [c["function"]["name"] for c in msg["tool_calls"]] == \
                    [n for _, n, _ in reader.calls]
            continue
        if msg.get("tool_calls"):
            assert ch["finish_reason"] == "tool_calls" and msg["content"] is None
            names = [c["function"]["name"] for c in msg["tool_calls"]]
            assert set(names) <= ({"now"} if isinstance(choice, dict) else {"get_weather", "now"})
            assert parallel or len(names) == 1
            assert raw.startswith('{"tool_calls":[' if parallel else '{"tool_call":')
            for c in msg["tool_calls"]:
                args = json.loads(c["function"]["arguments"])
                assert args == {} if c["function"]["name"] == "now" else (
                    set(args) == {"unit", "exact"} and args["unit"] in "CF" and isinstance(args["exact"], bool))
            assert len({c["id"] for c in msg["tool_calls"]}) == len(names)
            kinds.add("call")
        else:
            assert choice == "auto" and ch["finish_reason"] == "stop"
            assert raw == tool_calls.render_text(msg["content"])
            kinds.add("text")
        assert _rendered(msg, parallel) == raw   # what the client sends back is what the model wrote
    assert "call" in kinds   # (a random model's text replies rarely close within max_tokens)


def _spells(llm, gbnf: str, text: str) -> bool:
    """Whether the grammar lets a reply spell exactly this text and then end (the tiny model's
    tokens are single bytes)."""
    c = llm.grammar(gbnf)
    try:
        for tok in llm.tokenize(text):
            if not c.allows(tok):
                return False
            c.accept(tok)
        return c.allows(llama_c.llama_vocab_eos(llm._vocab))   # the reply may end here
    finally:
        c.close()


def test_the_grammar_spells_a_reply_only_as_it_renders_back(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    mode = tool_calls.mode(TOOLS, "auto", False)
    g = mode.grammar()
    text = 'Il fait "beau" à Paris\\ \n/'
    assert _spells(llm, g, tool_calls.render_text(text))
    assert _spells(llm, g, tool_calls.render_calls([("get_weather", '{ "unit": "F", "exact": true }')], False))
    for other in ['{"response":"\\u00e0"}', '{"response":"a\\/b"}', '{ "response":"a"}', '{"response": "a"}',
                  '{"response":"a\nb"}',   # a raw newline: json.dumps writes it escaped
                  '{"tool_call":{"name":"get_weather","arguments":{"unit":"K","exact":true}}}',
                  '{"tool_call": {"name":"now","arguments":{}}}', '{"tool_calls":[{"name":"now","arguments":{}}]}']:
        assert not _spells(llm, g, other), other
    assert _spells(llm, tool_calls.mode(TOOLS, "required", True).grammar(),
                   '{"tool_calls":[{"name":"now","arguments":{}},{"name":"now","arguments":{ }}]}')
    assert not _spells(llm, tool_calls.mode(TOOLS, "required", False).grammar(), tool_calls.render_text("a"))
    none = tool_calls.mode(TOOLS, "none", False).grammar()
    assert _spells(llm, none, tool_calls.render_text("a")) and not _spells(llm, none, '{"tool_call":{"name":"now","arguments":{}}}')


def _streamed(raw: str, cuts) -> tuple[str, list[list[str]], bool]:
    """raw fed to a ReplyReader in the pieces the cuts make: (content, calls as [id, name,
    arguments] put together from the deltas as a client does, done)."""
    r, content, calls = tool_calls.ReplyReader(), [], []
    for a, b in zip((0,) + cuts, cuts + (len(raw),)):
        for d in r.feed(raw[a:b]):
            content.append(d.get("content", ""))
            for c in d.get("tool_calls", []):
                if "id" in c:
                    assert c["index"] == len(calls)
                    calls.append([c["id"], c["function"]["name"], ""])
                calls[c["index"]][2] += c["function"]["arguments"]
    assert [list(c) for c in r.calls] == calls
    return "".join(content), calls, r.done


def test_a_reply_streams_whatever_its_pieces():
    content = 'Il fait "beau"\\ à Paris.\n\tFin\b\f\r'
    raw = tool_calls.render_text(content)
    assert json.loads(raw) == {"response": content}
    for cuts in itertools.combinations(range(1, len(raw)), 2):
        assert _streamed(raw, cuts) == (content, [], True)
    args = '{ "s": "a}\\"]{" , "n": [1, {"x": null}]} '
    raw = tool_calls.render_calls([("get_weather", args), ("now", "{}")], True)
    for cuts in itertools.combinations(range(1, len(raw)), 2):
        text, calls, done = _streamed(raw, cuts)
        assert not text and done and [(n, a) for _, n, a in calls] == [("get_weather", args), ("now", "{}")]
    # cut short: what there is, not done
    text, calls, done = _streamed(raw[:60], (30,))
    start = raw.index(":", raw.index('"arguments"')) + 1
    assert not done and [(n, a) for _, n, a in calls] == [("get_weather", raw[start:60])]


def test_reading_back_keeps_the_arguments_as_generated():
    raw = '{"tool_calls":[{"name":"get_weather","arguments":{ "unit": "F" , "exact":false} },{"name":"now","arguments":{}}]}'
    _, calls, done = _streamed(raw, ())
    assert done and [(n, a) for _, n, a in calls] == [("get_weather", '{ "unit": "F" , "exact":false} '), ("now", "{}")]
    assert tool_calls.render_calls([(n, a) for _, n, a in calls], True) == raw
    for bad in ['{"tool_call":{"name":"now","arguments":{', '{"response":"unfinished', '{"response":"a"', '{"other":1}',
                "[]", '{"tool_call":{"name":"now","arguments":{}}']:
        assert not _streamed(bad, ())[2], bad


def test_history_with_calls_and_results_becomes_alternating_turns():
    msgs = USER + [{"role": "assistant", "content": None, "tool_calls": [_call(cid="a"), _call("now", "{}", "b")]},
                   {"role": "tool", "tool_call_id": "b", "content": "noon"},
                   {"role": "tool", "tool_call_id": "a", "content": "18 C"},
                   {"role": "user", "content": "And tomorrow?"}]
    req = parse_chat({"model": "m", "messages": msgs, "tools": TOOLS, "parallel_tool_calls": True})
    assert [m["role"] for m in req.history] == ["user", "assistant"]
    assert req.history[1]["content"] == ('{"tool_calls":[{"name":"get_weather","arguments":{"unit":"C","exact":true}},'
                                         '{"name":"now","arguments":{}}]}')
    assert req.prompt == ('{"tool_results":[{"name":"now","content":"noon"},{"name":"get_weather","content":"18 C"}]}'
                          "\n\nAnd tomorrow?")
    assert "get_weather" in req.system and req.tools.parallel and req.grammar
    # whatever the tool_choice, the same prompt (the dialogue goes on in place); "none": a text reply
    for choice in ("none", "required", {"type": "function", "function": {"name": "now"}}):
        other = parse_chat({"model": "m", "messages": msgs, "tools": TOOLS, "parallel_tool_calls": True,
                            "tool_choice": choice})
        assert (other.system, other.history, other.prompt) == (req.system, req.history, req.prompt)
    assert other.tools.callable == ("now",) and not other.tools.text
    # no tools: the calls and results as before, the reply plain text
    req = parse_chat({"model": "m", "messages": msgs[:-1], "parallel_tool_calls": True})
    assert req.tools is None and req.grammar is None and req.system is None
    assert req.prompt.startswith('{"tool_results":[') and len(req.history) == 2


@pytest.mark.parametrize("body,param,what", [
    (dict(tools={"f": 1}), "tools", "list"),
    (dict(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools[0].function.name", "letters"),
    (dict(tools=[{"type": "retrieval"}]), "tools[0]", "function"),
    (dict(tools=TOOLS + TOOLS[:1]), "tools", "two tools"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}]), "tools[0].function.parameters",
     "schema"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "not among"),
    (dict(tool_choice="required"), "tool_choice", "needs tools"),
    (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice", "must be"),
    (dict(tools=TOOLS, parallel_tool_calls="yes"), "parallel_tool_calls", "boolean"),
    (dict(tools=TOOLS, response_format={"type": "json_object"}), "response_format", "not both"),
    (dict(messages=USER + [{"role": "tool", "tool_call_id": "x", "content": "1"}]), "messages[1].role", "has none"),
    (dict(messages=USER + [{"role": "assistant", "content": None, "tool_calls": [_call()]},
                           {"role": "tool", "tool_call_id": "x", "content": "1"}]), "messages[2].tool_call_id", "id"),
    (dict(messages=USER + [{"role": "assistant", "content": None, "tool_calls": [_call(args="{oops")]}]),
     "messages[1].tool_calls", "not JSON"),
    (dict(messages=USER + [{"role": "assistant", "content": None, "tool_calls": [_call()]}]), "messages", "results"),
    (dict(tools=TOOLS, messages=USER + [{"role": "assistant", "content": '{"resp'}]), "messages", "held"),
    (dict(messages=[{"role": "assistant", "content": None, "tool_calls": [_call()]}] + USER), "messages[0].role",
     "none comes before it"),
    (dict(messages=[{"role": "assistant", "content": "hi"}, {"role": "system", "content": "s"}] + USER),
     "messages[1].role", "before the conversation"),
    (dict(messages=USER + [{"role": "assistant", "content": None, "tool_calls": [_call()]},
                           {"role": "assistant", "content": "more"}]), "messages[2].role", "alternate"),
    (dict(functions=[{"name": "f"}]), "functions", "older form"), (dict(function_call="auto"), "function_call", "tools"),
])
def test_bad_tools_and_tool_messages_are_refused_by_name(body, param, what):
    with pytest.raises(RequestError, match=what) as e:
        parse_chat(dict({"model": "m", "messages": USER}, **body))
    assert e.value.param == param


def test_messages_of_one_role_in_a_row_are_one_turn():
    """OpenAI's API takes two user messages in a row (and a reply sent in parts); the dialogue
    is a sequence of turns, so they join, a blank line between them."""
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"},
            {"role": "user", "content": "e"}, {"role": "user", "content": "f"}]
    r = parse_chat({"model": "m", "messages": msgs})
    assert r.history == ({"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c\n\nd"})
    assert r.prompt == "e\n\nf" and r.reply_prefix == ""
    # two last assistant messages: one start of the reply
    r = parse_chat({"model": "m", "messages": msgs[:4]})
    assert r.history == () and r.prompt == "a\n\nb" and r.reply_prefix == "c\n\nd"
    # a tool call's results, then two user messages: one turn
    call = {"role": "assistant", "content": None, "tool_calls": [_call()]}
    result = {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "1"}
    r = parse_chat({"model": "m", "messages": USER + [call, result, msgs[0], msgs[1]]})
    assert r.prompt.endswith("\n\na\n\nb") and len(r.history) == 2


def test_a_conversation_may_open_with_the_assistant():
    """A chat page's greeting before the user's first message, which OpenAI takes: the opening
    is a turn of the history, and the turns alternate from it."""
    hello = {"role": "assistant", "content": "Hello! How can I help?"}
    r = parse_chat({"model": "m", "messages": [{"role": "system", "content": "s"}, hello] + USER})
    assert r.system == "s" and r.history == (hello,) and r.prompt == USER[0]["content"] and r.reply_prefix == ""
    more = [hello, {"role": "assistant", "content": "Ask away."}] + USER + [{"role": "assistant", "content": "18 C"},
                                                                         {"role": "user", "content": "And Rome?"}]
    r = parse_chat({"model": "m", "messages": more})
    assert r.history == ({"role": "assistant", "content": "Hello! How can I help?\n\nAsk away."}, USER[0],
                         {"role": "assistant", "content": "18 C"}) and r.prompt == "And Rome?"
    # the greeting, the question and the start of the reply
    r = parse_chat({"model": "m", "messages": [hello] + USER + [{"role": "assistant", "content": "It is"}]})
    assert r.history == (hello,) and r.reply_prefix == "It is"
    for msgs, param in (([hello], "messages"), ([hello] + USER * 2 + [hello, hello, hello], None),
                        ([hello] + USER + [hello, {"role": "tool", "tool_call_id": "x", "content": "1"}],
                         "messages[3].role")):
        if param is None:   # runs of one role join: still alternating
            assert parse_chat({"model": "m", "messages": msgs + USER}).prompt == USER[0]["content"]
            continue
        with pytest.raises(RequestError) as e:
            parse_chat({"model": "m", "messages": msgs})
        assert e.value.param == param


def test_a_tool_round_trip_on_the_default_model_reuses_the_dialogue(default_model, make_llm):
    llm = make_llm(default_model, n_ctx=2048)
    r = llm.create_chat_completion(USER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=64)
    msg = r["choices"][0]["message"]
    assert r["choices"][0]["finish_reason"] == "tool_calls" and msg["tool_calls"][0]["function"]["name"] == "get_weather"
    done = r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    follow = USER + [msg, {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": "18 C, sunny"}]
    chunks = list(llm.create_chat_completion(follow, tools=TOOLS, tool_choice="required", temperature=0,
                                             max_tokens=64, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == done   # nothing prefilled again
    deltas = [c for ch in chunks if ch["choices"] for c in ch["choices"][0]["delta"].get("tool_calls", [])]
    # the name first, then the arguments as they come: put together, JSON
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"]["name"] == "get_weather" and len(deltas) > 2
    assert {d["index"] for d in deltas} == {0}
    assert set(json.loads("".join(d["function"]["arguments"] for d in deltas))) == {"unit", "exact"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_branch_after_a_reply_keeps_its_generated_tokens_on_the_default_model(default_model, make_llm):
    # a reply's generated tokens need not be the ones the tokenizer makes of its text (JSON's
    # '{"' here); a request that branches after it (the first request regenerated, then the
    # first conversation sent on) still reuses all of it, as a dialogue going on in place does
    llm = make_llm(default_model, n_ctx=2048)
    kw = dict(tools=TOOLS[:1], temperature=0, max_tokens=64)
    r = llm.create_chat_completion(USER, tool_choice="required", **kw)
    msg = r["choices"][0]["message"]
    d = llm._calls().store.entries[r["loopserve"]["dialogue_id"]].dialogue
    gen = d.tokens[-r["usage"]["completion_tokens"]:]
    assert llm.tokenize(d.messages[-1]["content"]) != gen   # what makes this test worth having
    follow = USER + [msg, {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": "18 C"}]
    r2 = llm.create_chat_completion(follow, **kw)
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == r["usage"]["total_tokens"]   # in place
    again = llm.create_chat_completion(USER, tool_choice="required", **kw)   # regenerated: a branch
    assert again["choices"][0]["message"]["tool_calls"][0]["function"] == msg["tool_calls"][0]["function"]
    r3 = llm.create_chat_completion(follow, **kw)   # the longest match holds more: a branch after the reply
    assert r3["usage"]["prompt_tokens_details"]["cached_tokens"] == r3["usage"]["prompt_tokens"] - 1
    same = [(m["content"], [c["function"] for c in m.get("tool_calls") or ()])
            for m in (r2["choices"][0]["message"], r3["choices"][0]["message"])]
    assert same[0] == same[1]   # the same cache, the same greedy reply
