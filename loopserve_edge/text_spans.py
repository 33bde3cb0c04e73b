"""Where each cached token's text lies in its dialogue's transcript.

A dialogue's KV cells spell `kv_text`, the conversation as rendered up to its last token, some of
it evicted. Each kept cell carries the byte span [start, end) of its token in that text, so that a
turn whose render rewrites earlier text recomputes from the first kept cell the rewrite reaches,
whatever cuts took out before it. Chat templates do rewrite: reasoning models' templates (Qwen3,
DeepSeek-R1, QwQ) drop a reply's thinking once the next user message follows it, Llama 3's and
Gemma's trim a reply's whitespace. Without the spans, a cut dialogue could only compare tokens,
which stop at the first evicted one: every such turn prefilled the whole conversation again.

A span is exact where the tokens' pieces spell the text they were made from (a byte-level or
special token's piece, a reply's tokens); otherwise every token of that stretch gets the whole
stretch (what a tokenizer prepended, such as a space prefix), so a rewrite inside it recomputes
it all, never less than it must. A token may end inside a UTF-8 character: rewind() moves back
past it.
"""
from __future__ import annotations

Span = tuple[int, int]


def of_pieces(pieces: list[bytes], start: int, text: bytes, skip: int = 0) -> list[Span]:
    """Spans of tokens made from `text`, which begins at byte `start` of the transcript; the first
    `skip` tokens (a BOS the tokenizer added) spell nothing of it."""
    if b"".join(pieces[skip:]) != text:
        return [(start, start)] * skip + [(start, start + len(text))] * (len(pieces) - skip)
    spans, off = [(start, start)] * skip, start
    for p in pieces[skip:]:
        spans.append((off, off + len(p)))
        off += len(p)
    return spans


def rewind(spans: list[Span], common: int, text: bytes) -> tuple[int, int]:
    """Where a new render `text` shares its first `common` bytes with the transcript: (cells to
    keep, the byte of `text` to recompute from). The kept cells lie wholly before that byte, which
    starts a character; a cell a rewrite reaches goes, and so do all after it."""
    b, keep = min(common, len(text)), len(spans)
    while True:
        while 0 < b < len(text) and text[b] & 0xC0 == 0x80:  # inside a character
            b -= 1
        while keep and spans[keep - 1][1] > b:
            keep -= 1
        if keep < len(spans) and spans[keep][0] < b:   # the first cell that goes begins before b
            b = spans[keep][0]
            continue
        return keep, b
