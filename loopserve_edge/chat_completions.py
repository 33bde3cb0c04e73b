"""`Llama.create_chat_completion`: llama-cpp-python's call with OpenAI's shapes, over dialogues.

Each call gives the whole conversation, as with llama-cpp-python or an OpenAI client. The
dialogue holding the longest prefix of it goes on (or a copy of it, branched where the
conversation differs: dialogue_store.py), so only the new messages are prefilled, and the KV
compression of the model's LoopServeConfig carries across calls as it does in one Dialogue.
The dialogues stay in RAM, in the KV pool or swapped out of it; beyond `ram_limit` bytes of
swapped-out state the least recently used are forgotten (the server keeps them as state files).
"""
from __future__ import annotations

from typing import Iterator

from . import openai_chat
from .dialogue_store import DialogueStore, Entry
from .openai_chat import ChatRequest, LogprobCursor

# llama-cpp-python's defaults for create_chat_completion
DEFAULTS = dict(temperature=0.2, top_p=0.95, top_k=40, min_p=0.05)


class ChatCompletions:
    def __init__(self, llm, ram_limit: int = 1 << 30):
        self.llm = llm
        self.store = DialogueStore(llm, None, ram_limit)

    def create(self, body: dict) -> dict | Iterator[dict]:
        """An OpenAI request body (decoded): the response, or with "stream" an iterator of its
        chunks. The prompt is prefilled before this returns, so that a bad request or a full
        context raises here (RequestError, ContextFullError), even when streaming."""
        llm = self.llm
        req = openai_chat.parse_chat(body, model=str(llm.model_path))
        # a reply's length is bounded by the context, as llama-cpp-python's max_tokens=None
        sampling = openai_chat.sampling(req, max_tokens=llm.n_ctx, n_vocab=llm.n_vocab, **DEFAULTS)
        evictor = self.store.evictor(req.loopserve)
        entry, dlg = self.store.for_request(req.system, list(req.history), req.prompt, None, evictor)
        entry.busy = True
        try:
            pieces = dlg.send(req.prompt, stream=True, stop=list(req.stop), reply_prefix=req.reply_prefix,
                              **sampling)
        except BaseException:
            entry.busy = False
            raise
        return self._chunks(req, entry, pieces) if req.stream else self._whole(req, entry, pieces)

    def _whole(self, req: ChatRequest, entry: Entry, pieces: Iterator[str]) -> dict:
        try:
            text = "".join(pieces)
        finally:
            self._end(entry, pieces)
        dlg = entry.dialogue
        logprobs = LogprobCursor(self.llm, dlg).take(len(text.encode()))
        return openai_chat.response(openai_chat.completion_id(), req.model, self.llm.fingerprint, text,
                                    dlg.last_stats, entry.id, logprobs)

    def _chunks(self, req: ChatRequest, entry: Entry, pieces: Iterator[str]) -> Iterator[dict]:
        llm, dlg = self.llm, entry.dialogue
        cid, fp = openai_chat.completion_id(), llm.fingerprint
        logprobs = LogprobCursor(llm, dlg)
        shown = 0
        try:
            yield openai_chat.chunk(cid, req.model, fp, {"role": "assistant", "content": ""})
            for piece in pieces:
                shown += len(piece.encode())
                yield openai_chat.chunk(cid, req.model, fp, {"content": piece}, logprobs=logprobs.take(shown))
        finally:
            self._end(entry, pieces)   # also when the caller stops early
        stats = dlg.last_stats
        yield openai_chat.chunk(cid, req.model, fp, {}, openai_chat.FINISH[stats.finish_reason],
                                logprobs.take(shown) or None)
        if req.include_usage:
            yield openai_chat.usage_chunk(cid, req.model, fp, stats, entry.id)

    def _end(self, entry: Entry, pieces: Iterator[str]) -> None:
        pieces.close()          # ends the turn: the reply so far is the dialogue's last message
        entry.busy = False
        self.store.updated(entry)
