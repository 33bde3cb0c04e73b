"""A dialogue: messages, the tokens its KV state holds, and the turn loop over them.

The KV state always corresponds to `kv_text` (the rendered conversation up to the last
decoded token), so a new turn renders the template, checks that the old text is a prefix
of the new, and prefills only the difference; where the template rewrote some of it, the
cells from the first one the rewrite reaches are recomputed (text_spans).
"""
from __future__ import annotations

import base64
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from . import paths, state_file, text_spans
from .context import utf8
from .errors import ContextFullError, LoopServeError, StateFileError
from .held_scores import HeldScores
from .sampling import Sampler, SamplingParams, logprobs

if TYPE_CHECKING:
    from .context import Context
    from .eviction import Evictor


@dataclass(frozen=True)
class TurnStats:
    prompt_tokens: int      # tokens in the context once the user message is prefilled
    reused_tokens: int      # of those, tokens already in the KV cache
    prefilled_tokens: int   # of those, tokens computed this turn
    ttft_s: float           # send() to the first reply token chosen
    decode_tokens: int
    decode_s: float
    kv_cells: int           # cells the dialogue holds after the turn
    kv_capacity: int
    finish_reason: str      # stop | length | context_full
    swapped_in: bool        # the dialogue was not resident when the turn began
    kv_evicted: int = 0     # cells evicted from the dialogue so far (all turns)
    evict_s: float = 0.0    # time spent reading scores, choosing and removing cells this turn
    scored_tokens: int = 0  # generated tokens decoded with attention scoring on
    score_overhead_s: float = 0.0  # their decode time beyond that of unscored tokens (0 if none)
    sparse_tokens: int = 0  # prefilled tokens that went through the sparse prefill path
    prefill_density: float | None = None  # share of their causal attention computed
    prefill_chunks: int = 1  # >1: the input went in as chunks, each cut back to the budget
    stop_string: str | None = None  # the stop string that ended the reply, if one did
    reasoning_tokens: int = 0  # of decode_tokens, the thinking's (set where an API reads it apart)

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), decode_tps=self.decode_tps)


def render(template, system: str | None, messages: list[dict], kwargs: dict | None = None) -> str:
    """A conversation as the model sees it, its system prompt first where it has one; `kwargs`:
    the template's own variables (ChatTemplate.render)."""
    head = [{"role": "system", "content": system}] if system else []
    return template.render(head + messages, kwargs)


def wants_bos(llm, template, rendered: str) -> bool:
    """Whether the tokenizer adds BOS to the rendered text (not where the template wrote it)."""
    bos = template.bos_token
    return llm.add_bos and not (bos and rendered.startswith(bos))


def _sparse_fields(ps: dict | None) -> dict:
    if not ps or not ps["n_ubatch_sparse"]:
        return {}
    return {"sparse_tokens": ps["n_tokens_sparse"], "prefill_density": ps["density"]}


def _overhead(times: dict[bool, list[float]]) -> float:
    """Time of the scored decodes beyond what as many unscored ones took on average (0
    when either kind is missing: with every token scored, as by h2o, there is no base)."""
    scored, plain = times[True], times[False]
    if not scored or not plain:
        return 0.0
    return max(0.0, sum(scored) - sum(plain) / len(plain) * len(scored))


@dataclass(frozen=True)
class Step:
    """A generated token that send_steps() needs decoded (and its logits sent back)."""
    token: int
    pos: int


def common_start(a, b) -> int:
    """The length of a and b's common start (strings or bytes), by slice comparisons (not
    character by character in Python: a transcript may hold 100K characters); most often b
    extends a."""
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Dialogue:
    def __init__(self, llm: "Context", evictor: "Evictor", system: str | None = None,
                 name: str | None = None, dialogues_dir: str | os.PathLike | None = None, template=None):
        """`llm`: the context the dialogue's KV state lives in; `evictor`: the eviction
        policy run at each turn; `dialogues_dir`: where save() puts a named dialogue
        (None: paths.dialogues_dir()); `template`: how messages become text (None: the
        model's, llm.template; chat_template.RawText for text completions)."""
        self.llm = llm
        self.template = template or llm.template
        self.evictor = evictor
        self.dialogues_dir = dialogues_dir
        self.name = name
        self.system = system
        self.messages: list[dict] = []
        self.tokens: list[int] = []
        self.positions: list[int] = []
        self.kv_text = ""
        # each cell's token as a byte span of kv_text (text_spans), in cell order like tokens
        self.spans: list[tuple[int, int]] = []
        self.turns = 0
        self.evicted = 0       # cells removed by the eviction policy, all turns
        self.layout = "cell"   # "head" once a head-wise cut gave each KV head its own tokens
        # [n_heads, K] uint8: rows of the first K cells hidden from their head by a cut's
        # allocation (LoopServeConfig.allocation), None when every head sees every row
        self.hidden: np.ndarray | None = None
        self.score_window = 0  # attention scoring its next decodes want (set by the evictor)
        self.evict_s = 0.0     # time spent evicting, this turn
        self.created = self.updated = time.time()
        self.last_stats: TurnStats | None = None
        # Logits the first token of the last reply was chosen from (checks and tests).
        self.first_token_logits: np.ndarray | None = None
        # sampling.logprobs() of each token of the reply in progress or last, when its
        # sampling asked for them (SamplingParams.logprobs), else None
        self.reply_logprobs: list[tuple] | None = None
        self.reply_tokens: list[int] = []   # the last reply's tokens, as generated
        # the same of the end-of-generation token that ended that reply (never decoded), if one did
        self.end_logprob: tuple | None = None
        self._prefill_stats: dict | None = None  # llm.prefill_stats() of this turn's prefill
        self.prefill_chunks = 0  # pieces this turn's input was prefilled in
        self.prompt_counts = (0, 0)  # this turn's prompt tokens and those reused (send_steps)
        self._seq: int | None = None        # llama.cpp sequence while resident
        self._swapped: bytes | None = None  # sequence state while not resident
        self._held_scores = None  # its scores through a state round trip (held_scores)

    # -- turns -------------------------------------------------------------------------

    def send(self, text: str, stream: bool = False, token_fn=None, stop: str | list[str] | None = None,
             reply_prefix: str = "", chat_template_kwargs: dict | None = None, **sampling) -> str | Iterator[str]:
        """Add a user message and generate the reply. Prefill happens here, before
        returning, so a context that is too small raises at once even when streaming.

        reply_prefix: the start of the reply, given rather than generated ("The pass key is"):
        the model continues it, and the assistant message holds both; what is returned is
        the continuation.

        stop: strings that end the reply (with the prompt format's own, e.g. the end of the
        line in the completion format); the reply is cut before the first one (the tokens
        that made it stay in the KV cache, as an end-of-turn does).
        token_fn(logits) -> token replaces sampling (evaluations: teacher forcing, logit
        capture).
        chat_template_kwargs: the chat template's own variables for this turn's render (Qwen3's
        enable_thinking, say); a later turn rendered without them recomputes what they changed."""
        gen = self._drive(self.send_steps(text, token_fn=token_fn, stop=stop, reply_prefix=reply_prefix,
                                          chat_template_kwargs=chat_template_kwargs, **sampling))
        return gen if stream else "".join(gen)

    def send_steps(self, text: str, token_fn=None, stop: str | list[str] | None = None,
                   reply_prefix: str = "", chat_template_kwargs: dict | None = None, **sampling) -> Iterator:
        """send() for a caller that decodes the reply's tokens itself, so that several dialogues
        can be decoded in one batch (Context.decode_batch): the prompt is prefilled here, then
        the generator yields the reply's text pieces and `Step`s; for each Step the caller
        decodes Step.token at Step.pos in this dialogue and sends the logits back (or throws
        ContextFullError in)."""
        params = SamplingParams(**sampling)
        stops = tuple(self.template.stops) + ((stop,) if isinstance(stop, str) else tuple(stop or ()))
        if any(not s for s in stops):
            raise LoopServeError("a stop string must not be empty")
        constraint = None
        if params.grammar is not None and token_fn is None:
            if reply_prefix:
                raise LoopServeError("a grammar holds the reply from its first token: it cannot "
                                     "continue a given start of the reply")
            constraint = self.llm.grammar(params.grammar)  # parsed before anything changes
        t0 = time.perf_counter()
        self.evict_s = 0.0
        swapped_in = self._seq is None and self._swapped is not None
        try:
            logits, reused, prefilled = self._prefill(text, reply_prefix, chat_template_kwargs)
        except BaseException:
            if constraint is not None:
                constraint.close()
            raise
        # known before the reply (a stream's first event may report them; TurnStats once it ends)
        self.prompt_counts = (reused + prefilled, reused)
        return self._generate(params, logits, t0, reused, prefilled, swapped_in, token_fn, stops, reply_prefix,
                              constraint)

    def _drive(self, steps: Iterator) -> Iterator[str]:
        """The text of send_steps(), each Step decoded on its own."""
        try:
            item = next(steps)
            while True:
                if isinstance(item, Step):
                    try:
                        logits = self.llm.decode(self, [item.token], [item.pos])
                    except ContextFullError as e:
                        item = steps.throw(e)
                        continue
                    item = steps.send(logits)
                else:
                    yield item
                    item = next(steps)
        except StopIteration:
            return
        finally:
            steps.close()

    def _render(self, messages: list[dict], kwargs: dict | None = None) -> str:
        return render(self.template, self.system, messages, kwargs)

    def _prefill(self, text: str, reply_prefix: str = "", kwargs: dict | None = None) -> tuple[np.ndarray, int, int]:
        llm = self.llm
        messages = self.messages + [{"role": "user", "content": text}]
        rendered = self._render(messages, kwargs) + reply_prefix
        kv, r = self.kv_text.encode(), utf8(rendered)
        if self.tokens and r.startswith(kv):
            keep, b = len(self.tokens), len(kv)
        else:
            # The template rewrote earlier text (a reply's reasoning dropped, its whitespace
            # trimmed), or the conversation differs from the cache's (an edited or regenerated
            # turn, a branch; or this is the first turn): keep the cells wholly within the text
            # the two share, cut or not, and recompute the rest. By text, not tokens: a reply's
            # generated tokens need not be the ones the tokenizer makes of its text.
            keep, b = text_spans.rewind(self.spans, common_start(kv, r), r)
        if keep < len(self.tokens) and not llm.can_truncate(self, self._next_pos(keep)):
            # a sliding-window cache no longer holds the window the recomputed tokens attend to
            # (llama.cpp drops older cells from it): recompute everything
            keep, b = 0, 0
        bos = keep == 0 and wants_bos(llm, self.template, rendered)
        new = llm.tokenize(r[b:], add_bos=bos)
        spans = text_spans.of_pieces([llm._piece(t) for t in new], b, r[b:], skip=int(bos))
        if not new:  # nothing new to compute, but the last token's logits are needed
            keep -= 1
            new, spans = self.tokens[keep:keep + 1], self.spans[keep:keep + 1]
        chunked = self.evictor.active and keep + len(new) >= llm.n_ctx
        if not chunked and keep + len(new) >= llm.n_ctx:
            raise ContextFullError(
                f"this turn needs {keep + len(new)} tokens of context but n_ctx={llm.n_ctx}: start a new "
                "dialogue (/reset in the chat), use a larger n_ctx (--n-ctx), or set a KV budget "
                "(--kv-budget; a longer input is then prefilled in chunks)")
        if keep < len(self.tokens):
            # the new tokens take the positions after the last kept one: below the next cell's
            # where an eviction left a gap, whose last window a sliding-window cache still holds
            llm.make_resident(self)
            llm.remove_positions(self._seq, self._next_pos(keep))
            # what the kept cells spell, should this prefill fail (the cells that go begin at b or
            # later, but the last one where nothing was new)
            self.kv_text = r[:min(b, self.spans[keep][0])].decode(errors="replace")
            del self.tokens[keep:], self.positions[keep:], self.spans[keep:]
            if self.hidden is not None and self.hidden.shape[1] > keep:
                self.hidden = self.hidden[:, :keep]
        self.prefill_chunks = 0
        if chunked:
            logits = self._prefill_in_chunks(new, spans)
        else:
            logits = self._prefill_chunk(new, spans)
        self._prefill_stats = llm.prefill_stats() if llm.config.sparse_prefill else None
        self.kv_text = rendered
        self.messages = messages
        self.evictor.after_prefill(self)
        return logits, keep, len(new)

    def _next_pos(self, keep: int) -> int:
        """The position of the first token computed after the first `keep` cells."""
        return self.positions[keep - 1] + 1 if keep else 0

    def _prefill_chunk(self, new: list[int], spans: list[tuple[int, int]]) -> np.ndarray:
        self.evictor.begin_prefill(self, len(new))  # may renumber the kept cells first
        start = self.positions[-1] + 1 if self.positions else 0
        positions = list(range(start, start + len(new)))
        logits = self.llm.decode(self, new, positions)
        self.tokens += new
        self.positions += positions
        self.spans += spans
        self.prefill_chunks += 1
        return logits

    def _prefill_in_chunks(self, new: list[int], spans: list[tuple[int, int]]) -> np.ndarray:
        """Budgeted prefill of an input that does not fit beside the history: it goes in as
        chunks that fill the free cells, each followed by a cut back to the budget scored by
        the input's last tokens decoded after it (Evictor.chunk_probe; llama.cpp needs every
        cell of a chunk at once, but not the ones a cut dropped), so an input of any length
        passes through n_ctx cells. Should a chunk fail, the dialogue is put back as it was
        before the input's first chunk."""
        llm = self.llm
        llm.make_resident(self)
        saved = (llm.sequence_state(self._seq), list(self.tokens), list(self.positions), list(self.spans),
                 self.evicted, self.layout, self.hidden)
        try:
            done, probe = 0, self.evictor.chunk_probe(new)
            while True:
                n = self.evictor.next_chunk(self, len(new) - done, len(probe))
                logits = self._prefill_chunk(new[done:done + n], spans[done:done + n])
                done += n
                if done == len(new):
                    return logits
                self.evictor.after_chunk(self, probe)
        except BaseException:
            state, self.tokens, self.positions, self.spans, self.evicted, self.layout, self.hidden = saved
            llm.restore(self, state)
            raise

    def _generate(self, params: SamplingParams, logits: np.ndarray, t0: float, reused: int,
                  prefilled: int, swapped_in: bool, token_fn=None, stops: tuple[str, ...] = (),
                  reply_prefix: str = "", constraint=None) -> Iterator:
        llm = self.llm
        sampler = token_fn or Sampler(params, constraint, history=self.tokens)
        self.first_token_logits = logits
        self.reply_logprobs = None if params.logprobs is None else []
        self.end_logprob = None
        out: list[int] = []
        pending = b""
        reply_text = ""   # the reply decoded so far; with stops, text is held back until it
        shown = 0         # cannot be the start of one, and `shown` chars have been yielded
        hold = max((len(s) for s in stops), default=1) - 1
        cut: int | None = None  # where the reply ends, when a stop string ended it
        matched = None          # that stop string
        ttft = None
        t_dec = time.perf_counter()
        finish = "length"
        decode_times: dict[bool, list[float]] = {False: [], True: []}  # by scoring on/off
        start = off = len(self.kv_text.encode())   # where the reply's text begins in kv_text
        try:
            for _ in range(params.max_tokens):
                tok = sampler(logits)
                chosen_from = logits
                if ttft is None:
                    ttft = time.perf_counter() - t0
                    t_dec = time.perf_counter()
                if llm.is_eog(tok):
                    # Not decoded: the next turn's render supplies the end-of-turn text.
                    finish = "stop"
                    if self.reply_logprobs is not None:
                        self.end_logprob = logprobs(chosen_from, tok, params.logprobs)
                    break
                if len(self.positions) + 1 >= llm.n_ctx and not self.evictor.make_room(self):
                    finish = "context_full"
                    break
                pos = self.positions[-1] + 1
                scored = llm.score_window > 0
                t_tok = time.perf_counter()
                try:
                    logits = yield Step(tok, pos)
                except ContextFullError:
                    finish = "context_full"
                    break
                except GeneratorExit:
                    # closed between the token's decode and its logits (a server's client gone,
                    # the reply decoded with others): the cache may hold it, the dialogue does not
                    llm.remove_positions(llm.make_resident(self), pos)
                    raise
                decode_times[scored].append(time.perf_counter() - t_tok)
                self.tokens.append(tok)
                self.positions.append(pos)
                piece = llm._piece(tok)
                self.spans.append((off, off + len(piece)))
                off += len(piece)
                out.append(tok)
                if self.reply_logprobs is not None:
                    self.reply_logprobs.append(logprobs(chosen_from, tok, params.logprobs))
                self.evictor.after_token(self, len(out))
                pending += llm._piece(tok, special=False)
                text, pending = _split_utf8(pending)
                reply_text += text
                if not stops:
                    if text:
                        yield text
                        shown = len(reply_text)
                    continue
                hits = [(i, s) for s in stops if (i := reply_text.find(s, max(0, shown - hold))) >= 0]
                if hits:
                    cut, matched = min(hits, key=lambda h: h[0])
                    finish = "stop"
                    if cut > shown:
                        yield reply_text[shown:cut]
                    break
                if len(reply_text) - hold > shown:
                    yield reply_text[shown:len(reply_text) - hold]
                    shown = len(reply_text) - hold
            if cut is None:
                rest = reply_text[shown:] + (pending.decode(errors="replace") if pending else "")
                if rest:
                    yield rest
        finally:
            if constraint is not None:
                constraint.close()
            self.evictor.end_turn(self)
            # the text as it was given out (bytes that are not UTF-8 replaced as they came), which
            # clients send back: a decoding of all the tokens at once could replace them otherwise
            reply = reply_text[:cut] if cut is not None else reply_text + pending.decode(errors="replace")
            self.kv_text += llm.detokenize(out, special=True)
            self.reply_tokens = out
            if len(self.kv_text.encode()) != off:
                # bytes that are not UTF-8, replaced in the text: the reply's cells (the last
                # ones, wherever cuts left them) span the whole reply
                whole, i = (start, len(self.kv_text.encode())), len(self.spans)
                while i and self.spans[i - 1][0] >= start:
                    i -= 1
                    self.spans[i] = whole
            self.messages.append({"role": "assistant", "content": reply_prefix + reply})
            self.turns += 1
            self.updated = time.time()
            self.last_stats = TurnStats(
                prompt_tokens=reused + prefilled, reused_tokens=reused, prefilled_tokens=prefilled,
                ttft_s=ttft if ttft is not None else time.perf_counter() - t0,
                decode_tokens=len(out), decode_s=time.perf_counter() - t_dec,
                kv_cells=self.n_cells, kv_capacity=llm.n_ctx, finish_reason=finish,
                swapped_in=swapped_in, kv_evicted=self.evicted, evict_s=self.evict_s,
                scored_tokens=len(decode_times[True]), score_overhead_s=_overhead(decode_times),
                prefill_chunks=self.prefill_chunks, stop_string=matched,
                **_sparse_fields(self._prefill_stats))

    # -- state -------------------------------------------------------------------------

    @property
    def n_cells(self) -> int:
        return self.llm.seq_cells(self._seq) if self._seq is not None else len(self.positions)

    @property
    def resident(self) -> bool:
        return self._seq is not None

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.llm.forget(self)
        self.messages, self.tokens, self.positions, self.spans = [], [], [], []
        self.kv_text = ""
        self.turns = 0
        self.evicted = 0
        self.layout = "cell"
        self.hidden = None
        self.last_stats = None

    def close(self) -> None:
        self.llm.forget(self)

    def to_header(self) -> dict:
        llm = self.llm
        return {
            "model": {"fingerprint": llm.fingerprint, "name": llm.model_path.name,
                      "path": str(llm.model_path),
                      "desc": llm.metadata.get("general.name", "")},
            "context": llm.context_settings(),
            "loopserve": llm.config.to_dict(),
            "dialogue": {"name": self.name, "system": self.system, "messages": self.messages,
                         "tokens": self.tokens, "positions": self.positions,
                         "spans": [x for span in self.spans for x in span], "kv_text": self.kv_text,
                         "turns": self.turns, "evicted": self.evicted,
                         "layout": self.layout, **_hidden_field(self.hidden),
                         **_scores_field(llm.scores_to_hold(self)),
                         "created": self.created, "updated": self.updated},
        }

    @classmethod
    def from_header(cls, llm: "Context", evictor: "Evictor", header: dict, path: Path,
                    dialogues_dir: str | os.PathLike | None = None) -> "Dialogue":
        try:
            d = header["dialogue"]
            dlg = cls(llm, evictor, system=d["system"], name=d["name"], dialogues_dir=dialogues_dir)
            dlg.messages = list(d["messages"])
            dlg.tokens = [int(t) for t in d["tokens"]]
            dlg.positions = [int(p) for p in d["positions"]]
            dlg.kv_text = str(d["kv_text"])
            dlg.spans = _read_spans(d.get("spans"), dlg, llm)
            dlg.turns = int(d["turns"])
            dlg.evicted = int(d.get("evicted", 0))
            dlg.layout = str(d.get("layout", "cell"))  # version 1: always cell-wise
            dlg.hidden = _read_hidden(d.get("hidden"))  # before version 3: none
            dlg._held_scores = _read_scores(d.get("scores"), len(dlg.positions), sum(llm.layer_heads()))
            dlg.created, dlg.updated = float(d["created"]), float(d["updated"])
        except (KeyError, TypeError, ValueError) as e:
            raise StateFileError(f"{path}: malformed dialogue header ({e!r})") from None
        if dlg.layout not in ("cell", "head"):
            raise StateFileError(f"{path}: unknown cell layout {dlg.layout!r}")
        if not len(dlg.tokens) == len(dlg.positions) == len(dlg.spans):
            raise StateFileError(f"{path}: token, position and span lists differ in length")
        if dlg.hidden is not None and (dlg.layout != "head" or dlg.hidden.shape[1] > len(dlg.positions)
                                       or dlg.hidden.shape[0] != sum(llm.layer_heads())):
            raise StateFileError(f"{path}: hidden rows that do not fit the dialogue's cells or the model's heads")
        return dlg

    def state_size(self) -> int:
        """The size save() would write now, without writing (or copying) the KV state."""
        n = self.llm.sequence_state_size(self._seq) if self._seq is not None else len(self._swapped or b"")
        return state_file.encoded_size(self.to_header(), n)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the state file (atomically); default: the dialogue's file by name."""
        if path is None:
            if not self.name:
                raise LoopServeError("this dialogue has no name: pass a path to save()")
            path = self.name
        target = paths.dialogue_path(path, self.dialogues_dir)
        seq_state = self.llm.sequence_state(self._seq) if self._seq is not None else (self._swapped or b"")
        state_file.write(target, state_file.StateFile(self.to_header(), seq_state))
        return target


def _read_spans(field, dlg: Dialogue, llm: "Context") -> list[tuple[int, int]]:
    """The header's spans (flat: start, end, ...), each within kv_text; a file written before
    them has none: exact where the cells spell kv_text whole (no cut), else each cell spans all
    of it (a rewrite then recomputes the conversation, as it always did after a cut)."""
    n = len(kv := dlg.kv_text.encode())
    if field is None:
        return text_spans.of_pieces([llm._piece(t) for t in dlg.tokens], 0, kv)
    flat = [int(x) for x in field]
    spans = list(zip(flat[0::2], flat[1::2]))
    if len(flat) % 2 or any(not 0 <= a <= b <= n for a, b in spans):
        raise ValueError("token spans outside the dialogue's text")
    return spans


def _hidden_field(hidden: np.ndarray | None) -> dict:
    """The dialogue header's record of hidden rows (state file version 3), none when there are none."""
    if hidden is None:
        return {}
    return {"hidden": {"shape": list(hidden.shape),
                       "bits": base64.b64encode(np.packbits(hidden.astype(bool), axis=None)).decode()}}


def _read_hidden(field) -> np.ndarray | None:
    if field is None:
        return None
    rows, cols = (int(x) for x in field["shape"])
    bits = np.frombuffer(base64.b64decode(field["bits"], validate=True), np.uint8)
    if rows < 0 or cols < 0 or len(bits) != (rows * cols + 7) // 8:
        raise ValueError("hidden rows of the wrong size")
    return np.unpackbits(bits, count=rows * cols).reshape(rows, cols)


def _scores_field(held: HeldScores | None) -> dict:
    """The dialogue header's record of its attention scores (held_scores), so that a dialogue
    loaded from its file, or branched from another, ranks its next cut by the history it had
    (H2O's; a cut still due): by position, one row per scored KV head, none without scores.
    An older loopserve-edge ignores the field and starts with no scores, as it always did."""
    if held is None:
        return {}
    rows = np.ascontiguousarray(held.rows, "<f4")
    return {"scores": {"n_rows": int(held.n_rows), "shape": list(rows.shape),
                       "pos": base64.b64encode(np.ascontiguousarray(held.pos, "<i4").tobytes()).decode(),
                       "rows": base64.b64encode(rows.tobytes()).decode()}}


def _read_scores(field, n_cells: int, n_heads: int) -> HeldScores | None:
    if field is None:
        return None
    rows_n, cols = (int(x) for x in field["shape"])
    pos = np.frombuffer(base64.b64decode(field["pos"], validate=True), "<i4").astype(np.int32)
    rows = np.frombuffer(base64.b64decode(field["rows"], validate=True), "<f4").astype(np.float32)
    if rows_n != n_heads or not 0 <= cols <= n_cells or len(pos) != cols or rows.size != rows_n * cols:
        raise ValueError("attention scores that do not fit the dialogue's cells or the model's heads")
    if np.any(np.diff(pos) <= 0) or int(field["n_rows"]) <= 0:
        raise ValueError("attention scores out of order")
    return HeldScores(pos, rows.reshape(rows_n, cols), int(field["n_rows"]))


def _split_utf8(data: bytes) -> tuple[str, bytes]:
    """Decode what is complete; keep a trailing partial UTF-8 sequence for later."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode(), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode(errors="replace"), b""
