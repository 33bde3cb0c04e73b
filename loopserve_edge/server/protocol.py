"""The HTTP side of OpenAI's chat-completions shapes (openai_api.py has the rest): error
bodies with their status, a request body decoded, server-sent events.
"""
from __future__ import annotations

import json

from ..openai_api import ChatRequest, RequestError, TextRequest, parse_chat, parse_text


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

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_chat_request(raw: bytes) -> ChatRequest:
    return _parse(raw, parse_chat)


def parse_text_request(raw: bytes) -> TextRequest:
    return _parse(raw, parse_text)


def _parse(raw: bytes, parse):
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    try:
        return parse(body)
    except RequestError as e:
        raise ApiError.bad_request(e) from None


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
