"""A reasoning model's thinking apart from its answer (reasoning.py): the splitter, each API's
shapes, and a tiny model whose template opens the thinking (as DeepSeek-R1's does) through the
Python API and the server's app."""
import json
import random

import pytest

from loopserve_edge import LoopServeConfig, messages_api, openai_api, responses_api
from loopserve_edge.chat_template import CHATML, ChatTemplate
from loopserve_edge.dialogue import TurnStats
from loopserve_edge.random_gguf import write_random_llama
from loopserve_edge.reasoning import Splitter, opens_thinking, split, thinking_tokens

REPLIES = [
    ("<think>\nThe user asks.\n</think>\n\nThe answer.", ("The user asks.", "The answer.")),
    ("  <think>a < b </thin k></think>ok", ("a < b </thin k>", "ok")),
    ("<think></think>\n\nans", ("", "ans")),
    ("<think>\ncut short by max_tokens", ("cut short by max_tokens", "")),
    ("Plain reply, no thinking.", (None, "Plain reply, no thinking.")),
    ("\n<b>html</b> <think> later is text", (None, "\n<b>html</b> <think> later is text")),
    ("<thi", (None, "<thi")),
]


def chatml(generation: str = "") -> str:
    """ChatML whose history drops each past reply's thinking, as reasoning models' templates do,
    `generation` (Jinja) after the assistant's header that ends the prompt."""
    return ("{% for message in messages %}"
            "{% set c = message['content'] %}"
            "{% if message['role'] == 'assistant' %}{% set c = c.split('</think>')[-1] %}{% endif %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + c + '<|im_end|>' + '\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}" + generation + "{% endif %}")


# the prompt opens the thinking, as DeepSeek-R1's does (unless told `think` false)
OPENS = chatml("{% if think is not defined or think %}{{ '<think>\n' }}{% endif %}")


def _pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("text,want", REPLIES)
def test_the_splitter_gives_the_same_parts_however_the_reply_comes(text, want):
    assert split(text) == want
    rng = random.Random(0)
    for _ in range(30):
        s = Splitter()
        parts = [p for piece in _pieces(text, rng) for p in s.feed(piece)] + s.finish()
        got = "".join(t for k, t in parts if k == "reasoning"), "".join(t for k, t in parts if k == "content")
        assert (got[0] if s.thought else None, got[1]) == want


def test_the_tokens_of_the_thinking_are_counted_to_the_one_that_closes_it():
    assert thinking_tokens([b"<think>", b"\nab", b"c\n</th", b"ink>", b"\n\nans", b"wer"]) == 4
    assert thinking_tokens([b"mulling", b"</think>", b"ok"], opened=True) == 2
    assert thinking_tokens([b"<think>", b"never closed"]) == 2
    assert thinking_tokens([b"Hello", b" <think>"]) == 0 and thinking_tokens([]) == 0
    assert thinking_tokens([b"<think>\xc3", b"\xa9</think>", b"a"]) == 2   # a character across tokens


def test_a_prompt_that_opens_the_thinking():
    assert split("hmm\n</think>\n\nok", opened=True) == ("hmm", "ok")
    assert split("all thinking", opened=True) == ("all thinking", "")
    assert opens_thinking("<|Assistant|><think>\n") and not opens_thinking("<|im_start|>assistant\n")
    assert not opens_thinking("assistant\n<think>\n\n</think>\n\n")   # Qwen3 with its thinking off


def _stats(n: int = 5) -> TurnStats:
    return TurnStats(prompt_tokens=10, reused_tokens=0, prefilled_tokens=10, ttft_s=0.1, decode_tokens=n,
                     decode_s=0.1, kv_cells=15, kv_capacity=64, finish_reason="stop", swapped_in=False)


def _req(body: dict | None = None, fmt: str = "auto", template: str = CHATML):
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}], **(body or {})}
    return openai_api.with_thinking(openai_api.parse_chat(body), fmt, ChatTemplate(template, "", ""))


def test_chat_shapes_give_the_thinking_as_reasoning_content():
    text = REPLIES[0][0]
    msg = openai_api.ChatShapes(_req(), "fp").response(text, _stats(), "d", None)["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == REPLIES[0][1]
    shapes = openai_api.ChatShapes(_req({"stream": True}), "fp")
    deltas = [c["choices"][0]["delta"] for p in _pieces(text, random.Random(1)) for c in shapes.piece(p, None)]
    deltas += [c["choices"][0]["delta"] for c in shapes.end(_stats(), None)]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user asks."
    assert "".join(d.get("content", "") for d in deltas) == "The answer."
    # off: by the request's reasoning_format, the server's, or a reply held to a grammar
    for req in (_req({"reasoning_format": "none"}), _req(fmt="none"), _req({"response_format": {"type": "json_object"}})):
        msg = openai_api.ChatShapes(req, "fp").response(text, _stats(), "d", None)["choices"][0]["message"]
        assert msg["content"] == text and "reasoning_content" not in msg
    assert _req({"reasoning_format": "none"}, fmt="auto").thinking == "off"
    assert _req({"reasoning_format": "deepseek"}, fmt="none").thinking == "tagged"
    with pytest.raises(openai_api.RequestError) as e:
        _req({"reasoning_format": "hidden"})
    assert e.value.param == "reasoning_format"


def test_messages_and_responses_shapes_give_a_thinking_block_and_a_reasoning_item():
    text = REPLIES[0][0]
    m = messages_api.MessageShapes(_req(), "fp", messages_api.CallTexts()).response(text, _stats(), "d", None)
    assert m["content"] == [{"type": "thinking", "thinking": "The user asks.", "signature": ""},
                            {"type": "text", "text": "The answer."}]
    shapes = messages_api.MessageShapes(_req({"stream": True}), "fp", messages_api.CallTexts())
    events = [e for p in _pieces(text, random.Random(2)) for e in shapes.piece(p, None)] + shapes.end(_stats(), None)
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["thinking", "text"] and shapes.blocks == m["content"]
    assert [e["index"] for e in events if e["type"] == "content_block_stop"] == [0, 1]

    saved = []
    r = responses_api.ResponseShapes(_req(), "fp", {}, None, lambda obj, msg: saved.append(msg))
    obj = r.response(text, _stats(), "d", None)
    assert [it["type"] for it in obj["output"]] == ["reasoning", "message"]
    assert obj["output"][0]["content"] == [{"type": "reasoning_text", "text": "The user asks."}]
    # what the next response's history holds: the answer alone
    assert saved == [{"role": "assistant", "content": "The answer."}]
    shapes = responses_api.ResponseShapes(_req({"stream": True}), "fp", {}, None, lambda *_: None)
    events = [e for p in _pieces(text, random.Random(3)) for e in shapes.piece(p, None)] + shapes.end(_stats(), None)
    kinds = [e["type"] for e in events]
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == "The user asks."
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert [it["type"] for it in events[-1]["response"]["output"]] == ["reasoning", "message"]
    # a reasoning item sent back as input is the model's past thinking: left out
    chat, added = responses_api.to_chat({"model": "m", "input": [
        {"type": "message", "role": "user", "content": "q"}, obj["output"][0],
        {"type": "message", "role": "assistant", "content": "The answer."},
        {"type": "message", "role": "user", "content": "and?"}]}, [])
    assert [m["role"] for m in added] == ["user", "assistant", "user"]


@pytest.fixture(scope="module")
def opening_model(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("opens") / "opens.gguf", seed=0, chat_template=OPENS)


@pytest.mark.parametrize("cfg", [None, LoopServeConfig(policy="loopserve", budget=48, recent=16)], ids=["full", "cut"])
def test_a_thinking_reply_goes_back_as_its_answer_and_the_dialogue_goes_on(opening_model, make_llm, cfg):
    llm = make_llm(opening_model, n_ctx=1024, loopserve=cfg)
    assert llm.template.opens_thinking()
    messages = [{"role": "user", "content": "first question"}]
    turns = []
    for k in range(3):
        r = llm.create_chat_completion(messages, temperature=0, max_tokens=60)
        msg = r["choices"][0]["message"]
        # the random model never closes its thinking: all of it is reasoning, the answer empty
        assert msg["content"] == "" and len(msg["reasoning_content"]) > 0
        assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == r["usage"]["completion_tokens"] > 0
        turns.append(r["usage"])
        messages += [{"role": "assistant", "content": msg["content"]}, {"role": "user", "content": f"next {k}"}]
    store = llm._completions.store
    assert len(store.entries) == 1   # each turn went on in the same dialogue: nothing branched
    d = next(iter(store.entries.values())).dialogue
    assert d.messages[-1] == {"role": "assistant", "content": ""}
    for usage in turns[1:]:
        # the history was reused; what was computed is the new message, the reply without its
        # thinking, and the template's glue
        assert usage["prompt_tokens_details"]["cached_tokens"] > 0
        assert usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"] < 40
    assert (d.evicted > 0) == (cfg is not None)


def test_the_server_streams_the_thinking_in_each_api(opening_model, tmp_path):
    from fastapi.testclient import TestClient

    from loopserve_edge import Llama
    from loopserve_edge.server.app import create_app
    from loopserve_edge.server.engine import Engine, ServeOptions

    llm = Llama(opening_model, n_ctx=1024, n_threads=1)
    engine = Engine(llm, ServeOptions(model_name="m", dialogues_dir=tmp_path / "d"))
    try:
        with TestClient(create_app(engine)) as client:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                    "temperature": 0, "stream": True}
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            deltas = [c["choices"][0]["delta"] for c in chunks]
            thought = "".join(d.get("reasoning_content", "") for d in deltas)
            assert thought and not "".join(d.get("content", "") for d in deltas)
            whole = client.post("/v1/chat/completions", json=dict(body, stream=False)).json()
            assert whole["choices"][0]["message"]["reasoning_content"] == thought
            # the template told not to open it: the prompt lacks <think>, the reply is the answer
            plain = client.post("/v1/chat/completions", json=dict(body, stream=False,
                                                                  chat_template_kwargs={"think": False})).json()
            assert "reasoning_content" not in plain["choices"][0]["message"]
            assert plain["usage"]["prompt_tokens"] < whole["usage"]["prompt_tokens"]
            none = client.post("/v1/chat/completions", json=dict(body, stream=False, reasoning_format="none")).json()
            assert none["choices"][0]["message"]["content"] == thought and \
                "reasoning_content" not in none["choices"][0]["message"]
            m = client.post("/v1/messages", json={"model": "m", "max_tokens": 20, "temperature": 0,
                                                 "messages": [{"role": "user", "content": "hi"}]}).json()
            assert m["content"] == [{"type": "thinking", "thinking": thought, "signature": ""}]
            o = client.post("/v1/responses", json={"model": "m", "max_output_tokens": 20, "temperature": 0,
                                                   "input": "hi"}).json()
            assert [it["type"] for it in o["output"]] == ["reasoning", "message"]
            assert o["output"][0]["content"][0]["text"] == thought
            assert o["usage"]["output_tokens_details"]["reasoning_tokens"] == o["usage"]["output_tokens"] > 0
    finally:
        engine.stop()
        llm.close()


# an empty thinking block closed in the prompt when told not to think, as Qwen3's
QWEN3 = chatml("{% if enable_thinking is defined and enable_thinking is false %}"
               "{{ '<think>\n\n</think>\n\n' }}{% endif %}")


def test_chat_template_kwargs_reach_the_template_and_the_apis_that_switch_thinking(tmp_path, make_llm):
    template = ChatTemplate(QWEN3, "", "")
    assert template.render([{"role": "user", "content": "q"}], {"enable_thinking": False}).endswith(
        "assistant\n<think>\n\n</think>\n\n")
    opens = ChatTemplate(OPENS, "", "")
    assert opens.opens_thinking() and not opens.opens_thinking({"think": False})
    assert opens.opens_thinking({"think": object()})   # any value the Python API passes
    assert _req({"chat_template_kwargs": {"enable_thinking": False}}).chat_template_kwargs == {"enable_thinking": False}
    for bad in ({"messages": []}, {"add_generation_prompt": False}, ["enable_thinking"], {1: True}):
        with pytest.raises(openai_api.RequestError) as e:
            _req({"chat_template_kwargs": bad})
        assert e.value.param == "chat_template_kwargs"
    # Anthropic's thinking switch and the Responses API's effort "none": the same variable
    chat, _ = messages_api.to_chat({"model": "m", "max_tokens": 5, "thinking": {"type": "disabled"},
                                    "messages": [{"role": "user", "content": "q"}]}, messages_api.CallTexts())
    assert chat["chat_template_kwargs"] == {"enable_thinking": False}
    chat, _ = responses_api.to_chat({"model": "m", "input": "q", "reasoning": {"effort": "none"}}, [])
    assert chat["chat_template_kwargs"] == {"enable_thinking": False}

    llm = make_llm(write_random_llama(tmp_path / "qwen3.gguf", seed=0, chat_template=QWEN3), n_ctx=1024,
                   loopserve=LoopServeConfig(policy="loopserve", budget=48, recent=16))
    messages = [{"role": "user", "content": "no thinking please"}]
    r = llm.create_chat_completion(messages, temperature=0, max_tokens=40,
                                   chat_template_kwargs={"enable_thinking": False})
    d = next(iter(llm._completions.store.entries.values())).dialogue
    assert "assistant\n<think>\n\n</think>\n\n" in d.kv_text
    msg = r["choices"][0]["message"]
    assert "reasoning_content" not in msg and msg["content"]   # it did not think: the reply is the answer
    assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    # the next call without them: its template's prompt differs where the kwargs acted, and the
    # dialogue goes on from there
    messages += [{"role": "assistant", "content": msg["content"]}, {"role": "user", "content": "and now?"}]
    r = llm.create_chat_completion(messages, temperature=0, max_tokens=8)
    assert len(llm._completions.store.entries) == 1 and r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert "<think>\n\n</think>" not in d.kv_text
