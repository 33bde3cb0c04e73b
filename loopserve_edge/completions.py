"""`Llama.create_chat_completion` and `create_completion`: llama-cpp-python's calls with
OpenAI's shapes, over dialogues.

Each call gives the whole conversation (or text), as with llama-cpp-python or an OpenAI client.
The dialogue holding the longest prefix of it goes on (for chat, a copy of it where the
conversation differs: dialogue_store.py), so only what is new is prefilled, and the KV
compression of the model's LoopServeConfig carries across calls as it does in one Dialogue.
The dialogues stay in RAM, in the KV pool or swapped out of it; beyond `ram_limit` bytes of
swapped-out state the least recently used are forgotten (the server keeps chats as state files).
"""
from __future__ import annotations

from typing import Iterator

from . import openai_api
from .dialogue_store import DialogueStore, Entry
from .openai_api import ChatRequest, LogprobCursor

# llama-cpp-python's defaults (max_tokens None: up to the context)
CHAT_DEFAULTS = dict(temperature=0.2, top_p=0.95, top_k=40, min_p=0.05)
TEXT_DEFAULTS = dict(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05)


class Completions:
    def __init__(self, llm, ram_limit: int = 1 << 30):
        self.llm = llm
        self.store = DialogueStore(llm, None, ram_limit)

    def chat(self, body: dict) -> dict | Iterator[dict]:
        """An OpenAI chat request body (decoded): the response, or with "stream" an iterator of
        its chunks. The prompt is prefilled before this returns, so that a bad request or a full
        context raises here (RequestError, ContextFullError), even when streaming."""
        openai_api.check_unicode(body)
        req = openai_api.with_thinking(openai_api.parse_chat(body, model=str(self.llm.model_path)), "auto",
                                       self.llm.template)
        sampling = self._sampling(req, CHAT_DEFAULTS)
        entry, _ = self.store.for_request(req.system, list(req.history), req.prompt, None,
                                          self.store.evictor(req.loopserve))
        return self._run(req, entry, sampling, openai_api.ChatShapes(req, self.llm.fingerprint))

    def text(self, body: dict) -> dict | Iterator[dict]:
        """An OpenAI text completion request body, as chat()."""
        openai_api.check_unicode(body)
        req = openai_api.resolve_text(openai_api.parse_text(body, model=str(self.llm.model_path)), self.llm)
        sampling = self._sampling(req, TEXT_DEFAULTS)
        shapes = openai_api.TextShapes(req, self.llm.fingerprint)
        if openai_api.scores_only(req):   # scoring tools' texts: the scoring pass alone, no dialogue
            text, stats, entries = openai_api.score_text(self.llm, req, sampling)
            return shapes.response(text, stats, None, entries)
        head = openai_api.prompt_logprobs(self.llm, req) if req.scores_prompt else None
        entry, _ = self.store.for_text(req.prompt, self.store.evictor(req.loopserve))
        return self._run(req, entry, sampling, shapes, head)

    def _sampling(self, req: ChatRequest, defaults: dict) -> dict:
        # a reply's length is bounded by the context, as llama-cpp-python's max_tokens=None
        return openai_api.sampling(req, max_tokens=self.llm.n_ctx, n_vocab=self.llm.n_vocab, **defaults)

    def _run(self, req: ChatRequest, entry: Entry, sampling: dict, shapes,
             head: list[dict] | None = None) -> dict | Iterator[dict]:
        """`head`: the prompt's log-probability entries, before the reply's (never streamed)."""
        entry.busy = True
        try:
            pieces = entry.dialogue.send(req.prompt, stream=True, stop=list(req.stop),
                                         chat_template_kwargs=req.chat_template_kwargs or None,
                                         reply_prefix=req.reply_prefix, **sampling)
        except BaseException:
            self.store.failed(entry)
            raise
        return (self._chunks(req, entry, pieces, shapes) if req.stream
                else self._whole(req, entry, pieces, shapes, head))

    def _whole(self, req: ChatRequest, entry: Entry, pieces: Iterator[str], shapes,
               head: list[dict] | None = None) -> dict:
        try:
            text = "".join(pieces)
        finally:
            self._end(req, entry, pieces)
        dlg = entry.dialogue
        logprobs = LogprobCursor(self.llm, dlg).take(len(text.encode()))
        if head is not None:
            logprobs = openai_api.scored_reply(self.llm, head, logprobs, dlg)
        return shapes.response(text, dlg.last_stats, entry.id, logprobs)

    def _chunks(self, req: ChatRequest, entry: Entry, pieces: Iterator[str], shapes) -> Iterator[dict]:
        dlg = entry.dialogue
        logprobs = LogprobCursor(self.llm, dlg)
        shown = 0
        try:
            yield from shapes.start()
            for piece in pieces:
                shown += len(piece.encode())
                yield from shapes.piece(piece, logprobs.take(shown))   # the tokens that start in it
        finally:
            self._end(req, entry, pieces)   # also when the caller stops early
        yield from shapes.end(dlg.last_stats, None, entry.id)   # a stop string's tokens, after the last piece: none
        if req.include_usage:
            yield shapes.usage(dlg.last_stats, entry.id)

    def _end(self, req: ChatRequest, entry: Entry, pieces: Iterator[str]) -> None:
        pieces.close()          # ends the turn: the reply so far is the dialogue's last message
        openai_api.answer_only(req, entry.dialogue)
        entry.busy = False
        self.store.updated(entry)
