"""Anthropic's Messages requests as chat requests (messages_api.py), without a model: the
server's tests (test_server.py) talk to it with Anthropic's SDK."""
import json

import pytest

from loopserve_edge import messages_api
from loopserve_edge.messages_api import CallTexts, to_chat
from loopserve_edge.server.protocol import ApiError, parse_messages_request


def _parse(body: dict, calls: CallTexts | None = None):
    return parse_messages_request(json.dumps(body).encode(), calls or CallTexts(), "m")


def test_blocks_become_the_chat_messages_the_model_sees():
    body = {"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "Be brief."},
                                                      {"type": "text", "text": "Use tools.", "cache_control": {}}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                         {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                                           {"type": "tool_use", "id": "t1", "name": "f",
                                                            "input": {"x": 1, "y": "é"}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"},
                                                      {"type": "text", "text": "and?"}]}]}
    chat, origin = to_chat(body, CallTexts())
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief.\n\nUse tools."},
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"x":1,"y":"é"}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "ok"},
        {"role": "user", "content": "and?"}]
    assert origin == [None, 0, 1, 2, 2]
    # Anthropic lets one reply call several tools unless told otherwise
    assert chat["parallel_tool_calls"] is True and chat["tools"][0]["function"]["parameters"] == {"type": "object"}
    req = _parse(body)
    assert req.prompt.startswith('{"tool_results":') and req.prompt.endswith("and?") and req.tools.parallel
    chat, _ = to_chat(dict(body, tool_choice={"type": "tool", "name": "f", "disable_parallel_tool_use": True}),
                      CallTexts())
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}} and not chat["parallel_tool_calls"]


def test_a_call_this_server_wrote_goes_back_in_as_written():
    calls = CallTexts(size=2)
    written = '{"city": "Paris", "n": 2}'
    calls.add("c1", written)
    assert calls.text("c1", {"city": "Paris", "n": 2}) == written
    # an input that says something else, or an id it does not know: without spaces
    assert calls.text("c1", {"city": "Rome", "n": 2}) == '{"city":"Rome","n":2}'
    assert calls.text("c9", {"city": "Paris", "n": 2}) == '{"city":"Paris","n":2}'
    calls.add("c2", "{}")
    calls.add("c3", "{ }")
    assert calls.text("c1", {"city": "Paris", "n": 2}) != written   # the oldest went
    assert calls.text("c3", {}) == "{ }"


def test_errors_name_the_request_s_own_messages_and_fields():
    def error(body):
        with pytest.raises(ApiError) as e:
            _parse(dict({"model": "m", "max_tokens": 5}, **body))
        return e.value

    # the chat path's alternation check, after a system prompt shifted its indices by one
    e = error({"system": "s", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "a", "name": "f", "input": {}}]}, {"role": "assistant", "content": "y"}],
        "tools": [{"name": "f"}]})
    assert e.param == "messages[2].role" and e.message.startswith("messages[2]: expected a user message")
    e = error({"system": "s", "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]})
    assert e.message.startswith("messages[0]:") and e.param == "messages[0].role"
    assert error({"messages": [{"role": "user", "content": "x"}], "stop_sequences": [""]}).param == "stop_sequences"
    e = error({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0})
    assert e.message.startswith("'max_tokens' must be between 1")
    e = error({"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f", "input_schema": []}]})
    assert e.param == "tools[0].input_schema" and "tools[0].input_schema" in e.message
    hi = [{"role": "user", "content": "x"}]
    assert error({"messages": [{"role": "user", "content": [{"type": "document"}]}]}).param == \
        "messages[0].content[0].type"
    assert error({"messages": hi, "container": "c"}).param == "container"
    assert error({"messages": hi, "tool_choice": {"type": "some"}}).param == "tool_choice"
    body = messages_api.error_body(e.status, e.message)
    assert body == {"type": "error", "error": {"type": "invalid_request_error", "message": e.message}}


def test_an_output_format_holds_the_reply_to_its_schema():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}}, "thinking": {"type": "disabled"}}
    chat, _ = to_chat(body, CallTexts())
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    req = _parse(body)
    assert req.grammar and "city" in req.grammar
    with pytest.raises(ApiError) as e:
        _parse(dict(body, output_config={"format": {"type": "xml"}}))
    assert e.value.param == "output_config.format"
