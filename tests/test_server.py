"""`loopserve-edge serve` with the real default model, talked to as clients do: the official
`openai` package and plain HTTP."""
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from conftest import THREADS  # noqa: E402

MODEL = "SmolLM2-135M-Instruct.Q4_1"
GREEDY = dict(temperature=0, max_tokens=12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, LOOPSERVE_EDGE_HOME=str(home))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loopserve_edge.cli", "serve", "--port", str(self.port),
             "--threads", str(THREADS), "--n-ctx", "2048", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        return out


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def server(home):
    s = Server(home)
    yield s
    s.stop()


def _chat(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, **dict(GREEDY, **kw))


def test_health_models_and_the_chat_page(server):
    assert httpx.get(server.url + "/health").json()["model"] == MODEL
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        server.client().models.retrieve("gpt-9")
    assert e.value.code == "model_not_found"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_a_reply_is_the_one_a_local_dialogue_gives(server, default_model):
    from loopserve_edge import Llama

    msgs = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}]
    r = _chat(server.client(), msgs)
    # the server's settings: its pool and flash attention (its default)
    with Llama(default_model, n_ctx=2048, n_threads=THREADS, flash_attn=True) as llm:
        want = llm.dialogue(system="You are brief.").send("Name a colour.", **GREEDY)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length") and r.model == MODEL
    u = r.usage
    assert u.completion_tokens >= 1 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens == 0


def test_tokenize_and_detokenize_as_llama_server_does(server, default_model):
    from loopserve_edge import Llama

    text = "Grüße, <|im_start|>world! 你好"
    with Llama(default_model, n_ctx=256, n_threads=THREADS) as llm:
        want = llm.tokenize(text)   # special tokens parsed, no BOS (SmolLM2 adds none)
    got = httpx.post(server.url + "/tokenize", json={"content": text}).json()["tokens"]
    assert got == want and len(got) > 5
    pieces = httpx.post(server.url + "/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == want
    # each piece its text, or its bytes where a character is split between tokens
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined.decode() == text
    assert httpx.post(server.url + "/detokenize", json={"tokens": got}).json() == {"content": text}
    assert any(isinstance(p["piece"], list) for p in pieces)   # 你好 is split here
    bad = [("/tokenize", {"content": 5}, "content"), ("/tokenize", {"content": "a", "with_pieces": 1}, "with_pieces"),
           ("/detokenize", {"tokens": [1, -1]}, "tokens"), ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
           ("/detokenize", {"tokens": "12"}, "tokens"), ("/tokenize", [1], None)]
    for path, body, param in bad:
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)


def test_streaming_gives_the_same_reply_in_pieces_with_usage(server):
    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    whole = _chat(server.client(), msgs).choices[0].message.content
    pieces, usage, finish = [], None, None
    for ch in _chat(server.client(), msgs, stream=True, stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    assert "".join(pieces) == whole and len(pieces) > 1
    assert finish in ("stop", "length") and usage.completion_tokens >= len(pieces) - 1
    # the same first message again: its dialogue is found, the prompt is all reused
    assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 1


def test_turns_of_a_stateless_client_reuse_the_history(server):
    client, msgs, last = server.client(), [], None
    for text in ("My name is Ada.", "What is my name?", "Say it once more."):
        msgs.append({"role": "user", "content": text})
        r = _chat(client, msgs)
        if last is not None:
            # everything the previous turn left in the cache: its prompt and its reply
            assert r.usage.prompt_tokens_details.cached_tokens == last.prompt_tokens + last.completion_tokens
        last = r.usage
        msgs.append({"role": "assistant", "content": r.choices[0].message.content})


def test_an_edited_history_branches_and_the_original_goes_on(server):
    client = server.client()
    m = [{"role": "user", "content": "Pick a fruit."}]
    a = _chat(client, m).choices[0].message.content
    edited = _chat(client, m + [{"role": "assistant", "content": "Zzz, qwerty."},
                                {"role": "user", "content": "Why?"}])
    # the first user message is shared; the edited reply is recomputed
    cached = edited.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < edited.usage.prompt_tokens
    orig = _chat(client, m + [{"role": "assistant", "content": a}, {"role": "user", "content": "Why?"}])
    u = orig.usage
    assert u.prompt_tokens_details.cached_tokens > cached


def test_request_settings_set_defer_scored_and_refuse_bad_values():
    from loopserve_edge import LoopServeConfig
    from loopserve_edge import openai_api as protocol

    base = LoopServeConfig(policy="loopserve", budget=256, defer_scored=8)
    parse = lambda ls: protocol._loopserve(ls)  # noqa: E731
    assert protocol.merged_config(base, parse({"defer_scored": 4})).defer_scored == 4
    assert protocol.merged_config(base, parse({"defer_scored": None})).defer_scored is None   # all
    assert protocol.merged_config(base, parse({"window": 8})).defer_scored == 8               # kept
    with pytest.raises(protocol.RequestError, match="defer_scored"):
        protocol.merged_config(base, parse({"defer_scored": -1}))
    with pytest.raises(protocol.RequestError, match="defer_scored"):
        parse({"defer_scored": "four"})


def test_a_request_budget_alone_asks_for_loopserve_and_full_drops_the_budget():
    from loopserve_edge import LoopServeConfig
    from loopserve_edge import openai_api as protocol

    parse = lambda ls: protocol._loopserve(ls)  # noqa: E731
    plain = LoopServeConfig()                                      # a server started without a budget
    got = protocol.merged_config(plain, parse({"budget": 300}))
    assert (got.policy, got.budget) == ("loopserve", 300)
    assert protocol.merged_config(plain, parse({"budget": 300, "policy": "h2o"})).policy == "h2o"
    budgeted = LoopServeConfig(policy="snapkv", budget=512)
    assert protocol.merged_config(budgeted, parse({"budget": 300})).policy == "snapkv"   # kept
    got = protocol.merged_config(budgeted, parse({"policy": "full"}))
    assert (got.policy, got.budget) == ("full", None)
    got = protocol.merged_config(budgeted, parse({"budget": None}))
    assert (got.policy, got.budget) == ("full", None)
    with pytest.raises(protocol.RequestError, match="takes no budget"):
        protocol.merged_config(plain, parse({"policy": "full", "budget": 300}))


def test_request_settings_choose_the_allocation_of_a_head_wise_server():
    from loopserve_edge import LoopServeConfig
    from loopserve_edge import openai_api as protocol

    parse = lambda ls: protocol._loopserve(ls)  # noqa: E731
    head = LoopServeConfig(policy="loopserve", budget=256, granularity="head")
    assert protocol.merged_config(head, parse({"allocation": "ada"})).allocation == "ada"
    with pytest.raises(protocol.RequestError, match="allocation must be"):
        protocol.merged_config(head, parse({"allocation": "even"}))
    # a cell-wise server has no heads to share among
    with pytest.raises(protocol.RequestError, match="granularity='head'"):
        protocol.merged_config(LoopServeConfig(policy="loopserve", budget=256), parse({"allocation": "pyramid"}))


def test_request_settings_choose_spans_and_refuse_bad_ones():
    from loopserve_edge import LoopServeConfig
    from loopserve_edge import openai_api as protocol

    parse = lambda ls: protocol._loopserve(ls)  # noqa: E731
    base = LoopServeConfig(policy="loopserve", budget=256, granularity="head")
    assert protocol.merged_config(base, parse({"span": 32})).span == 32
    assert protocol.merged_config(base, parse({"window": 8})).span == 1
    with pytest.raises(protocol.RequestError, match="span must be"):
        protocol.merged_config(base, parse({"span": 0}))
    with pytest.raises(protocol.RequestError, match="loopserve.span must be of type int"):
        parse({"span": 2.5})


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    post = lambda body: httpx.post(server.url + "/v1/chat/completions", content=body,  # noqa: E731
                                   headers={"Content-Type": "application/json"}, timeout=60)
    r = post(b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = post(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = post(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                         "loopserve": {"policy": "loopserve"}}))   # a policy without a budget
    assert r.status_code == 400 and "budget" in r.json()["error"]["message"]
    r = post(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                         "loopserve": {"budget": 4096}}))   # no room beside it in n_ctx 2048
    assert r.status_code == 400 and r.json()["error"]["param"] == "loopserve"
    assert "n_ctx=2048 leaves no cells for new input beside the KV budget of 4096" in r.json()["error"]["message"]
    # strings that are not Unicode text (a lone surrogate, escaped or as bytes; 500s before) and
    # nesting past Python's recursion limit: 400s
    for body in (b'{"messages": [{"role": "user", "content": "a\\ud800"}]}',
                 '{"messages": [{"role": "user", "content": "\ud800"}]}'.encode("utf-8", "surrogatepass")):
        r = post(body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert "lone UTF-16 surrogate (\\ud800)" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/tokenize", content=b'{"content": "\\udc00"}', timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "content"
    r = post(b"[" * 100000 + b"]" * 100000)
    assert r.status_code == 400
    # seed -1: llama.cpp's "random", as llama-server takes it (a 500 before)
    for path, extra in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                        ("/v1/completions", {"prompt": "Once"})):
        r = httpx.post(server.url + path, json={"max_tokens": 2, "seed": -1, "n": 2, **extra}, timeout=60)
        assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    # no model named: the loaded one serves it (as llama-server); a wrong type is still refused
    for path, extra in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                        ("/v1/completions", {"prompt": "Once"}), ("/v1/responses", {"input": "hi"})):
        r = httpx.post(server.url + path, json={"max_tokens" if path != "/v1/responses" else "max_output_tokens": 2,
                                                **extra}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == MODEL, (path, r.text)
    r = post(json.dumps({"model": 5, "messages": [{"role": "user", "content": "hi"}]}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    # llama-server's repeat penalty: taken, and checked
    hi = {"messages": [{"role": "user", "content": "hi hi hi"}], "max_tokens": 6, "temperature": 0}
    r = post(json.dumps({**hi, "repeat_penalty": 100, "repeat_last_n": -1}))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"] != post(json.dumps(hi)).json()["choices"][0]["message"]
    for bad, param in (({"repeat_penalty": 0}, "repeat_penalty"), ({"repeat_last_n": -2}, "repeat_last_n")):
        r = post(json.dumps({**hi, **bad}))
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        _chat(server.client(), [{"role": "user", "content": "word " * 3000}])
    assert e.value.code == "context_length_exceeded" and "n_ctx=2048" in e.value.message
    with pytest.raises(openai.BadRequestError, match="must have a user message"):
        _chat(server.client(), [{"role": "system", "content": "You are brief."}])
    with pytest.raises(openai.BadRequestError, match="system messages must come before"):
        _chat(server.client(), [{"role": "assistant", "content": "hello"}, {"role": "system", "content": "hi"}])
    r = httpx.post(server.url + "/v1/chat/completions", headers={"X-Dialogue-Id": "../../escape"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "dialogue id" in r.json()["error"]["message"]
    assert _chat(server.client(), [{"role": "user", "content": "still there?"}]).choices[0].message.content


def test_null_for_an_optional_field_is_its_default(server):
    """OpenAI's optional fields are nullable, and clients other than its SDK send null for what
    they leave unset: the same answer as without the field."""
    chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4, "temperature": 0}
    text = {"prompt": "Colours: red,", "max_tokens": 4, "temperature": 0}
    for path, body, nulls in (("/v1/chat/completions", chat, {"stream": None, "n": None, "stop": None,
                                                              "stream_options": {"include_usage": None}}),
                              ("/v1/completions", text, {"stream": None, "echo": None, "best_of": None,
                                                         "logprobs": None, "suffix": None}),
                              ("/tokenize", {"content": "red"}, {"add_special": None, "with_pieces": None})):
        want = httpx.post(server.url + path, json=body)
        got = httpx.post(server.url + path, json=dict(body, **nulls))
        assert got.status_code == want.status_code == 200, got.text
        key = "tokens" if path == "/tokenize" else "choices"
        assert got.json()[key] == want.json()[key]


def test_a_conversation_may_open_with_the_assistants_greeting(server, default_model, tmp_path):
    from loopserve_edge import Llama
    from loopserve_edge.chat_template import CHATML
    from loopserve_edge.random_gguf import write_random_llama

    hello = {"role": "assistant", "content": "Hello! I can answer questions about geography."}
    msgs = [hello, {"role": "user", "content": "What is the capital of France?"}]
    r = _chat(server.client(), msgs)
    with Llama(default_model, n_ctx=2048, n_threads=THREADS, flash_attn=True) as llm:
        d = llm.dialogue()
        d.messages = [hello]   # the history the server's dialogue store gives it
        want = d.send(msgs[1]["content"], **GREEDY)
    assert r.choices[0].message.content == want
    msgs += [{"role": "assistant", "content": want}, {"role": "user", "content": "And of Italy?"}]
    r2 = _chat(server.client(), msgs)
    assert r2.loopserve["dialogue_id"] == r.loopserve["dialogue_id"]
    assert r2.usage.prompt_tokens_details.cached_tokens == r.usage.total_tokens
    # a model whose chat template refuses it (as Gemma's and Mistral's do): a 400 naming the
    # messages, and the server goes on
    strict = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation roles must "
              "alternate user/assistant/user/assistant/...') }}{% endif %}" + CHATML)
    s = Server(tmp_path, str(write_random_llama(tmp_path / "strict.gguf", chat_template=strict)))
    try:
        body = {"messages": msgs[:2], "max_tokens": 4}
        bad = httpx.post(s.url + "/v1/chat/completions", json=body).json()["error"]
        assert bad["param"] == "messages" and "Conversation roles must alternate" in bad["message"]
        ok = httpx.post(s.url + "/v1/chat/completions", json=dict(body, messages=msgs[1:2]))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    finally:
        s.stop()


def test_a_last_assistant_message_is_the_start_of_the_reply(server, default_model):
    from loopserve_edge import Llama

    q, start = "What is the capital of France?", "The capital of France is"
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": start}]
    r = _chat(server.client(), msgs)
    with Llama(default_model, n_ctx=2048, n_threads=THREADS, flash_attn=True) as llm:
        want = llm.dialogue().send(q, reply_prefix=start, **GREEDY)
    assert r.choices[0].message.content == want   # the continuation
    # the client keeps the whole reply: the next turn finds all of it in the cache
    msgs[-1]["content"] = start + want
    r2 = _chat(server.client(), msgs + [{"role": "user", "content": "And of Spain?"}])
    assert r2.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_logprobs_come_with_the_reply_and_its_stream_pieces(server):
    client, msgs = server.client(), [{"role": "user", "content": "Count from 1 to 9."}]
    r = _chat(client, msgs, logprobs=True, top_logprobs=3, max_tokens=16)
    c = r.choices[0]
    lp = c.logprobs.content
    assert len(lp) == r.usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in lp).decode() == c.message.content
    for e in lp:   # greedy: each token is the most likely, the others below it
        assert len(e.top_logprobs) == 3 and (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)
        assert e.logprob <= 0 and e.top_logprobs[1].logprob <= e.logprob
    text, streamed = "", []
    for ch in _chat(client, msgs, logprobs=True, top_logprobs=3, max_tokens=16, stream=True):
        for cc in ch.choices:
            text += cc.delta.content or ""
            streamed += cc.logprobs.content if cc.logprobs else []
    assert text == c.message.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in lp]
    # a stop string: the reply and its tokens end before it
    cut = _chat(client, msgs, logprobs=True, max_tokens=16, stop=["3"])
    assert "3" not in cut.choices[0].message.content
    assert b"".join(bytes(e.bytes) for e in cut.choices[0].logprobs.content).decode() == cut.choices[0].message.content
    assert _chat(client, msgs).choices[0].logprobs is None


def test_penalties_and_logit_bias_shape_the_choice(server):
    client, pen = server.client(), 2.0
    r = _chat(client, [{"role": "user", "content": "Repeat: the cat, the cat, the cat."}], max_tokens=32,
              logprobs=True, top_logprobs=20, frequency_penalty=pen)
    seen, moved = collections.Counter(), 0
    for e in r.choices[0].logprobs.content:
        # the logprobs are the model's own: the chosen token is the best once the penalty of
        # each of the 20 most likely is taken off (as many times as the reply has it)
        mine = e.logprob - pen * seen[bytes(e.bytes)]
        assert all(t.logprob - pen * seen[bytes(t.bytes)] <= mine + 1e-9 for t in e.top_logprobs)
        moved += e.top_logprobs[0].token != e.token
        seen[bytes(e.bytes)] += 1
    assert moved > 0   # some choices were not the model's most likely token
    r = _chat(client, [{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True, logit_bias={"1000": 100})
    toks = [e.token for e in r.choices[0].logprobs.content]
    assert len(toks) == 4 and len(set(toks)) == 1 and r.choices[0].message.content == toks[0] * 4
    tools = [{"type": "function", "function": {"name": "f"}}]
    for param, kw in [("logit_bias", dict(logit_bias={"99999999": 1})), ("presence_penalty", dict(presence_penalty=3)),
                      ("response_format", dict(response_format={"type": "xml"})),
                      ("tool_choice", dict(tools=tools, tool_choice={"type": "function", "function": {"name": "g"}})),
                      ("top_logprobs", dict(top_logprobs=2))]:
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, [{"role": "user", "content": "hi"}], **kw)
        assert e.value.body["param"] == param
    # tools the reply may not use: a text reply
    r = _chat(client, [{"role": "user", "content": "hi"}], tools=tools, tool_choice="none")
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_tool_calls_come_back_as_openai_shapes_and_their_results_go_on_in_the_dialogue(server):
    client = server.client()
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": False}}}]
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = _chat(client, msgs, tools=tools, tool_choice="required", max_tokens=64)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(json.loads(call.function.arguments)) == {"city"}
    # the client sends the call back with its result: the dialogue goes on, nothing prefilled again
    msgs += [c.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
    deltas, finish, usage = [], None, None
    for ch in _chat(client, msgs, tools=tools, max_tokens=64, stream=True, stream_options={"include_usage": True}):
        usage = ch.usage or usage
        for x in ch.choices:
            deltas.append(x.delta)
            finish = x.finish_reason or finish
    assert usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    streamed = [t for d in deltas for t in (d.tool_calls or [])]
    text = "".join(d.content or "" for d in deltas)
    # "auto": a call (its name, then its arguments as they come) or a text reply (its content as it comes)
    if finish == "tool_calls":
        assert not text and streamed[0].id and streamed[0].function.name == "get_weather"
        assert set(json.loads("".join(t.function.arguments or "" for t in streamed))) == {"city"}
    else:
        assert finish == "stop" and text and not streamed
    # the openai SDK's strict tools from pydantic models, parsed by the SDK
    import pydantic

    class Weather(pydantic.BaseModel):
        city: str
        celsius: bool

    p = client.chat.completions.parse(model=MODEL, messages=msgs[:1], tools=[openai.pydantic_function_tool(Weather)],
                                      tool_choice="required", temperature=0, max_tokens=64)
    assert isinstance(p.choices[0].message.tool_calls[0].function.parsed_arguments, Weather)
    bad = msgs[:1] + [{"role": "assistant", "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": "call_unknown", "content": "18 C"}]
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, bad, tools=tools)
    assert e.value.body["param"] == "messages[2].tool_call_id"


def test_response_formats_and_grammars_hold_the_reply_to_their_form(server):
    client = server.client()
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    r = _chat(client, [{"role": "user", "content": "What is 2+2? Answer in JSON."}], max_tokens=64, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert r.choices[0].finish_reason == "stop" and set(json.loads(r.choices[0].message.content)) == {"answer"}
    cat = "Give me a JSON object describing a cat with its name and age."
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": cat}], max_tokens=96,
                                            temperature=0, response_format={"type": "json_object"}, stream=True)
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), dict)
    # llama-server's and llama-cpp-python's "grammar" field, on text completions too
    r = client.completions.create(model=MODEL, prompt="Is it raining?", max_tokens=8, extra_body={
        "grammar": 'root ::= "yes" | "no"'})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    for body, param in [(dict(response_format={"type": "json_schema"}), "response_format"),
                        (dict(extra_body={"grammar": "root ::= nothing-defined"}), None)]:
        with pytest.raises(openai.BadRequestError, match="grammar|json_schema") as e:
            _chat(client, [{"role": "user", "content": "hi"}], **body)
        assert e.value.body["param"] == param
    assert _chat(client, [{"role": "user", "content": "hi"}], max_tokens=4).choices[0].message.content


def test_responses_go_on_from_the_previous_response_as_chat_would(server):
    client = server.client()
    first = client.responses.create(model=MODEL, input="My name is Ada.", instructions="You are brief.",
                                    temperature=0, max_output_tokens=12)
    assert first.id.startswith("resp_") and first.output[0].type == "message" and first.output_text
    assert first.status in ("completed", "incomplete") and first.usage.input_tokens_details.cached_tokens == 0
    nxt = client.responses.create(model=MODEL, input=[{"role": "user", "content": "What is my name?"}],
                                  previous_response_id=first.id, instructions="You are brief.", temperature=0,
                                  max_output_tokens=12)
    # only the new input is prefilled: the first response's input and output are in the cache
    assert nxt.usage.input_tokens_details.cached_tokens == first.usage.input_tokens + first.usage.output_tokens
    assert nxt.previous_response_id == first.id
    # the same conversation through chat gives the same reply
    chat = _chat(client, [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "My name is Ada."},
                          {"role": "assistant", "content": first.output_text},
                          {"role": "user", "content": "What is my name?"}])
    assert chat.choices[0].message.content == nxt.output_text
    third = client.responses.create(model=MODEL, input="Again?", previous_response_id=nxt.id,
                                    instructions="You are brief.", temperature=0, max_output_tokens=4)
    assert third.usage.input_tokens_details.cached_tokens == nxt.usage.input_tokens + nxt.usage.output_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as e:   # the conversation it started is gone with it
        client.responses.create(model=MODEL, input="and?", previous_response_id=third.id)
    assert e.value.body["param"] == "previous_response_id"
    gone = client.responses.create(model=MODEL, input="hi", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(gone.id)
    for bad, param in [(dict(input=[{"type": "web_search_call"}]), "input[0].type"),
                       (dict(input="x", tools=[{"type": "web_search"}]), "tools[0].type"),
                       (dict(input="x", background=True), "background"), (dict(input="x", truncation="auto"), "truncation"),
                       (dict(input="x", reasoning={"effort": "high"}), "reasoning"),
                       (dict(input="x", text={"format": {"type": "xml"}}), "text.format"), (dict(input="x", text="json"), "text"),
                       (dict(input="x", previous_response_id="../../etc"), "previous_response_id"),
                       (dict(input=[{"role": "tool", "content": "x"}]), "input[0].role"),
                       (dict(input=[{"type": "function_call_output", "call_id": "c", "output": "1"}]), "input"),
                       (dict(input="x", max_output_tokens=0), "max_output_tokens")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, **bad)
        assert e.value.body["param"] == param, bad
        if param == "max_output_tokens":   # the message names it as this API does ('max_tokens' before)
            assert e.value.body["message"].startswith("'max_output_tokens' must be")


def test_responses_stream_tool_calls_as_events_and_take_their_outputs(server):
    client = server.client()
    tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city now",
              "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                             "required": ["city"], "additionalProperties": False}}]
    r = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=tools, tool_choice="required",
                                temperature=0, max_output_tokens=64)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}
    events = list(client.responses.create(model=MODEL, previous_response_id=r.id, tools=tools, temperature=0,
                                          max_output_tokens=64, stream=True, input=[
                                              {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}]))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    final = events[-1].response
    # all of r is reused (more where an earlier dialogue already holds the output sent)
    assert final.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens + r.usage.output_tokens
    added = [e.item.id for e in events if e.type == "response.output_item.added"]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert added == [i.id for i in done] == [o.id for o in final.output] and added
    for item in done:   # what the deltas put together is what each item holds
        if item.type == "function_call":
            assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta"
                           and e.item_id == item.id) == item.arguments
        else:
            assert "".join(e.delta for e in events if e.type == "response.output_text.delta"
                           and e.item_id == item.id) == item.content[0].text


def _anthropic(server, **kw):
    anthropic = pytest.importorskip("anthropic")
    return anthropic, anthropic.Anthropic(base_url=server.url, max_retries=0, **dict({"api_key": "none"}, **kw))


# the Anthropic SDK takes no sampling settings; the server still reads them from the body
ANTHROPIC_GREEDY = {"extra_body": {"temperature": 0}}


def test_anthropic_messages_go_on_as_chat_would(server):
    anthropic, client = _anthropic(server)
    system, question = "You are brief.", "Name a colour."
    first = client.messages.create(model=MODEL, max_tokens=12, system=system,
                                   messages=[{"role": "user", "content": question}], **ANTHROPIC_GREEDY)
    assert first.id.startswith("msg_") and first.type == "message" and first.role == "assistant"
    (block,) = first.content
    chat = _chat(server.client(), [{"role": "system", "content": system}, {"role": "user", "content": question}])
    assert block.type == "text" and block.text == chat.choices[0].message.content
    assert first.stop_reason == ("max_tokens" if chat.choices[0].finish_reason == "length" else "end_turn")
    # Anthropic's input_tokens leave out the cache's: the two together are chat's prompt tokens
    u = first.usage
    assert u.input_tokens + u.cache_read_input_tokens == chat.usage.prompt_tokens and u.output_tokens >= 1
    counted = client.messages.count_tokens(model=MODEL, system=system, messages=[{"role": "user", "content": question}])
    assert counted.input_tokens == chat.usage.prompt_tokens
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": first.content},
            {"role": "user", "content": [{"type": "text", "text": "And another?"}]}]
    nxt = client.messages.create(model=MODEL, max_tokens=12, system=system, messages=msgs, **ANTHROPIC_GREEDY)
    # the first turn's prompt and reply are in the dialogue's cache: only the new message is prefilled
    assert nxt.usage.cache_read_input_tokens >= u.input_tokens + u.cache_read_input_tokens + u.output_tokens
    again = _chat(server.client(), [{"role": "system", "content": system}, {"role": "user", "content": question},
                                    {"role": "assistant", "content": block.text},
                                    {"role": "user", "content": "And another?"}])
    assert nxt.content[0].text == again.choices[0].message.content
    # a stop sequence ends the reply before it and is named; a last assistant message is continued
    words = block.text.split()
    assert len(words) >= 3, block.text
    stopped = client.messages.create(model=MODEL, max_tokens=12, system=system, stop_sequences=["#", words[2]],
                                     messages=[{"role": "user", "content": question}], **ANTHROPIC_GREEDY)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == words[2]
    assert words[2] not in stopped.content[0].text and block.text.startswith(stopped.content[0].text)
    cont = client.messages.create(model=MODEL, max_tokens=4, system=system, **ANTHROPIC_GREEDY, messages=[
        {"role": "user", "content": question}, {"role": "assistant", "content": " ".join(words[:2])}])
    assert cont.content[0].text and not cont.content[0].text.startswith(words[0])
    hi = [{"role": "user", "content": "x"}]
    for bad, text in [(dict(messages=[{"role": "system", "content": "x"}]), "messages[0].role"),
                      (dict(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
                       "messages[0].content[0]"),
                      (dict(messages=hi, tools=[{"type": "bash_20250124", "name": "bash"}]), "tools[0]"),
                      (dict(messages=hi, stop_sequences=[""]), "'stop_sequences'"),
                      (dict(messages=[{"role": "user", "content": [
                          {"type": "tool_result", "tool_use_id": "t", "content": "1"}]}]), "messages[0]"),
                      (dict(system="s", messages=[{"role": "assistant", "content": [
                          {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]), "messages[0]")]:
        with pytest.raises(anthropic.BadRequestError) as e:
            client.messages.create(model=MODEL, max_tokens=4, **bad)
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
        assert e.value.body["error"]["message"].startswith(text), (bad, e.value.body)
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-x", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "not_found_error" and MODEL in e.value.body["error"]["message"]
    # the model list in Anthropic's shape as well (the same card carries both APIs' fields)
    (card,) = client.models.list().data
    assert card.id == client.models.retrieve(MODEL).id == MODEL and card.type == "model"
    assert card.created_at.year >= 2024 and card.display_name == MODEL


def test_anthropic_messages_stream_tool_use_and_take_its_results(server):
    anthropic, client = _anthropic(server)
    tools = [{"name": "get_weather", "description": "The weather in a city now",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                               "required": ["city"], "additionalProperties": False}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    whole = client.messages.create(model=MODEL, max_tokens=64, tools=tools, tool_choice={"type": "any"}, messages=ask,
                                   **ANTHROPIC_GREEDY)
    with client.messages.stream(model=MODEL, max_tokens=64, tools=tools, tool_choice={"type": "any"}, messages=ask,
                                **ANTHROPIC_GREEDY) as stream:
        events = list(stream)
        streamed = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert events[0].message.usage.input_tokens + events[0].message.usage.cache_read_input_tokens == \
        streamed.usage.input_tokens + streamed.usage.cache_read_input_tokens
    starts = [e.index for e in events if e.type == "content_block_start"]
    assert starts == [e.index for e in events if e.type == "content_block_stop"] == list(range(len(streamed.content)))
    # the stream puts together what the whole reply holds
    assert whole.stop_reason == streamed.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in whole.content] == [(b.type, b.name, b.input) for b in streamed.content]
    call = whole.content[0]
    assert call.type == "tool_use" and call.name == "get_weather" and set(call.input) == {"city"}
    # the client sends the call back (its input parsed) with its result: the dialogue goes on from
    # the call as the model wrote it, nothing prefilled again
    msgs = ask + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in whole.content]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C"}]}]
    after = client.messages.create(model=MODEL, max_tokens=32, tools=tools, messages=msgs, **ANTHROPIC_GREEDY)
    u = whole.usage
    assert after.usage.cache_read_input_tokens >= u.input_tokens + u.cache_read_input_tokens + u.output_tokens
    assert after.stop_reason in ("end_turn", "tool_use", "max_tokens") and after.content
    # a call this server did not write goes in as its input says (written without spaces)
    other = ask + [{"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                       "input": {"city": "Oslo"}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                                 "content": [{"type": "text", "text": "no such city"}]}]}]
    once = client.messages.create(model=MODEL, max_tokens=64, tools=tools, messages=other, **ANTHROPIC_GREEDY)
    assert once.content and once.stop_reason in ("end_turn", "tool_use")
    again = client.messages.create(model=MODEL, max_tokens=4, tools=tools, messages=other, **ANTHROPIC_GREEDY)
    assert again.usage.cache_read_input_tokens >= once.usage.input_tokens + once.usage.cache_read_input_tokens - 1


def test_text_completions_continue_the_prompt_and_reuse_it(server, default_model):
    from loopserve_edge import Llama

    client, prompt = server.client(), "The three primary colours are"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    with Llama(default_model, n_ctx=2048, n_threads=THREADS, flash_attn=True) as llm:
        want = llm.create_completion(prompt, max_tokens=12, temperature=0)
    c = r.choices[0]
    assert c.text == want["choices"][0]["text"] and r.object == "text_completion"
    assert r.usage.prompt_tokens == want["usage"]["prompt_tokens"] and c.finish_reason in ("stop", "length")
    # a prompt that goes on from the last text: all of it reused, whole or streamed alike
    body = {"model": MODEL, "prompt": prompt + c.text + " Mixing them", "max_tokens": 8, "temperature": 0,
            "logprobs": 2}
    r2 = httpx.post(server.url + "/v1/completions", json=body).json()
    first = r.usage.prompt_tokens + r.usage.completion_tokens
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] >= first - 1
    lp = r2["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == r2["choices"][0]["text"] and len(lp["tokens"]) == r2["usage"]["completion_tokens"]
    assert lp["text_offset"][0] == 0 and all(len(t) <= 2 for t in lp["top_logprobs"])
    text, streamed = "", []
    for ch in client.completions.create(model=MODEL, prompt=body["prompt"], max_tokens=8, temperature=0,
                                        logprobs=2, echo=False, stream=True):
        text += ch.choices[0].text
        streamed += ch.choices[0].logprobs.tokens if ch.choices[0].logprobs else []
    assert text == r2["choices"][0]["text"] and streamed == lp["tokens"]
    echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert echo.choices[0].text.startswith(prompt)
    for param, kw in [("prompt", dict(prompt=[[1], 2])), ("stream", dict(echo=True, logprobs=1, stream=True)),
                      ("max_tokens", dict(max_tokens=0)),
                      ("suffix", dict(suffix="}"))]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, **{"prompt": prompt, **kw})
        assert e.value.body["param"] == param
    r = httpx.post(server.url + "/v1/completions", headers={"X-Dialogue-Id": "x"}, json={"model": MODEL, "prompt": "a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Dialogue-Id"
    # nor is a text dialogue's id a chat's
    r = httpx.post(server.url + "/v1/chat/completions", headers={"X-Dialogue-Id": r2["loopserve"]["dialogue_id"]},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "text completions" in r.json()["error"]["message"]


def test_text_completions_score_prompts_of_token_ids_as_scoring_tools_send_them(server, default_model):
    """lm-eval's completion models: several prompts of token ids in one call, each echoed with
    its tokens' log-probabilities and one generated token, greedy."""
    from loopserve_edge import Llama

    texts = ["The capital of France is Paris", "Two plus two is four"]
    with Llama(default_model, n_ctx=2048, n_threads=THREADS, flash_attn=True) as llm:
        ids = [llm.tokenize(t, add_bos=llm.add_bos) for t in texts]
        sizes = [len(llm.tokenize(t, add_bos=False)) for t in texts]
        want = [llm.create_completion(t, max_tokens=1, temperature=0, echo=True, logprobs=1) for t in texts]
    r = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1, "seed": 1234})
    assert r.status_code == 200
    got = r.json()
    assert [c["index"] for c in got["choices"]] == [0, 1]
    for c, w, t, n in zip(got["choices"], want, texts, sizes):
        lp, wl = c["logprobs"], w["choices"][0]["logprobs"]
        assert c["text"] == w["choices"][0]["text"] and c["text"].startswith(t)
        assert lp["tokens"] == wl["tokens"] and lp["text_offset"] == wl["text_offset"]
        assert lp["token_logprobs"][1:] == pytest.approx(wl["token_logprobs"][1:], abs=1e-3)
        # where the context ends and how likely its continuation is, as lm-eval reads them
        cut = next(i for i, o in enumerate(lp["text_offset"]) if o >= len(t.rsplit(" ", 1)[0]))
        assert sum(lp["token_logprobs"][cut:-1]) < 0 and len(lp["tokens"]) == n + 1
    assert got["usage"]["prompt_tokens"] == sum(w["usage"]["prompt_tokens"] for w in want)
    # the prompt alone: max_tokens 0
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": texts[0], "max_tokens": 0,
                                                        "echo": True, "logprobs": 0}).json()
    assert r["choices"][0]["text"] == texts[0] and r["usage"]["completion_tokens"] == 0
    assert r["choices"][0]["logprobs"]["tokens"] == want[0]["choices"][0]["logprobs"]["tokens"][:-1]


def test_a_questions_answers_are_scored_from_where_they_part(server, default_model):
    """A multiple-choice question as lm-eval sends it (the question once per answer, each
    scored): the second answer is decoded from where it leaves the first, the question's cells
    kept between the calls, its log-probabilities as scored alone."""
    from loopserve_edge import Llama

    question = "Question: Which city is the capital of France?\nAnswer:"
    with Llama(default_model, n_ctx=2048, n_threads=THREADS, flash_attn=True) as llm:
        ids = [llm.tokenize(question + a, add_bos=llm.add_bos) for a in (" Paris", " London")]
        n_q = len(llm.tokenize(question, add_bos=llm.add_bos))
        want = []
        for i in ids:
            want.append(llm.create_completion(i, max_tokens=1, temperature=0, echo=True, logprobs=1))
            llm.drop_score_cache()
    got = [httpx.post(server.url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": i, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}).json()
        for i in ids]
    assert got[1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= n_q - 1
    for g, w in zip(got, want):
        assert g["choices"][0]["logprobs"]["tokens"] == w["choices"][0]["logprobs"]["tokens"]
        assert g["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
            w["choices"][0]["logprobs"]["token_logprobs"][1:], abs=1e-3)
    metrics = httpx.get(server.url + "/metrics").text
    assert f"loopserve_kv_cells_scored_text {len(ids[1])}" in metrics
    # in one call (lm-eval's batches: a question's answers among others' of the same length),
    # scored in the order of their prompts, answered in the order asked
    other = ids[0][:2] + [t + 1 for t in ids[0][2:]]
    r = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": [ids[1], other, ids[0]], "max_tokens": 1, "temperature": 0, "echo": True,
        "logprobs": 1}).json()
    assert [c["logprobs"]["tokens"] for c in r["choices"][::2]] == [g["choices"][0]["logprobs"]["tokens"]
                                                                   for g in got[::-1]]
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= 2 * (n_q - 1)   # other's share: 1


def test_several_choices_are_replies_of_their_own_branching_from_the_conversation(server):
    client = server.client()
    msgs = [{"role": "user", "content": "Name a fruit and say why you like it."}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=12, temperature=1.0, seed=7)
    r = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.message.content for c in r.choices}) > 1
    # choice i is the reply that seed 7 + i gives alone
    done = 0
    for i, c in enumerate(r.choices):
        alone = client.chat.completions.create(**dict(kw, seed=7 + i))
        assert alone.choices[0].message.content == c.message.content
        assert alone.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 1   # a branch: no prefill
        done += alone.usage.completion_tokens
    assert r.usage.prompt_tokens == alone.usage.prompt_tokens and r.usage.completion_tokens == done   # prompt once
    # each choice goes on as its own conversation
    nxt = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=msgs + [
        {"role": "assistant", "content": r.choices[1].message.content}, {"role": "user", "content": "Why?"}])
    assert nxt.usage.prompt_tokens_details.cached_tokens > r.usage.prompt_tokens
    t = client.completions.create(model=MODEL, prompt="My favourite fruit is", n=2, max_tokens=6, temperature=1.0,
                                  seed=3)
    assert [c.index for c in t.choices] == [0, 1]
    for bad in (dict(n=17), dict(n=0)):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**dict(kw, **bad))
        assert e.value.body["param"] == "n"
    r = httpx.post(server.url + "/v1/chat/completions", headers={"X-Dialogue-Id": "n-two"}, json=dict(kw, n=2))
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_several_choices_stream_each_with_its_index(server):
    """n > 1 and several prompts streamed, as OpenAI's streams give them: every chunk names its
    choice, each choice's text as it comes without a stream, one usage chunk for all, one id."""
    client = server.client()
    msgs = [{"role": "user", "content": "Name a colour and say why you like it."}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=10, temperature=1.0, seed=11)
    whole = client.chat.completions.create(n=3, **kw)
    texts, roles, ids, usage, finishes = {}, {}, set(), [], {}
    for ch in client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw):
        ids.add(ch.id)
        if ch.usage is not None:
            usage.append(ch.usage)
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            roles[c.index] = roles.get(c.index) or c.delta.role
            finishes[c.index] = c.finish_reason or finishes.get(c.index)
    assert texts == {c.index: c.message.content for c in whole.choices} and len(set(texts.values())) > 1
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"} and len(ids) == 1
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert len(usage) == 1 and usage[0].completion_tokens == whole.usage.completion_tokens
    assert usage[0].prompt_tokens == whole.usage.prompt_tokens
    prompts = ["My favourite fruit is", "The sky at night is"]
    whole = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    texts = {}
    for ch in client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                        echo=True):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: p + c.text for c, p in zip(whole.choices, prompts)}


def test_a_dialogue_named_by_header_goes_on_whatever_the_history(server):
    url, h = server.url + "/v1/chat/completions", {"X-Dialogue-Id": "my-chat_1"}
    body = {"model": MODEL, "temperature": 0, "max_tokens": 6, "messages": [{"role": "user", "content": "Hello."}]}
    r1 = httpx.post(url, headers=h, json=body)
    assert r1.headers["X-Dialogue-Id"] == "my-chat_1"
    body["messages"] += [{"role": "assistant", "content": r1.json()["choices"][0]["message"]["content"]},
                         {"role": "user", "content": "Again."}]
    r2 = httpx.post(url, headers=h, json=body).json()
    assert r2["loopserve"]["dialogue_id"] == "my-chat_1"
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == (r1.json()["usage"]["prompt_tokens"] +
                                                                     r1.json()["usage"]["completion_tokens"])


def test_a_budget_per_request_keeps_the_dialogue_within_it(server):
    r = _chat(server.client(), [{"role": "user", "content": "Describe a harbour. " * 40}], max_tokens=40,
              extra_body={"loopserve": {"policy": "loopserve", "budget": 128}})
    extra = r.model_extra["loopserve"]
    assert extra["kv_evicted"] > 0 and extra["kv_cells"] <= 128 + 16


def test_clients_at_once_all_get_their_turns_each_as_it_would_alone(server):
    results, replies, errors = {}, {}, []

    def one(i, alone=False):
        try:
            # alone: a dialogue id of its own, so that nothing of the first run is reused
            c, kw = server.client(), {"extra_headers": {"X-Dialogue-Id": f"alone-{i}"}} if alone else {}
            msgs = [{"role": "user", "content": f"Client {i}: count to {i + 2}."}]
            r1 = _chat(c, msgs, max_tokens=8, **kw)
            msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "Thanks."}]
            r2 = _chat(c, msgs, max_tokens=8, **kw)
            if not alone:
                results[i] = r2.usage.prompt_tokens_details.cached_tokens
            replies[i, alone] = [r1.choices[0].message.content, r2.choices[0].message.content]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def decoded():   # (steps, reply tokens in them) so far
        m = dict(ln.split() for ln in httpx.get(server.url + "/metrics").text.splitlines()
                 if ln.startswith(("loopserve_decode_steps_total ", "loopserve_decode_step_replies_total ")))
        return float(m["loopserve_decode_steps_total"]), float(m["loopserve_decode_step_replies_total"])

    before = decoded()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = decoded()
    assert not errors and sorted(results) == list(range(8))
    assert all(n > 0 for n in results.values())   # each found its own dialogue again
    # decoded together with the others (batch-invariant attention, the server's default), each reply
    # is token for token the one the same conversation gets alone
    for i in range(8):
        one(i, alone=True)
    differ = {i: (replies[i, False], replies[i, True]) for i in range(8) if replies[i, True] != replies[i, False]}
    assert not errors and not differ, differ
    # their tokens were decoded together, several replies per llama_decode
    assert (after[1] - before[1]) / (after[0] - before[0]) > 1.2


def test_clients_whose_dialogues_overflow_the_pool_take_turns_and_each_gets_its_whole_reply(tmp_path):
    """Six conversations of ~250 tokens each on a pool of 768 cells: they cannot all be decoded
    at once. The replies in progress that do not fit wait a step (the oldest go first) and no
    new prompt is prefilled meanwhile, so every reply is the one its conversation gets alone
    (not cut short by a full pool)."""
    s = Server(tmp_path, "--n-ctx", "768", "--max-resident", "8")
    try:
        texts = [f"Client {i}: here is a list of fruits: " + ", ".join(["apple", "pear", "plum", "fig"] * 12)
                 + f". Now count from {i} to 100, one number per line." for i in range(6)]
        got, errors = {}, []

        def one(i, tag):
            try:
                c = s.client()
                msgs = [{"role": "user", "content": texts[i]}]
                r = _chat(c, msgs, max_tokens=40, extra_headers={"X-Dialogue-Id": f"{tag}-{i}"})
                got[tag, i] = (r.choices[0].message.content, r.usage.completion_tokens)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i, "together")) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(s.url + "/metrics").text
        for i in range(6):
            one(i, "alone")
        assert not errors, errors
        differ = {i: (got["together", i], got["alone", i]) for i in range(6) if got["together", i] != got["alone", i]}
        assert not differ, differ
        assert all(n == 40 for _, n in got.values())   # nobody was cut short
        waits = [ln for ln in metrics.splitlines() if ln.startswith("loopserve_decode_waits_total ")]
        assert float(waits[0].split()[1]) > 0           # the pool did run short
    finally:
        s.stop()


def _generated(server) -> int:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith('loopserve_tokens_total{kind="generated"}'):
            return int(line.split()[-1])
    raise AssertionError("no generated-token counter")


def test_a_client_gone_mid_stream_leaves_a_consistent_dialogue(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about ships."}],
            "stream": True, "temperature": 0, "max_tokens": 400, "stop": ["zzzz"]}
    before = _generated(server)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data: ")
            if n >= 3:
                break
    # the server stopped that reply early and serves the next request from a consistent state
    again = _chat(server.client(), body["messages"], max_tokens=4)
    assert again.choices[0].message.content
    assert _generated(server) - before < 100
    # (uninterrupted, the same reply runs much longer)
    assert _chat(server.client(), body["messages"], max_tokens=400).usage.completion_tokens > 150
    metrics = httpx.get(server.url + "/metrics").text
    assert 'loopserve_tokens_total{kind="reused"}' in metrics and "loopserve_ttft_seconds_bucket" in metrics
    assert "loopserve_kv_cells_used" in metrics and "loopserve_dialogues_resident" in metrics


def test_a_server_given_only_a_budget_compresses_and_says_so(tmp_path):
    # before, --kv-budget without --policy started a server of policy full: the budget did nothing
    s = Server(tmp_path, "--kv-budget", "256")
    try:
        text = " ".join(f"Line {i}: the {i}th fact is {i * 7}." for i in range(60))   # ~900 tokens
        r = httpx.post(s.url + "/v1/chat/completions", timeout=300, json={
            "model": MODEL, "messages": [{"role": "user", "content": text + " Which is the 3rd fact?"}],
            "temperature": 0, "max_tokens": 8}).json()
        assert r["usage"]["prompt_tokens"] > 600
        assert r["loopserve"]["kv_evicted"] > 0 and r["loopserve"]["kv_cells"] <= 256 + 64
    finally:
        out = s.stop()
    assert "KV loopserve budget 256 cell-wise, chat format" in out


def test_dialogues_survive_a_restart(tmp_path):
    s = Server(tmp_path)
    msgs = [{"role": "user", "content": "Remember the number 41."}]
    try:
        r = _chat(s.client(), msgs)
        resp = s.client().responses.create(model=MODEL, input="Remember the word lark.", temperature=0,
                                           max_output_tokens=8)
    finally:
        s.stop()
    saved = list((tmp_path / "dialogues" / "server").glob("*/*.lsd"))
    assert len(saved) == 2
    s = Server(tmp_path)
    try:
        msgs += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": "Which number?"}]
        r2 = _chat(s.client(), msgs)
        assert r2.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        # a Responses conversation too: only the new input is prefilled
        nxt = s.client().responses.create(model=MODEL, input="Which word?", previous_response_id=resp.id,
                                          temperature=0, max_output_tokens=8)
        assert nxt.usage.input_tokens_details.cached_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    finally:
        s.stop()


def _saved_conversation(home: Path) -> tuple[list[dict], Path]:
    """One turn on a server that then stops: the conversation with its next question, and the
    state file it saved."""
    s = Server(home)
    msgs = [{"role": "user", "content": "Remember the number 41."}]
    try:
        r = _chat(s.client(), msgs)
    finally:
        s.stop()
    (saved,) = (home / "dialogues" / "server").glob("*/*.lsd")
    return msgs + [{"role": "assistant", "content": r.choices[0].message.content},
                   {"role": "user", "content": "Which number?"}], saved


def test_a_restart_with_other_flash_attention_prefills_afresh(tmp_path):
    """A saved dialogue whose KV state this server cannot load (flash attention changed, so V is
    laid out otherwise): its conversation is prefilled afresh and its file stays as it was.
    Before, every request that repeated it failed with "llama.cpp rejected the sequence state"."""
    msgs, saved = _saved_conversation(tmp_path)
    kept = saved.read_bytes()
    s = Server(tmp_path, "--no-flash-attn")
    try:
        r2 = _chat(s.client(), msgs)
        assert r2.choices[0].message.content and r2.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        out = s.stop()
    assert "saved with flash attention on, this context has it off" in out and "0 saved dialogues found" in out
    assert saved.read_bytes() == kept


def test_a_state_file_damaged_on_disk_is_set_aside_and_the_conversation_goes_on(tmp_path):
    """The index reads a file's header only; its KV state is checked when a request needs it. A
    file damaged there (or refused by llama.cpp) failed every request that repeated the
    conversation with a 400; now it is set aside and the conversation prefilled afresh."""
    msgs, saved = _saved_conversation(tmp_path)
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0x01                     # in the KV state, past the header
    saved.write_bytes(bytes(data))
    s = Server(tmp_path)
    try:
        r2 = _chat(s.client(), msgs)
        assert r2.choices[0].message.content and r2.usage.prompt_tokens_details.cached_tokens == 0
        again = _chat(s.client(), msgs + [{"role": "assistant", "content": r2.choices[0].message.content},
                                          {"role": "user", "content": "Thanks."}])
        assert again.usage.prompt_tokens_details.cached_tokens > 0   # the new dialogue goes on
    finally:
        out = s.stop()
    assert "could not be loaded" in out and "checksum" in out
    aside = saved.with_name(saved.name + ".unloadable")
    assert aside.read_bytes() == bytes(data)         # kept, out of the index


def test_a_server_killed_during_a_save_keeps_the_dialogue(tmp_path):
    # kill -9 while a state file is being written (its temporary file exists): after a restart
    # the dialogue is the one saved before, whole, and goes on from there
    s = Server(tmp_path, "--save-idle", "0.05")
    url, h = s.url + "/v1/chat/completions", {"X-Dialogue-Id": "killed"}
    body = {"model": MODEL, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": "A long note about harbours and ships. " * 100}]}
    caught = None
    try:
        r1 = httpx.post(url, headers=h, json=body, timeout=300).json()
        deadline = time.time() + 30
        while not list(tmp_path.glob("dialogues/server/*/killed.lsd")) and time.time() < deadline:
            time.sleep(0.05)
        saved = next(tmp_path.glob("dialogues/server/*/killed.lsd"))
        first = saved.read_bytes()
        folder = saved.parent
        body["messages"] += [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                             {"role": "user", "content": "And the ships? " * 60}]
        httpx.post(url, headers=h, json=body, timeout=300).raise_for_status()
        deadline = time.time() + 30
        while caught is None and time.time() < deadline:
            caught = next(folder.glob(".killed.lsd.*.tmp"), None)
        s.proc.kill()   # SIGKILL
        s.proc.communicate(timeout=30)
    except BaseException:
        s.stop()
        raise
    assert caught is not None, "the second save was not seen in progress"
    # the kill came before the rename (the previous file, whole) or, rarely, just after it
    # (the new one, and no temporary file left)
    before = saved.read_bytes() == first
    assert before or not caught.exists()
    s = Server(tmp_path, "--save-idle", "0.05")
    try:
        assert not list(folder.glob(".*.tmp"))   # the killed save's leftover is gone
        r3 = httpx.post(s.url + "/v1/chat/completions", headers=h, json=dict(body, messages=body["messages"][:2] + [
            {"role": "user", "content": "Which was it about?"}]), timeout=300).json()
        cached, history = (r3["usage"]["prompt_tokens_details"]["cached_tokens"],
                           r1["usage"]["prompt_tokens"] + r1["usage"]["completion_tokens"])
        assert cached == history if before else cached >= history
    finally:
        s.stop()


def test_an_api_key_is_required_when_set(tmp_path):
    s = Server(tmp_path, "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            _chat(s.client("wrong"), [{"role": "user", "content": "hi"}])
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert _chat(s.client("s3cret"), [{"role": "user", "content": "hi"}]).choices[0].message.content
        assert httpx.get(s.url + "/health").status_code == 200   # health checks need no key
        assert httpx.post(s.url + "/tokenize", json={"content": "hi"}).status_code == 401
        assert httpx.post(s.url + "/tokenize", json={"content": "hi"},
                          headers={"Authorization": "Bearer s3cret"}).json()["tokens"]
        # Anthropic's clients send the key as x-api-key, and get its error shape
        anthropic, wrong = _anthropic(s, api_key="wrong")
        with pytest.raises(anthropic.AuthenticationError) as e:
            wrong.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["error"]["type"] == "authentication_error"
        for kw in ({"api_key": "s3cret"}, {"api_key": None, "auth_token": "s3cret"}):
            assert _anthropic(s, **kw)[1].messages.create(model=MODEL, max_tokens=2,
                                                         messages=[{"role": "user", "content": "hi"}]).content
    finally:
        s.stop()


def test_browser_pages_of_the_allowed_origins_may_call_it(tmp_path, server):
    page, other = "http://chat.example", "http://elsewhere.example"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    # by default no page of another origin may read the answers
    r = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": page, **preflight})
    assert "access-control-allow-origin" not in r.headers
    s = Server(tmp_path, "--api-key", "s3cret", "--cors-origin", page)
    try:
        url = s.url + "/v1/chat/completions"
        r = httpx.options(url, headers={"Origin": page, **preflight})   # a preflight carries no key
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.post(url, json=body, headers={"Origin": page, "Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        assert "x-dialogue-id" in r.headers["access-control-expose-headers"].lower()
        r = httpx.post(url, json=body, headers={"Origin": page})          # the page can read the 401
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == page
        r = httpx.options(url, headers={"Origin": other, **preflight})
        assert "access-control-allow-origin" not in r.headers
    finally:
        s.stop()
