"""Stored Responses (the Responses API's `store`, on by default): one JSON file each beside the
dialogues' state files, holding the Response, the id of the one before it and the chat
messages it added (its input and its output). A conversation is read back by following the ids
from the newest (responses_api.py says why); the KV state it needs is in the dialogue that holds
those messages. Files are written whole or not at all (as state files are).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .. import state_file
from ..openai_api import RequestError
from .protocol import ApiError

ID = re.compile(r"resp_[0-9a-f]{24}")


class ResponseStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, rid) -> Path | None:
        return self.root / f"{rid}.json" if isinstance(rid, str) and ID.fullmatch(rid) else None

    def _read(self, rid) -> dict | None:
        path = self._path(rid)
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None   # a file that cannot be read is as good as missing

    def save(self, obj: dict, previous_id: str | None, messages: list[dict]) -> None:
        state_file.replace_atomically(self._path(obj["id"]), json.dumps(
            {"response": obj, "previous_response_id": previous_id, "messages": messages}).encode())

    def conversation(self, rid: str) -> list[dict]:
        """The chat messages of the conversation up to and with response rid."""
        parts, seen = [], set()
        while rid is not None:
            got = self._read(rid)
            if got is None or rid in seen:
                raise RequestError(f"no stored response {rid!r} (responses made with store false are not "
                                   "kept)", "previous_response_id")
            seen.add(rid)
            parts.append(got["messages"])
            rid = got["previous_response_id"]
        return [m for part in reversed(parts) for m in part]

    def get(self, rid: str) -> dict:
        got = self._read(rid)
        if got is None:
            raise ApiError(404, f"no stored response {rid!r}", code="not_found")
        return got["response"]

    def delete(self, rid: str) -> None:
        if self._read(rid) is None:
            raise ApiError(404, f"no stored response {rid!r}", code="not_found")
        self._path(rid).unlink()
