"""A reasoning model's thinking apart from its answer.

Reasoning models (Qwen3, DeepSeek-R1 and its distillations, QwQ, SmolLM3) write their thinking
between `<think>` and `</think>` before the answer, or, where the chat template's generation prompt
opens the block itself (DeepSeek-R1's), from their first token. The APIs give it apart, as
llama-server does by default (its `--reasoning-format deepseek`): OpenAI's chat completions as the
message's `reasoning_content`, Anthropic's Messages API as a `thinking` block, OpenAI's Responses
API as a `reasoning` item; the answer alone is the content. Clients send the answer back as the
assistant message, which is also what these templates render of a past reply: the dialogue then
recomputes the answer without its thinking and goes on (text_spans).

Formats (`--reasoning-format`, or a request's `reasoning_format`): `auto` and `deepseek` split a
reply that thinks (a reply that does not is all content); `none` leaves the tags in the content.
"""
from __future__ import annotations

import codecs

OPEN, CLOSE = "<think>", "</think>"
FORMATS = ("auto", "deepseek", "none")


def opens_thinking(generation_prompt: str) -> bool:
    """Whether a template's generation prompt leaves a thinking block open (the reply then starts
    inside it)."""
    tail = generation_prompt.rstrip()
    return tail.endswith(OPEN) and CLOSE not in tail[tail.rfind(OPEN):]


def _held(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class Splitter:
    """A reply's pieces, as they come, into ("reasoning" | "content", text) parts: a part is given
    once no later text can change it (a tag's first characters, whitespace around the thinking,
    are held until the text after them shows what they are). The thinking's leading and trailing
    whitespace and the answer's leading whitespace are dropped."""

    def __init__(self, opened: bool = False):
        self.state = "think" if opened else "start"   # start | think | answer
        self.buf = ""
        self.thought = opened  # the reply thinks (its reasoning, possibly empty, is given)
        self.fresh = True      # nothing of this part given yet: its leading whitespace goes

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith(OPEN):
                    self.buf, self.state, self.thought, self.fresh = head[len(OPEN):], "think", True, True
                    continue
                if OPEN.startswith(head):   # (all whitespace, or a tag's start): wait
                    return out
                self.state, self.fresh = "answer", False   # no thinking: the reply as it is
                continue
            if self.state == "think":
                if self.fresh:
                    self.buf = self.buf.lstrip()
                end = self.buf.find(CLOSE)
                if end >= 0:
                    self._give(out, "reasoning", self.buf[:end].rstrip())
                    self.buf, self.state, self.fresh = self.buf[end + len(CLOSE):], "answer", True
                    continue
                body = self.buf[:len(self.buf) - _held(self.buf, CLOSE)]
                keep = len(body.rstrip())   # trailing whitespace may precede the closing tag
                self._give(out, "reasoning", self.buf[:keep])
                self.buf = self.buf[keep:]
                return out
            if self.fresh:
                self.buf = self.buf.lstrip()
            self._give(out, "content", self.buf)
            self.buf = ""
            return out

    def finish(self) -> list[tuple[str, str]]:
        """What is held at the reply's end: a thinking cut short is reasoning, as far as it went."""
        out: list[tuple[str, str]] = []
        if self.state == "think":
            self._give(out, "reasoning", self.buf.strip() if self.fresh else self.buf.rstrip())
        else:   # (an answer is given whole as it comes: only a start that could still be a tag waits)
            self._give(out, "content", self.buf)
        self.buf = ""
        return out

    def _give(self, out: list, kind: str, text: str) -> None:
        if text:
            out.append((kind, text))
            self.fresh = False


def split(text: str, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning, answer) of a whole reply; reasoning None where it does not think."""
    s = Splitter(opened)
    parts = s.feed(text) + s.finish()
    reasoning = "".join(t for k, t in parts if k == "reasoning")
    return (reasoning if s.thought else None), "".join(t for k, t in parts if k == "content")


def thinking_tokens(pieces: list[bytes], opened: bool = False) -> int:
    """How many of a reply's tokens (their pieces, in order) are its thinking: those up to the one
    that completes `</think>`, all where the thinking never closes, none where the reply does not
    think."""
    s, text = Splitter(opened), codecs.getincrementaldecoder("utf-8")("replace")
    for i, piece in enumerate(pieces):
        s.feed(text.decode(piece))
        if s.state == "answer":
            return i + 1 if s.thought else 0
    return len(pieces) if s.thought else 0
