"""Anthropic's Messages API (POST /v1/messages and /v1/messages/count_tokens,
https://docs.anthropic.com/en/api/messages) over the chat path, for the clients written against
it (Anthropic's SDKs, Claude Code and the tools built on them), as llama-server, vLLM and Ollama
offer it: a request becomes a chat request (`to_chat`), its reply a Message or its stream of
events (`MessageShapes`, through ChatShapes, so that text, tool calls and stops are read as for
chat).

A Messages client resends the whole conversation, as a chat client does, so the dialogue that
holds it is found the same way (dialogue_store.py) and only the new message is prefilled. One
thing differs: a tool_use block comes back with its `input` parsed, not as the text the model
wrote, and only the same text finds the dialogue. `CallTexts` keeps the text of the calls this
server wrote, by id; a call it does not know (written before a restart, or elsewhere) is written
without spaces, as the tools' grammar mostly has the model write it.
"""
from __future__ import annotations

import collections
import json
import re
import threading
import uuid

from . import openai_api
from .openai_api import RequestError

# the stream's events, named by their type (protocol.sse)
EVENTS = frozenset({"message_start", "content_block_start", "content_block_delta", "content_block_stop",
                    "message_delta", "message_stop", "ping", "error"})
# Anthropic's error types by HTTP status (its SDKs read the type, the status picks the exception)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 503: "overloaded_error"}
# what this API offers that the chat path cannot honour
REFUSED = {"container": "containers (code execution)", "mcp_servers": "MCP servers"}
# content blocks a conversation begun with another model may hold, with nothing for this one to
# read: its reasoning, which the next turn does not see either
DROPPED = ("thinking", "redacted_thinking")
CALL_TEXTS = 4096   # calls whose text CallTexts keeps


class CallTexts:
    """The arguments' text of the tool calls this server wrote, by call id (the newest
    CALL_TEXTS), so that a tool_use block sent back is rendered as the model wrote it."""

    def __init__(self, size: int = CALL_TEXTS):
        self.size = size
        self._texts: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()   # requests are read in the server's threads

    def add(self, call_id: str, text: str) -> None:
        with self._lock:
            self._texts[call_id] = text
            self._texts.move_to_end(call_id)
            while len(self._texts) > self.size:
                self._texts.popitem(last=False)

    def text(self, call_id, value) -> str:
        """The call's arguments as the model wrote them where this is one of this server's
        calls and `value` what they say; else `value` without spaces."""
        with self._lock:
            known = self._texts.get(call_id) if isinstance(call_id, str) else None
        if known is not None:
            try:
                if json.loads(known) == value:
                    return known
            except ValueError:
                pass
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def to_chat(body: dict, calls: CallTexts) -> tuple[dict, list[int | None]]:
    """(the chat request body of a Messages request body, the index in `messages` of each chat
    message, None for the system prompt: the chat path's errors name chat messages)."""
    for k, what in REFUSED.items():
        if body.get(k) not in (None, [], {}):
            raise RequestError(f"{what} are not supported", k)
    for k in ("metadata", "thinking", "output_config"):
        if body.get(k) is not None and not isinstance(body[k], dict):
            raise RequestError(f"'{k}' must be an object", k)
    system = _system(body.get("system"))
    msgs, origin = _messages(body.get("messages"), calls)
    chat = {"model": body.get("model"), "messages": system + msgs}
    for mine, theirs in (("max_tokens", "max_tokens"), ("stop_sequences", "stop"), ("stream", "stream"),
                         ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                         ("loopserve", "loopserve")):
        if body.get(mine) is not None:
            chat[theirs] = body[mine]
    tools = body.get("tools")
    if tools is not None:
        chat["tools"] = _tools(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        chat["tool_choice"], parallel = _tool_choice(choice)
        if tools:
            chat["parallel_tool_calls"] = parallel
    elif tools:
        chat["parallel_tool_calls"] = True   # Anthropic's default: one reply may call several tools
    kind = (body.get("thinking") or {}).get("type")
    if kind in ("enabled", "disabled"):
        # a template that reads the variable (Qwen3's, SmolLM3's) lets the model think or not
        chat["chat_template_kwargs"] = {"enable_thinking": kind == "enabled"}
    fmt = (body.get("output_config") or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise RequestError('output_config.format must be {"type": "json_schema", "schema": {...}}',
                               "output_config.format")
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    return chat, [None] * len(system) + origin


def _system(system) -> list[dict]:
    if system is None or system == "":
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    if isinstance(system, list):
        return [{"role": "system", "content": _texts(system, "system")}]
    raise RequestError("'system' must be a string or a list of text blocks", "system")


def _texts(blocks: list, where: str) -> str:
    """Text blocks as one text, a blank line between blocks (Anthropic's SDKs send a
    string's blocks apart, e.g. a reminder before the user's words)."""
    return openai_api.text_parts(blocks, where, "\n\n")


def _messages(msgs, calls: CallTexts) -> tuple[list[dict], list[int]]:
    """The messages as chat messages: a user message's tool_result blocks become tool messages
    (before its text, which follows them in one turn), an assistant message's tool_use blocks
    its tool_calls."""
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' is required and must be a non-empty list", "messages")
    out: list[dict] = []
    origin: list[int] = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        origin += [i - 1] * (len(out) - len(origin))   # the previous message's
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise RequestError(f"{where}.role must be user or assistant", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or a list of content blocks", f"{where}.content")
        texts, uses, results = [], [], []
        for j, b in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text" and isinstance(b.get("text"), str):
                texts.append(b["text"])
            elif kind in DROPPED and m["role"] == "assistant":
                continue
            elif kind == "tool_use" and m["role"] == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str) or \
                        not isinstance(b.get("input"), dict):
                    raise RequestError(f"{at}: a tool_use block has a string id and name and an object input", at)
                uses.append({"id": b["id"], "type": "function",
                             "function": {"name": b["name"], "arguments": calls.text(b["id"], b["input"])}})
            elif kind == "tool_result" and m["role"] == "user":
                if not isinstance(b.get("tool_use_id"), str):
                    raise RequestError(f"{at}: a tool_result block has the tool_use_id it answers", at)
                result = b.get("content", "")
                text = result if isinstance(result, str) else _texts(result, f"{at}.content") \
                    if isinstance(result, list) else None
                if text is None:
                    raise RequestError(f"{at}.content must be a string or a list of text blocks", f"{at}.content")
                if b.get("is_error"):
                    text = "Error: " + text
                results.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": text})
            else:
                allowed = "text, tool_use and thinking" if m["role"] == "assistant" else "text and tool_result"
                raise RequestError(f"{at}: only {allowed} blocks are supported in {m['role']} messages "
                                   f"(got {kind!r})", f"{at}.type")
        out += results
        if uses:
            out.append({"role": "assistant", "content": None, "tool_calls": uses})
        elif texts or not results:
            out.append({"role": m["role"], "content": "\n\n".join(texts)})
    origin += [len(msgs) - 1] * (len(out) - len(origin))
    return out, origin


def _tools(tools) -> list:
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of tools", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "custom") not in ("custom", None):
            raise RequestError(f"tools[{i}]: only custom tools (name, description, input_schema) are supported",
                               f"tools[{i}].type")
        fields = (("name", "name"), ("description", "description"), ("parameters", "input_schema"))
        out.append({"type": "function",
                    "function": {mine: t[theirs] for mine, theirs in fields if t.get(theirs) is not None}})
    return out


def _tool_choice(choice) -> tuple:
    """(the chat tool_choice, whether a reply may call several tools)."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    chat = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if kind == "tool":
        chat = {"type": "function", "function": {"name": choice.get("name")}}
    if chat is None:
        raise RequestError('tool_choice must be {"type": "auto"}, {"type": "any"}, {"type": "none"} or '
                           '{"type": "tool", "name": ...}', "tool_choice")
    off = choice.get("disable_parallel_tool_use", False)
    if not isinstance(off, bool):
        raise RequestError("tool_choice.disable_parallel_tool_use must be a boolean", "tool_choice")
    return chat, not off


_INDEX = re.compile(r"messages\[(\d+)\]")


def _reindex(s: str, origin: list[int | None]) -> str:
    """Chat messages' indices in s as the request's (the system prompt's: `system`)."""
    def one(m):
        k = int(m.group(1))
        i = origin[k] if k < len(origin) else None
        return "system" if i is None else f"messages[{i}]"
    return _INDEX.sub(one, s)


def param(p: str | None, origin: list[int | None]) -> str | None:
    """A chat request's parameter as this API names it."""
    if p is None:
        return None
    p = _reindex(p, origin)
    if p.startswith("tools["):
        return p.replace(".function.parameters", ".input_schema").replace(".function.", ".")
    return {"stop": "stop_sequences", "response_format": "output_config.format",
            "parallel_tool_calls": "tool_choice"}.get(p, p)


def message(text: str, p: str | None, origin: list[int | None]) -> str:
    """A chat request's error message with its parameter and messages as this API names them."""
    text = _reindex(text, origin)
    if p is None or p.startswith("messages"):
        return text
    q = param(p, origin)
    return text.replace(p, q) if p.startswith("tools[") else text.replace(f"'{p}'", f"'{q}'")


def error_body(status: int, text: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": text}}


# -- the reply -----------------------------------------------------------------------------

class MessageShapes:
    """The Message and its stream's events, from a chat reply as ChatShapes reads it (the
    calls of ChatShapes, for the server's answer path). The calls' texts go into `calls`."""
    done_marker = False   # a Messages stream ends with its message_stop event

    def __init__(self, req: openai_api.ChatRequest, fingerprint: str, calls: CallTexts):
        self.chat, self.req, self.calls = openai_api.ChatShapes(req, fingerprint), req, calls
        self.id = message_id()
        self.blocks: list[dict] = []   # the content blocks so far
        self.texts: dict[str, str] = {}  # each tool_use block's arguments as the model wrote them
        self.open = False              # the last block is still being streamed

    def _usage(self, prompt: int, reused: int, output: int) -> dict:
        # Anthropic's input_tokens leave out what the cache held: those are cache reads
        return {"input_tokens": prompt - reused, "output_tokens": output, "cache_read_input_tokens": reused,
                "cache_creation_input_tokens": 0}

    def _stop(self, stats, finish: str) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence) from the turn's stats and the chat reply's finish_reason."""
        if stats.finish_reason == "context_full":
            return "model_context_window_exceeded", None
        if finish == "length":
            return "max_tokens", None
        if finish == "tool_calls":
            return "tool_use", None
        if stats.stop_string is not None and stats.stop_string in self.req.stop:
            return "stop_sequence", stats.stop_string
        return "end_turn", None

    def _message(self, stats, did: str | None, finish: str) -> dict:
        reason, seq = self._stop(stats, finish)
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.req.model,
                "content": self.blocks, "stop_reason": reason, "stop_sequence": seq,
                "usage": self._usage(stats.prompt_tokens, stats.reused_tokens, stats.decode_tokens),
                "loopserve": openai_api.extras(did, stats)}

    def _remember(self) -> None:
        for cid, text in self.texts.items():
            self.calls.add(cid, text)

    # the answer path's calls

    def response(self, text: str, stats, did: str, logprobs) -> dict:
        choice = self.chat.response(text, stats, did, logprobs)["choices"][0]
        msg = choice["message"]
        if msg.get("reasoning_content") is not None:
            self.blocks.append(_thinking(msg["reasoning_content"]))
        for c in msg.get("tool_calls") or ():
            self.blocks.append(self._use(c["id"], c["function"]["name"], c["function"]["arguments"]))
        if not msg.get("tool_calls") and msg["content"]:
            self.blocks.append({"type": "text", "text": msg["content"]})
        self._remember()
        return self._message(stats, did, choice["finish_reason"])

    def start(self, prompt: tuple[int, int] | None = None) -> list[dict]:
        """message_start, with the prompt's (tokens, tokens reused) where the engine gave them."""
        n, reused = prompt or (0, 0)
        return [{"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.req.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": self._usage(n, reused, 0)}}]

    def piece(self, text: str, logprobs) -> list[dict]:
        return [e for c in self.chat.piece(text, logprobs) for e in self._deltas(c["choices"][0]["delta"])]

    def end(self, stats, logprobs, did: str | None = None) -> list[dict]:
        chunks = self.chat.end(stats, logprobs)
        out = [e for c in chunks for e in self._deltas(c["choices"][0]["delta"])]
        out += self._close()
        message = self._message(stats, did, chunks[-1]["choices"][0]["finish_reason"])
        self._remember()
        return out + [{"type": "message_delta", "delta": {"stop_reason": message["stop_reason"],
                                                          "stop_sequence": message["stop_sequence"]},
                       "usage": message["usage"], "loopserve": message["loopserve"]},
                      {"type": "message_stop"}]

    def usage(self, stats, did: str) -> dict:   # never asked for: the usage is in message_delta
        raise AssertionError("a Messages stream has no usage chunk")

    def _use(self, cid: str, name: str, arguments: str) -> dict:
        """A tool_use block, its arguments' text kept apart (`texts`)."""
        self.texts[cid] = arguments
        return {"type": "tool_use", "id": cid, "name": name, "input": _input(arguments)}

    def _deltas(self, delta: dict) -> list[dict]:
        out = []
        thought = delta.get("reasoning_content")
        if thought:
            if not self.open or self.blocks[-1]["type"] != "thinking":
                out += self._close()
                self.blocks.append(_thinking(""))
                self.open = True
                out.append({"type": "content_block_start", "index": len(self.blocks) - 1,
                            "content_block": _thinking("")})
            self.blocks[-1]["thinking"] += thought
            out.append({"type": "content_block_delta", "index": len(self.blocks) - 1,
                        "delta": {"type": "thinking_delta", "thinking": thought}})
        text = delta.get("content")
        if text and not delta.get("role"):
            if not self.open or self.blocks[-1]["type"] != "text":
                out += self._close()
                self.blocks.append({"type": "text", "text": ""})
                self.open = True
                out.append({"type": "content_block_start", "index": len(self.blocks) - 1,
                            "content_block": {"type": "text", "text": ""}})
            self.blocks[-1]["text"] += text
            out.append({"type": "content_block_delta", "index": len(self.blocks) - 1,
                        "delta": {"type": "text_delta", "text": text}})
        for c in delta.get("tool_calls") or ():
            if "id" in c:
                out += self._close()
                self.blocks.append(self._use(c["id"], c["function"]["name"], ""))
                self.open = True
                out.append({"type": "content_block_start", "index": len(self.blocks) - 1,
                            "content_block": {"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                                              "input": {}}})
            part = c["function"].get("arguments", "")
            if part:
                self.texts[self.blocks[-1]["id"]] += part
                out.append({"type": "content_block_delta", "index": len(self.blocks) - 1,
                            "delta": {"type": "input_json_delta", "partial_json": part}})
        return out

    def _close(self) -> list[dict]:
        if not self.open:
            return []
        self.open = False
        b = self.blocks[-1]
        if b["type"] == "tool_use":
            b["input"] = _input(self.texts[b["id"]])
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]


def _thinking(text: str) -> dict:
    """A thinking block: a reasoning model's thinking (reasoning.py). Its signature, which
    Anthropic's models give to verify it when it comes back, is empty: this server drops thinking
    blocks sent back, as the model's template drops its past thinking."""
    return {"type": "thinking", "thinking": text, "signature": ""}


def _input(arguments: str) -> dict:
    """A call's arguments as an object; a call cut short (max_tokens) has none whole: {}."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
