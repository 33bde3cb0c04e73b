"""The HTTP side of OpenAI's chat-completions and Responses shapes and of Anthropic's Messages
(openai_api.py, responses_api.py and messages_api.py have the rest): error bodies with their
status, a request body decoded, server-sent events; llama-server's token endpoints' bodies.
"""
from __future__ import annotations

import json

from .. import messages_api, responses_api
from ..openai_api import (ChatRequest, RequestError, TextRequest, check_unicode, given, parse_chat,
                          parse_texts, resolve_text)


MESSAGES = "/v1/messages"   # Anthropic's API: its paths answer errors in its shape


class ApiError(Exception):
    """An error answered as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    @classmethod
    def bad_request(cls, e: RequestError) -> "ApiError":
        return cls(400, e.message, param=e.param, code=e.code)

    def body(self, path: str = "") -> dict:
        """The error body as the API at `path` gives it (Anthropic's under /v1/messages)."""
        if path.startswith(MESSAGES):
            return messages_api.error_body(self.status, self.message)
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# `model`: the served model's name, what a body without one asks for (llama-server's curl
# examples leave it out; a body naming another model is still refused by the app)
def parse_chat_request(raw: bytes, model: str) -> ChatRequest:
    return _parse(raw, parse_chat, model)


def parse_text_requests(raw: bytes, model: str, llm) -> list[TextRequest]:
    """A text completion body: a request per prompt, token ids read as their text."""
    reqs = _parse(raw, parse_texts, model)
    try:
        return [resolve_text(r, llm) for r in reqs]
    except RequestError as e:
        raise ApiError.bad_request(e) from None


def _parse(raw: bytes, parse, model: str):
    body = _json(raw)
    try:
        return parse(body, model)
    except RequestError as e:
        raise ApiError.bad_request(e) from None


def parse_response_request(raw: bytes, store, model: str) -> tuple[dict, ChatRequest, list[dict]]:
    """A Responses API body: (the body, its chat request, the chat messages it adds); `store`
    finds the conversation before previous_response_id; `model` as parse_chat_request."""
    body = _json(raw)
    try:
        prev = body.get("previous_response_id")
        chat, added = responses_api.to_chat(body, [] if prev is None else store.conversation(prev))
        return body, parse_chat(chat, model), added
    except RequestError as e:
        raise ApiError(400, responses_api.message(e.message, e.param), param=responses_api.param(e.param),
                       code=e.code) from None


def parse_messages_request(raw: bytes, calls, model: str) -> ChatRequest:
    """An Anthropic Messages body as a chat request; `calls` (messages_api.CallTexts) give
    the text of this server's tool calls; `model` as parse_chat_request."""
    body = _json(raw)
    try:
        chat, origin = messages_api.to_chat(body, calls)
    except RequestError as e:   # named as this API names them already
        raise ApiError.bad_request(e) from None
    try:
        return parse_chat(chat, model)
    except RequestError as e:
        raise ApiError(400, messages_api.message(e.message, e.param, origin),
                       param=messages_api.param(e.param, origin), code=e.code) from None


def parse_tokenize(raw: bytes) -> tuple[str, bool, bool]:
    """llama-server's POST /tokenize body: (content, add_special, with_pieces)."""
    body = _json(raw)
    content = body.get("content")
    if not isinstance(content, str):
        raise ApiError(400, "'content' must be a string", param="content")
    flags = []
    for name in ("add_special", "with_pieces"):
        v = given(body, name, False)   # null: unset, as llama-server reads it
        if not isinstance(v, bool):
            raise ApiError(400, f"'{name}' must be a boolean", param=name)
        flags.append(v)
    return content, flags[0], flags[1]


def parse_detokenize(raw: bytes, n_vocab: int) -> list[int]:
    """llama-server's POST /detokenize body: the token ids, each within the vocabulary."""
    toks = _json(raw).get("tokens")
    if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
        raise ApiError(400, "'tokens' must be a list of token ids", param="tokens")
    bad = [t for t in toks if not 0 <= t < n_vocab]
    if bad:
        raise ApiError(400, f"token {bad[0]} is not in the model's vocabulary ({n_vocab} tokens)", param="tokens")
    return toks


def _json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        check_unicode(body)   # every endpoint's strings, /tokenize's too
    except RequestError as e:
        raise ApiError.bad_request(e) from None
    return body


def sse(obj) -> bytes:
    """A server-sent event; a Responses or Messages API event is named by its type, as OpenAI's
    and Anthropic's are."""
    kind = obj.get("type") if isinstance(obj, dict) else None
    named = isinstance(kind, str) and (kind.startswith("response.") or kind in messages_api.EVENTS)
    head = f"event: {kind}\n".encode() if named else b""
    return head + b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
