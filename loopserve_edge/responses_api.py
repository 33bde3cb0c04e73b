"""OpenAI's Responses API (POST /v1/responses, https://platform.openai.com/docs/api-reference/responses)
over the chat path: a request becomes a chat request (`to_chat`), its reply the Response object
or its stream of events (`ResponseShapes`, through ChatShapes, so that text, tool calls and
reply forms are read as for chat).

`previous_response_id` is what this API adds for loopserve-edge: the client sends only the new
input and the server holds the conversation. Each stored response keeps the messages it added
(its input and its output, as chat messages) and the id of the one before it, so the whole
conversation is found by following those ids back; the dialogue that holds it is found as for
any chat request (dialogue_store.py), its KV state reused, nothing prefilled again.
`instructions` are not carried over from a previous response (as OpenAI's).
"""
from __future__ import annotations

import time
import uuid

from . import openai_api
from .openai_api import RequestError

# what this API offers that the chat path cannot honour
REFUSED = {"background": "background responses", "conversation": "conversations (use previous_response_id)",
           "prompt": "prompt templates", "top_logprobs": "log-probabilities"}
ROLES = ("user", "assistant", "system", "developer")


def response_id() -> str:
    return "resp_" + uuid.uuid4().hex[:24]


def to_chat(body: dict, previous: list[dict]) -> tuple[dict, list[dict]]:
    """(the chat request body, the chat messages this request adds to the conversation):
    `previous` is the conversation before it (the previous responses' messages)."""
    for k, what in REFUSED.items():
        if body.get(k) not in (None, False):
            raise RequestError(f"{what} are not supported", k)
    reasoning = body.get("reasoning")
    if reasoning is not None and (not isinstance(reasoning, dict) or reasoning.get("effort") not in (None, "none")):
        raise RequestError("reasoning is not supported (the model's reply is its only output)", "reasoning")
    if body.get("include"):
        raise RequestError("include is not supported (the output items are all there is)", "include")
    if body.get("truncation") not in (None, "disabled"):
        raise RequestError('truncation must be "disabled": LoopServe\'s budget keeps a dialogue within the '
                           "context instead (the loopserve settings)", "truncation")
    for k, t, what in (("text", dict, "an object"), ("metadata", dict, "an object"), ("store", bool, "a boolean")):
        if body.get(k) is not None and not isinstance(body[k], t):
            raise RequestError(f"'{k}' must be {what}", k)
    added = _messages(body.get("input"))
    system = body.get("instructions")
    if system is not None and not isinstance(system, str):
        raise RequestError("'instructions' must be a string", "instructions")
    chat = {"model": body.get("model"), "messages": ([{"role": "system", "content": system}] if system else [])
            + previous + added, "stream": body.get("stream", False), "stream_options": {"include_usage": False}}
    for mine, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("parallel_tool_calls", "parallel_tool_calls"), ("loopserve", "loopserve"),
                         ("seed", "seed")):
        if body.get(mine) is not None:
            chat[theirs] = body[mine]
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if (reasoning or {}).get("effort") == "none":   # a template that reads it (Qwen3's) turns thinking off
        chat["chat_template_kwargs"] = {"enable_thinking": False}
    fmt = (body.get("text") or {}).get("format")
    if fmt is not None:
        chat["response_format"] = _format(fmt)
    return chat, added


def _messages(inp) -> list[dict]:
    """The input items as chat messages: function calls in a row become one assistant
    message's tool_calls, their outputs tool messages."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    if not isinstance(inp, list) or not inp:
        raise RequestError("'input' must be a string or a non-empty list of items", "input")
    out: list[dict] = []
    for i, item in enumerate(inp):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            if item.get("role") not in ROLES:
                raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
            out.append({"role": item["role"], "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if not all(isinstance(x, str) for x in (call["id"], item.get("name"), item.get("arguments"))):
                raise RequestError(f"{where}: a function_call item has string call_id, name and arguments", where)
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            elif out and out[-1]["role"] == "assistant":
                out[-1]["tool_calls"] = [call]
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "reasoning":
            continue   # a reply's thinking, sent back: the model's template drops it from the history too
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                raise RequestError(f"{where}: a function_call_output item has string call_id and output", where)
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        else:
            raise RequestError(f"{where}: only message, reasoning, function_call and function_call_output items "
                               "are supported", f"{where}.type")
    return out


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text")
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _tools(tools) -> list:
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of tools", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise RequestError(f"tools[{i}]: only function tools are supported", f"tools[{i}].type")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                      if t.get(k) is not None}})
    return out


def _tool_choice(choice):
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
                               "tool_choice")
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _format(fmt) -> dict | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema", {})}}
    return {"type": kind}


def param(p: str | None) -> str | None:
    """A chat request's parameter as this API names it."""
    if p is None:
        return None
    if p.startswith("messages"):
        return "input"
    return {"max_tokens": "max_output_tokens", "response_format": "text.format"}.get(
        p, p.replace(".function.", ".") if p.startswith("tools[") else p)


def message(text: str, p: str | None) -> str:
    """A chat request's error message with its parameter as this API names it ('max_tokens'
    read 'max_output_tokens')."""
    q = param(p)
    return text if p is None or q == p else text.replace(f"'{p}'", f"'{q}'")


# -- the response ------------------------------------------------------------------------------

class ResponseShapes:
    """The Response object and its stream's events, from a chat reply as ChatShapes reads it
    (the five calls of ChatShapes, for the server's answer path). `done(obj, message)` is called
    once the reply is whole: obj the Response, message the assistant's chat message."""
    done_marker = False   # a Responses stream ends with its response.completed event

    def __init__(self, req: openai_api.ChatRequest, fingerprint: str, body: dict, previous_id: str | None, done):
        self.chat = openai_api.ChatShapes(req, fingerprint)
        self.id, self.created, self.done = response_id(), int(time.time()), done
        self.echo = {"instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                     "metadata": body.get("metadata") or {}, "parallel_tool_calls": bool(body.get("parallel_tool_calls")),
                     "previous_response_id": previous_id, "temperature": body.get("temperature"),
                     "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
                     "tool_choice": body.get("tool_choice") or ("auto" if body.get("tools") else "none"),
                     "tools": body.get("tools") or [], "top_p": body.get("top_p"),
                     "store": body.get("store", True) is not False, "truncation": "disabled"}
        self.model = req.model
        self.items: list[dict] = []     # the output items so far
        self.seq = 0

    def _object(self, status: str, stats=None, did: str | None = None) -> dict:
        obj = {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
               "incomplete_details": None, "model": self.model, "output": self.items, "usage": None, **self.echo}
        if stats is not None:
            if stats.finish_reason != "stop":
                obj["status"], obj["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
            obj["usage"] = {"input_tokens": stats.prompt_tokens,
                            "input_tokens_details": {"cached_tokens": stats.reused_tokens},
                            "output_tokens": stats.decode_tokens, "output_tokens_details": {"reasoning_tokens": stats.reasoning_tokens},
                            "total_tokens": stats.prompt_tokens + stats.decode_tokens}
            obj["loopserve"] = openai_api.extras(did, stats)
        return obj

    def _event(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    # the answer path's calls

    def response(self, text: str, stats, did: str, logprobs) -> dict:
        msg = self.chat.response(text, stats, did, logprobs)["choices"][0]["message"]
        if msg.get("tool_calls"):
            self.items = [_call_item(c, "completed") for c in msg["tool_calls"]]
        else:
            self.items = [_message_item(msg["content"] or "", "completed")]
        if msg.get("reasoning_content") is not None:
            self.items.insert(0, _reasoning_item(msg["reasoning_content"], "completed"))
        obj = self._object("completed", stats, did)
        self.done(obj, _chat_message(self.items))
        return obj

    def start(self, prompt: tuple[int, int] | None = None) -> list[dict]:
        obj = self._object("in_progress")
        return [self._event("response.created", response=obj), self._event("response.in_progress", response=obj)]

    def piece(self, text: str, logprobs) -> list[dict]:
        return [e for c in self.chat.piece(text, logprobs) for e in self._deltas(c["choices"][0]["delta"])]

    def end(self, stats, logprobs, did: str | None = None) -> list[dict]:
        """The last events; the last one, response.completed (or .incomplete), carries the whole
        Response with its usage (so the chat request asks for no usage chunk)."""
        out = [e for c in self.chat.end(stats, logprobs) for e in self._deltas(c["choices"][0]["delta"])]
        out += self._close()
        if all(it["type"] == "reasoning" for it in self.items):   # no answer: an empty message
            out += self._deltas({"content": ""}) + self._close()
        obj = self._object("completed", stats, did)
        self.done(obj, _chat_message(self.items))
        return out + [self._event("response.completed" if obj["status"] == "completed" else "response.incomplete",
                                  response=obj)]

    # events from the chat deltas

    def _deltas(self, delta: dict) -> list[dict]:
        out = []
        if delta.get("reasoning_content"):
            if not self.items or self.items[-1]["type"] != "reasoning" or self.items[-1]["status"] != "in_progress":
                out += self._close()
                item = _reasoning_item("", "in_progress")
                self.items.append(item)
                out.append(self._event("response.output_item.added", output_index=len(self.items) - 1,
                                       item=dict(item, content=[])))
                out.append(self._event("response.content_part.added", item_id=item["id"],
                                       output_index=len(self.items) - 1, content_index=0,
                                       part={"type": "reasoning_text", "text": ""}))
            item = self.items[-1]
            item["content"][0]["text"] += delta["reasoning_content"]
            out.append(self._event("response.reasoning_text.delta", item_id=item["id"],
                                   output_index=len(self.items) - 1, content_index=0,
                                   delta=delta["reasoning_content"]))
        if "content" in delta and delta["content"] is not None and not delta.get("role"):
            if not self.items or self.items[-1]["type"] != "message" or self.items[-1]["status"] != "in_progress":
                out += self._close()
                item = _message_item("", "in_progress")
                item["content"] = []
                self.items.append(item)
                out.append(self._event("response.output_item.added", output_index=len(self.items) - 1,
                                       item=dict(item, content=[])))
                item["content"].append({"type": "output_text", "text": "", "annotations": []})
                out.append(self._event("response.content_part.added", item_id=item["id"],
                                       output_index=len(self.items) - 1, content_index=0,
                                       part={"type": "output_text", "text": "", "annotations": []}))
            item = self.items[-1]
            item["content"][0]["text"] += delta["content"]
            if delta["content"]:
                out.append(self._event("response.output_text.delta", item_id=item["id"],
                                       output_index=len(self.items) - 1, content_index=0, delta=delta["content"]))
        for c in delta.get("tool_calls") or ():
            if "id" in c:
                out += self._close()
                item = _call_item(c, "in_progress")
                self.items.append(item)
                out.append(self._event("response.output_item.added", output_index=len(self.items) - 1,
                                       item=dict(item)))
            item = self.items[-1]
            part = c["function"].get("arguments", "")
            if part:
                item["arguments"] += part
                out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                       output_index=len(self.items) - 1, delta=part))
        return out

    def _close(self) -> list[dict]:
        """The done events of the last output item, if it is still in progress."""
        if not self.items or self.items[-1]["status"] != "in_progress":
            return []
        item, i = self.items[-1], len(self.items) - 1
        item["status"] = "completed"
        if item["type"] == "reasoning":
            part = item["content"][0]
            return [self._event("response.reasoning_text.done", item_id=item["id"], output_index=i,
                                content_index=0, text=part["text"]),
                    self._event("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                                part=part),
                    self._event("response.output_item.done", output_index=i, item=item)]
        if item["type"] == "message":
            part = item["content"][0]
            return [self._event("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                                text=part["text"]),
                    self._event("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                                part=part),
                    self._event("response.output_item.done", output_index=i, item=item)]
        return [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                            arguments=item["arguments"]),
                self._event("response.output_item.done", output_index=i, item=item)]


def _message_item(text: str, status: str) -> dict:
    return {"type": "message", "id": "msg_" + uuid.uuid4().hex[:24], "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _reasoning_item(text: str, status: str) -> dict:
    """A reasoning model's thinking (reasoning.py), as OpenAI's open-weight models give it."""
    return {"type": "reasoning", "id": "rs_" + uuid.uuid4().hex[:24], "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(c: dict, status: str) -> dict:
    return {"type": "function_call", "id": "fc_" + uuid.uuid4().hex[:24], "call_id": c["id"], "status": status,
            "name": c["function"]["name"], "arguments": c["function"].get("arguments", "")}


def _chat_message(items: list[dict]) -> dict:
    """The output items as the assistant's chat message (what the next request's history holds)."""
    calls = [{"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
             for it in items if it["type"] == "function_call"]
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}
    return {"role": "assistant", "content": "".join(p["text"] for it in items if it["type"] == "message"
                                                    for p in it["content"])}
