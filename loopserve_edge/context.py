"""`Context`: one loaded model and one llama.cpp context holding several KV sequences.

The resident sequence owners (dialogues) share one KV pool of `n_ctx` cells (llama.cpp's
unified KV cache): each holds only the cells its tokens use, so one dialogue costs what it
costs in stock llama.cpp at the same n_ctx, and several small ones fit where one large one
would. When a turn needs more free cells than the pool has, or more than `max_resident`
dialogues want a sequence, the least recently used other dialogue is swapped out to RAM
(its sequence state as bytes) and swapped back in on its next turn, so no history is ever
prefilled twice. Attention masks out the other dialogues' cells, so a dialogue's replies do
not depend on what else is resident beyond the order in which its own cells are summed.

This layer knows tokens, sequences, attention scores, sparse prefill and decoding; it does
not know dialogues. What it keeps per owner is the `Resident` protocol below, so eviction
and dialogues build on it, never the other way round.
"""
from __future__ import annotations

import collections
import ctypes
import functools
import os
import threading
from typing import Iterable, Protocol, Sequence

import numpy as np

from . import bindings, held_scores
from .bindings import llama_c, llama_cpp
from .chat_template import FORMAT_CHOICES, ChatTemplate, resolve_format
from .config import N_KV_PAD, LoopServeConfig
from .errors import ContextFullError, LoopServeError, ModelFileError, StateFileError
from .grammar import Constraint
from .model_file import check_model_file, fingerprint, load_failure
from .sampling import logprobs_rows

DEFAULT_N_CTX = 4096
# rows whose logits one llama_decode of prompt_logprobs keeps (x n_vocab floats: 25 MB at 49K)
SCORE_CHUNK = 128
DEFAULT_N_BATCH = 512    # llama_cpp.Llama's n_batch/n_ubatch defaults
SPARSE_N_BATCH = 2048    # n_batch/n_ubatch default with sparse prefill on
# llama_cpp.Llama always creates a context of its own; it is made this small and closed
# before the pool is created, so loading never holds two full-size KV caches at once
BOOT_N_CTX = 64
# Set (by a SIGINT handler: the CLI's) to stop an input's decode between its llama_decode calls
# with KeyboardInterrupt, its cells taken out again. Python's own handler raises at whichever
# Python code runs next, and during llama_decode that is llama-cpp-python's log callback, a ctypes
# callback, which swallows the exception ("Exception ignored"): the prefill then went on.
interrupt = threading.Event()
# KV cache types by name (ggml type ids, llama_cpp.GGML_TYPE_*); quantized V needs flash attention
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}
# every K/V type llama.cpp's KV cache stores (llama-server's cache types), by ggml type id, for
# llama-cpp-python's type_k / type_v: another id aborts the process in ggml (one past its
# types) or fails the context; V in a quantized type needs flash attention
KV_CACHE_TYPES = {0: "f32", 1: "f16", 30: "bf16", 8: "q8_0", 2: "q4_0", 3: "q4_1", 20: "iq4_nl", 6: "q5_0", 7: "q5_1"}
UNQUANTIZED = (0, 1, 30)


def check_kv_types(kwargs: dict) -> None:
    """Refuse type_k / type_v that llama.cpp's KV cache does not store, and quantized V with
    flash attention off; turn flash attention on for quantized V where it is not given (as
    kv_type_kwargs does). Before: an abort or a "could not load" the model."""
    for key in ("type_k", "type_v"):
        t = kwargs.get(key)
        if t is not None and (isinstance(t, bool) or t not in KV_CACHE_TYPES):
            raise LoopServeError(f"{key}={t!r} is not a type llama.cpp's KV cache stores; choose from "
                                 + ", ".join(f"{i} ({n})" for i, n in KV_CACHE_TYPES.items()))
    t = kwargs.get("type_v")
    if t is not None and t not in UNQUANTIZED:
        if kwargs.get("flash_attn") is False:
            raise LoopServeError(f"a {KV_CACHE_TYPES[t]} V cache (type_v={t}) needs flash attention "
                                 f"(llama.cpp stores quantized V only untransposed)")
        kwargs.setdefault("flash_attn", True)


def kv_type_kwargs(name: str, flash_attn: bool | None = None) -> dict:
    """llama_cpp.Llama kwargs for K and V of this type, and flash attention as asked (None: on
    for quantized V, else llama-cpp-python's default). Quantized V without it is refused."""
    if name not in KV_TYPES:
        raise LoopServeError(f"unknown KV type {name!r}; choose from {', '.join(KV_TYPES)}")
    if name != "f16" and flash_attn is False:
        raise LoopServeError(f"a {name} KV cache needs flash attention (llama.cpp stores quantized V "
                             "only untransposed)")
    kw = {"type_k": KV_TYPES[name], "type_v": KV_TYPES[name]}
    if flash_attn is not None or name != "f16":
        kw["flash_attn"] = True if flash_attn is None else flash_attn
    return kw


class _NoSlot(Exception):
    """llama_decode found no free KV cells."""


class Resident(Protocol):
    """What the context keeps for an owner of KV state: its llama.cpp sequence while
    resident, its sequence state (bytes) while swapped out, and one position per cell."""

    positions: list[int]
    hidden: np.ndarray | None  # rows of its first cells hidden from their heads (set_hidden)
    _seq: int | None
    _swapped: bytes | None
    _held_scores: held_scores.HeldScores | None   # scores kept through a state round trip


def utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as e:   # a lone surrogate (say, from a JSON "\ud800" escape)
        raise LoopServeError(f"the text is not valid Unicode: it holds a lone UTF-16 surrogate "
                             f"(\\u{ord(text[e.start]):04x})") from None


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens a and b share from their start."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _ScoreCache:
    """The last text Context.prompt_logprobs scored, kept in a sequence of its own so that the
    next one goes on from the tokens the two share (scoring tools send a question once per
    answer, the question first; llama-server's prompt cache likewise keeps a slot's last
    prompt). A Resident of no dialogue, and a disposable one: pool pressure drops it rather
    than swap it out (Context._victim), as re-scoring costs no more than the bytes would."""

    disposable = True

    def __init__(self):
        self.positions: list[int] = []
        self.hidden = None
        self._seq = None
        self._swapped = None
        self._held_scores = None
        self.tokens: list[int] = []   # what its cells hold, in position order
        self.entries: list = []       # sampling.logprobs of tokens[1:], each after those before it
        self.top = 0                  # the number of best tokens in each entry

    def reset(self) -> None:
        self.tokens, self.entries, self.positions = [], [], []


class Context:
    def __init__(self, model_path: str | os.PathLike, *, loopserve: LoopServeConfig | None = None,
                 prompt_format: str = "chat", **kwargs):
        """`kwargs` are llama_cpp.Llama's constructor arguments (n_ctx, n_gpu_layers,
        n_threads, flash_attn, type_k, seed, verbose, ...). `prompt_format`: `chat` renders
        dialogues with the model's chat template, `completion` as a plain transcript for
        base models (chat_template.COMPLETION), `auto` the first where the GGUF has a chat
        template, else the second."""
        if prompt_format not in FORMAT_CHOICES:
            raise LoopServeError(f"unknown prompt format {prompt_format!r}; "
                                 f"choose from {', '.join(FORMAT_CHOICES)}")
        self.config = loopserve or LoopServeConfig()
        self.model_path = check_model_file(model_path)
        kwargs.setdefault("verbose", False)
        # sliding-window layers (Gemma 3) get a cache of their window (plus a ubatch) per
        # dialogue, as llama.cpp gives them, not one of n_ctx cells
        kwargs.setdefault("swa_full", False)
        if self.config.granularity == "head" or self.config.batch_invariant:
            # head-wise cuts move rows of V: it must not be stored transposed; batch-invariant
            # attention is flash attention's reference path
            kwargs.setdefault("flash_attn", True)
        check_kv_types(kwargs)
        n_ctx = kwargs.pop("n_ctx", DEFAULT_N_CTX)
        # the sparse path runs per ubatch of >= sparse_min_tokens tokens: with it, prefill in
        # large ubatches unless told otherwise
        n_batch = kwargs.pop("n_batch", SPARSE_N_BATCH if self.config.sparse_prefill else DEFAULT_N_BATCH)
        n_ubatch = kwargs.pop("n_ubatch", n_batch if self.config.sparse_prefill else DEFAULT_N_BATCH)
        if n_ctx < 0 or n_batch < 1 or n_ubatch < 1:
            raise LoopServeError("n_ctx must be >= 0 (0: the model's trained context), n_batch and n_ubatch >= 1")
        try:
            self._llm = llama_cpp.Llama(str(self.model_path), n_ctx=BOOT_N_CTX, n_batch=BOOT_N_CTX,
                                        n_ubatch=BOOT_N_CTX, **kwargs)
        except ValueError as e:
            if "context" in str(e):   # the model loaded; the context of these kwargs did not
                raise LoopServeError(f"llama.cpp could not create a context with these settings ({e})") from None
            raise load_failure(self.model_path, str(e)) from None
        self.verbose = kwargs["verbose"]
        n_ctx = n_ctx or int(llama_c.llama_model_n_ctx_train(self._llm._model.model))
        # llama.cpp pads its pool to N_KV_PAD cells but clamps n_batch to the n_ctx asked, and
        # keeps room for an output per sequence: a batch below max_resident aborts it (n_ctx 1)
        n_ctx = -(-n_ctx // N_KV_PAD) * N_KV_PAD
        self.n_batch = max(min(n_ctx, n_batch), self.config.max_resident)
        try:
            self._ctx = self._pool_context(n_ctx, self.n_batch, min(self.n_batch, n_ubatch))
        except BaseException:
            self._llm.close()
            raise
        self._mem = llama_c.llama_get_memory(self._ctx.ctx)
        self._heads: dict[int, int] | None = None
        self.n_ctx = llama_c.llama_n_ctx(self._ctx.ctx)  # the pool, shared by the residents
        self._batch = llama_c.llama_batch_init(self.n_batch, 0, 1)
        self._vocab = self._llm._model.vocab
        self.n_vocab = llama_c.llama_vocab_n_tokens(self._vocab)
        # each token's text, once asked for: a scored text's entries ask twice a token, and a
        # turn compares the whole cache's text (Dialogue._text_prefix)
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._logits_type = ctypes.c_float * self.n_vocab
        self.metadata: dict[str, str] = dict(self._llm.metadata)
        self.fingerprint = fingerprint(self.model_path, self.metadata)
        self.prompt_format = resolve_format(prompt_format, self.metadata.get("tokenizer.chat_template"))
        self.template = ChatTemplate.for_format(
            self.prompt_format, self.metadata.get("tokenizer.chat_template"),
            bos_token=self._piece(llama_c.llama_vocab_bos(self._vocab)).decode(errors="replace"),
            eos_token=self._piece(llama_c.llama_vocab_eos(self._vocab)).decode(errors="replace"),
            architecture=self.metadata.get("general.architecture"),
        )
        self.add_bos = bool(llama_c.llama_vocab_get_add_bos(self._vocab))
        self.bos_id = int(llama_c.llama_vocab_bos(self._vocab))
        if self.config.sparse_prefill:
            self.set_sparse_prefill(self.config)
        if self.config.batch_invariant:
            if kwargs.get("flash_attn") is False:
                self.close()
                raise LoopServeError("batch_invariant needs flash attention (flash_attn off was asked for)")
            bindings.llama_loopserve_set_batch_invariant(self._ctx.ctx, True)
        if self.config.granularity == "head":
            # with policy full too: a server's requests may each choose a policy that cuts
            self._check_head_wise(kwargs)
        self._saving = False  # saved query rows allocated (set_score_window)
        # seq id -> resident owner, in least-recently-used order (dicts keep order)
        self._resident: dict[int, Resident] = {}
        # what pool pressure cost so far: dialogues swapped out ("swap_out"), repacks ("repack")
        self.pool_events = collections.Counter()
        self._score_cache = _ScoreCache()   # the last text prompt_logprobs scored

    # -- construction ------------------------------------------------------------------

    def _pool_context(self, n_ctx: int, n_batch: int, n_ubatch: int):
        """Replace llama_cpp.Llama's boot context by ours: one KV pool of n_ctx cells shared
        by up to `max_resident` sequences."""
        from llama_cpp import _internals

        params = llama_c.llama_context_params.from_buffer_copy(self._llm.context_params)
        params.n_seq_max = self.config.max_resident
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_ubatch
        params.kv_unified = True
        self._llm._ctx.close()
        try:
            ctx = _internals.LlamaContext(model=self._llm._model, params=params, verbose=self.verbose)
        except ValueError as e:
            raise LoopServeError(f"llama.cpp could not create a context of {n_ctx} cells ({e})") from None
        self._llm._ctx = ctx
        self.context_params = params
        return ctx

    def close(self) -> None:
        if self._batch is not None:
            llama_c.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()
        self._llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tokens ------------------------------------------------------------------------

    def tokenize(self, text: str | bytes, *, add_bos: bool = False) -> list[int]:
        """`text` as str, or as bytes of UTF-8 (utf8())."""
        data = text if isinstance(text, bytes) else utf8(text)
        return self._llm.tokenize(data, add_bos=add_bos, special=True)

    def _piece(self, token: int, special: bool = True) -> bytes:
        key = (token, special)
        got = self._pieces.get(key)
        if got is None:
            buf = ctypes.create_string_buffer(256)
            n = llama_c.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_c.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            got = self._pieces[key] = buf.raw[:n]
        return got

    def detokenize(self, tokens: Iterable[int], special: bool = True) -> str:
        return b"".join(self._piece(t, special) for t in tokens).decode(errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_c.llama_vocab_is_eog(self._vocab, token))

    def grammar(self, gbnf: str) -> Constraint:
        """A reply's state in a GBNF grammar over this model's vocabulary (GrammarError if it
        does not parse)."""
        return Constraint(self._vocab, self.n_vocab, gbnf)

    def context_settings(self) -> dict:
        p = self.context_params
        return {"n_ctx": self.n_ctx, "n_batch": self.n_batch, "type_k": int(p.type_k),
                "type_v": int(p.type_v), "flash_attn_type": int(p.flash_attn_type),
                "prompt_format": self.prompt_format}

    # -- sequences ---------------------------------------------------------------------

    def make_resident(self, dlg: Resident, keep: tuple = ()) -> int:
        """Give `dlg` a sequence (swapping its state in, and others out if the pool or the
        sequences run short, never those in `keep`) and mark it most recently used."""
        if dlg._seq is not None:
            self._resident.pop(dlg._seq)
            self._resident[dlg._seq] = dlg
            return dlg._seq
        if len(self._resident) >= self.config.max_resident:
            lru = self._victim(keep)
            self.swap_out(lru if lru is not None else next(iter(self._resident.values())))
        seq = next(s for s in range(self.config.max_resident) if s not in self._resident)
        # the runtime counts scored rows per sequence: not the last occupant's (score_rows)
        bindings.llama_loopserve_scores_reset(self._ctx.ctx, seq)
        if dlg._swapped:
            # its window cache part may be a whole window whatever a cut kept: room for the most
            self._free_cells(len(dlg.positions), keep=keep, swa_n=1 << 30)
            if self.n_ctx - self.cells_used < len(dlg.positions):  # the others are all kept
                raise ContextFullError(f"the KV pool has no room to bring back a dialogue of "
                                       f"{len(dlg.positions)} cells (n_ctx={self.n_ctx})")
            if self._swa_cache is not None and self._swa_cells() + self.window_need(dlg) > self.window_cache_cells:
                # the others' windows are all kept (a batch decoded together): llama.cpp would
                # reject the state for want of window cells
                raise ContextFullError(f"the sliding-window cache ({self.window_cache_cells} cells) has no room "
                                       f"to bring back a dialogue's window beside the others' "
                                       f"(n_ctx={self.n_ctx}, max_resident={self.config.max_resident})")
            if not self._load_sequence(seq, dlg._swapped):
                self._seq_rm(seq, -1, -1)
                raise StateFileError("llama.cpp rejected the sequence state")
        dlg._swapped = None
        dlg._seq = seq
        self._resident[seq] = dlg
        if getattr(dlg, "hidden", None) is not None:  # a state load shows every row
            self._hide(seq, dlg.hidden)
        self._put_back_scores(dlg)
        return seq

    @property
    def cells_used(self) -> int:
        """Cells of the pool that the resident dialogues (and the last scored text) hold."""
        return sum(self.seq_cells(s) for s in self._resident)

    @property
    def score_cache_cells(self) -> int:
        """Cells that the last text prompt_logprobs scored still holds (a dialogue that needs
        them drops them first)."""
        c = self._score_cache
        return self.seq_cells(c._seq) if c._seq is not None else 0

    def drop_score_cache(self) -> None:
        """Free the last scored text's cells now."""
        self.forget(self._score_cache)
        self._score_cache.reset()

    @property
    def kv_bytes(self) -> int:
        """Bytes allocated for the KV pool (all layers and cache parts, as llama.cpp counts)."""
        return int(bindings.llama_loopserve_kv_bytes(self._ctx.ctx))

    def kv_bytes_used(self, dlg: Resident | None = None) -> int:
        """The pool's bytes in the cells that `dlg` holds (all residents when None), at the
        pool's mean bytes per cell."""
        cells = self.cells_used if dlg is None else (self.seq_cells(dlg._seq) if dlg._seq is not None else 0)
        return self.kv_bytes * cells // self.n_ctx

    def _free_cells(self, n: int, keep: tuple = (), swa_n: int | None = None) -> None:
        """Swap out the least recently used residents but those in `keep` until `n` cells of
        the pool are free (or none is left to swap: the decode then reports a full context),
        and a sliding-window model's window cache has room for `swa_n` (default `n`) of them,
        at most a window and a ubatch; with batch_invariant, also repack the pool when fewer
        than `n` are left at its end."""
        kept = {id(d) for d in keep}
        # (nobody to swap out, the common case of one dialogue: no need to count)
        if not all(id(d) in kept for d in self._resident.values()):
            while self.n_ctx - self.cells_used < n:
                lru = self._victim(keep)
                if lru is None:
                    break
                self.swap_out(lru)
            # a sliding-window model's window cache as well, which holds each resident's window
            # whatever a cut kept, and may be smaller than the pool: the decode needs room there
            # for n tokens, or for its own window and a ubatch once n is larger
            swa = self._swa_cache
            if swa is not None:
                size, most = swa
                while self._swa_cells() + min(n if swa_n is None else swa_n, most) > size:
                    lru = self._victim(keep)
                    if lru is None:
                        break
                    self.swap_out(lru)
        if self.config.batch_invariant and bindings.llama_loopserve_kv_tail(self._ctx.ctx) < n:
            # the last scored text first: often the highest cells in use, dropped it may leave
            # room enough at the pool's end, for nothing, where a repack moves every resident
            victim = self._victim(keep)
            if victim is not None and getattr(victim, "disposable", False):
                self.swap_out(victim)
            if bindings.llama_loopserve_kv_tail(self._ctx.ctx) < n:
                self._repack()

    @functools.cached_property
    def _swa_cache(self) -> tuple[int, int] | None:
        """(cells, a dialogue's most) of the sliding-window layers' cache, None without one:
        llama.cpp sizes it min(n_ctx, window x n_seq_max + n_ubatch), padded to 256 cells
        (llama-kv-cache-iswa.cpp), and a sequence holds at most its window and a ubatch there."""
        n_swa = self._n_swa
        if n_swa <= 0 or not self.sliding_window:
            return None
        n_ubatch = int(self.context_params.n_ubatch)
        size = min(self.n_ctx, n_swa * self.config.max_resident + n_ubatch)
        if self.context_params.swa_full:   # asked for: a window cache as large as the pool
            size = self.n_ctx
        return -(-size // N_KV_PAD) * N_KV_PAD, n_swa + n_ubatch

    @property
    def window_cache_cells(self) -> int:
        """Cells of the sliding-window layers' cache (0 without one)."""
        return self._swa_cache[0] if self._swa_cache is not None else 0

    @functools.cached_property
    def _n_swa(self) -> int:
        return int(llama_c.llama_model_n_swa(self._llm._model.model))

    def _swa_cells(self) -> int:
        """Cells the residents hold in the window cache that new tokens cannot take: each one's
        span of positions there, at most the window its next token sees besides itself
        (llama.cpp gives a new token, or a state it loads, the cells that a sequence's next
        token no longer sees)."""
        total = 0
        for seq in self._resident:
            lo = llama_c.llama_memory_seq_pos_min(self._mem, seq)
            if lo >= 0:
                total += min(llama_c.llama_memory_seq_pos_max(self._mem, seq) - lo + 1, self._n_swa - 1)
        return total

    def window_need(self, dlg: Resident, n: int = 1) -> int:
        """Window cache cells that dlg needs to decode n more tokens: those tokens and the
        positions before them that its next token sees (at most the window less one); 0 without
        a sliding-window cache. The dialogues of a batch decoded together must all fit there at
        once, and a swapped-out one's state brings at most its window (n=1)."""
        if self._swa_cache is None:
            return 0
        last = dlg.positions[-1] if dlg.positions else -1
        return min(self._n_swa - 1, last + 1) + n

    def _repack(self) -> None:
        """Batch-invariant placement (LoopServeConfig.batch_invariant): new tokens go after
        the highest cell in use, so when too few are left there, every resident is moved down
        to the first cells by a state round trip, which keeps each one's cells in order."""
        self.pool_events["repack"] += 1
        # only the residents that hold cells make the round trip: one whose cells are out
        # (compact() of a dialogue, between its removal and its reload) holds its scores
        # already, and reading them again would take its empty cells' for them
        seqs = [seq for seq in self._resident if bindings.llama_loopserve_seq_n_cells(self._ctx.ctx, seq) > 0]
        for seq in seqs:
            self._hold_scores(self._resident[seq])
        states = [(seq, self.sequence_state(seq)) for seq in seqs]
        for seq, _ in states:
            self._seq_rm(seq, -1, -1)
        for seq, state in states:
            if not self._load_sequence(seq, state):
                raise RuntimeError("llama.cpp could not reload a sequence state it had saved")
            if getattr(self._resident[seq], "hidden", None) is not None:
                self._hide(seq, self._resident[seq].hidden)
            self._put_back_scores(self._resident[seq])

    def _load_sequence(self, seq: int, state: bytes) -> bool:
        """Put a sequence_state blob into seq's (empty) sequence; False if llama.cpp refuses it."""
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        return llama_c.llama_state_seq_set_data(self._ctx.ctx, buf, len(state), seq) != 0

    def _victim(self, keep: tuple = ()) -> Resident | None:
        """The resident that gives up its sequence or cells first: a disposable one (the
        scoring cache), else the least recently used; never one in `keep`."""
        kept = {id(d) for d in keep}
        others = [d for d in self._resident.values() if id(d) not in kept]
        return next((d for d in others if getattr(d, "disposable", False)), others[0] if others else None)

    def swap_out(self, dlg: Resident) -> None:
        """Move a resident dialogue's KV state to RAM and free its cells (a disposable
        resident's are dropped)."""
        if dlg._seq is None:
            return
        if getattr(dlg, "disposable", False):
            self.forget(dlg)
            dlg.reset()
            self.pool_events["score_cache_drop"] += 1
            return
        self._hold_scores(dlg)
        dlg._swapped = self.sequence_state(dlg._seq)
        self.pool_events["swap_out"] += 1
        self._seq_rm(dlg._seq, -1, -1)
        del self._resident[dlg._seq]
        dlg._seq = None

    def forget(self, dlg: Resident) -> None:
        """Drop a dialogue's KV state (resident or swapped)."""
        if dlg._seq is not None:
            self._seq_rm(dlg._seq, -1, -1)
            del self._resident[dlg._seq]
            dlg._seq = None
        dlg._swapped = None
        dlg._held_scores = None

    def compact(self, dlg: Resident) -> None:
        """Move a resident dialogue's cells into the pool's first free cells. Attention runs
        over every cell up to the highest one in use, so after a large eviction the holes
        would still cost time; a state round trip packs the kept cells together."""
        if dlg._seq is not None:
            self._hold_scores(dlg)
            self.restore(dlg, self.sequence_state(dlg._seq), scores=True)

    def restore(self, dlg: Resident, state: bytes, scores: bool = False) -> None:
        """Put dlg's sequence back to a state taken by sequence_state (undo of a failed turn),
        with no scores; `scores`: the same cells back, keeping the scores held for them."""
        if not scores:
            dlg._held_scores = None
        seq = self.make_resident(dlg)
        self._seq_rm(seq, -1, -1)
        self._free_cells(len(dlg.positions), keep=(dlg,))
        if not self._load_sequence(seq, state):
            raise RuntimeError("llama.cpp could not reload a sequence state it had saved")
        if getattr(dlg, "hidden", None) is not None:
            self._hide(seq, dlg.hidden)
        self._put_back_scores(dlg)

    def sequence_state_size(self, seq: int) -> int:
        """Bytes of sequence_state(seq), counted without copying the cells."""
        return int(llama_c.llama_state_seq_get_size(self._ctx.ctx, seq))

    def sequence_state(self, seq: int) -> bytes:
        size = llama_c.llama_state_seq_get_size(self._ctx.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama_c.llama_state_seq_get_data(self._ctx.ctx, buf, size, seq)
        return bytes(buf)[:n]

    def _seq_rm(self, seq: int, p0: int, p1: int) -> None:
        """llama_memory_seq_rm, after the saved query rows are scored against the cells they
        attended to (llama_loopserve_scores_save_queries)."""
        bindings.llama_loopserve_scores_flush(self._ctx.ctx)
        llama_c.llama_memory_seq_rm(self._mem, seq, p0, p1)

    def seq_cells(self, seq: int) -> int:
        return bindings.llama_loopserve_seq_n_cells(self._ctx.ctx, seq)

    def kv_n_kv(self) -> int:
        """The cells the last decode attended over (llama.cpp's n_kv: the cells in use padded to
        256, held through cuts that would shrink it by one such step; llama_loopserve_kv_n_kv)."""
        return bindings.llama_loopserve_kv_n_kv(self._ctx.ctx)

    # -- attention scores ----------------------------------------------------------------

    def set_score_window(self, n_window: int) -> None:
        """From the next decode on, score the cache with the attention of the last
        `n_window` tokens of every decode (one generated token: that token); 0 turns it
        off. Scores accumulate per KV cell until reset_scores (see llama-loopserve.h)."""
        if bindings.llama_loopserve_scores_set(self._ctx.ctx, int(n_window)) != 0:
            raise LoopServeError(f"this model/context cannot be scored (window {n_window}): "
                                 "it needs a decoder-only model with a KV cache")
        if n_window > 0 and not self._saving and self.config.saved_queries:
            # room for an input's window and a deferred cut's rows (more flush early); the
            # runtime saves only with flash attention, else each scored decode scores itself
            if bindings.llama_loopserve_scores_save_queries(self._ctx.ctx, self.saved_room) != 0:
                raise LoopServeError("could not allocate device memory for the saved query rows "
                                     "(LoopServeConfig.saved_queries=False scores as it decodes)")
            self._saving = True

    @property
    def score_window(self) -> int:
        return bindings.llama_loopserve_scores_window(self._ctx.ctx)

    def reset_scores(self, dlg: Resident | None = None) -> None:
        """Zero the scores of dlg's cells (all resident dialogues when None)."""
        if dlg is None:
            bindings.llama_loopserve_scores_reset(self._ctx.ctx, -1)
            for d in self._resident.values():
                d._held_scores = None
            return
        dlg._held_scores = None
        if dlg._seq is not None:
            bindings.llama_loopserve_scores_reset(self._ctx.ctx, dlg._seq)

    def score_rows(self, dlg: Resident) -> int:
        """Query rows accumulated into dlg's scores since the last reset (held while it is out)."""
        if dlg._seq is None:
            return dlg._held_scores.n_rows if dlg._held_scores is not None else 0
        return int(bindings.llama_loopserve_scores_n_rows(self._ctx.ctx, dlg._seq))

    def scores_to_hold(self, dlg: Resident) -> held_scores.HeldScores | None:
        """dlg's scores as a state round trip keeps them (held_scores): read from the runtime
        while it is resident (held scores are put back when it comes in); those held while it is
        out; None when it has none. Also what its state file keeps."""
        if dlg._seq is None:
            return dlg._held_scores
        bindings.llama_loopserve_scores_flush(self._ctx.ctx)   # rows saved, not yet counted
        n_rows = self.score_rows(dlg)
        if n_rows == 0:
            return None
        pos, rows = self.attention_scores_by_head(dlg)
        return held_scores.HeldScores(pos, rows, n_rows)

    def _hold_scores(self, dlg: Resident) -> None:
        """Before a state round trip of dlg's cells, which starts them with no scores in the
        runtime: keep the scores read so far on the dialogue."""
        if dlg._seq is not None:
            dlg._held_scores = self.scores_to_hold(dlg)

    def _put_back_scores(self, dlg: Resident) -> None:
        """After a state round trip of dlg's cells (which starts them with no scores in the
        runtime), its held scores go back into the runtime with its count of rows, so that its
        sums go on from the same floats as without the round trip. (Added to the runtime's at
        each read instead, the order of the additions changed: on a busy server, where dialogues
        are swapped out and back, a cut could rank a near-tie the other way than for the same
        dialogue alone; benchmarks/results/serve/replay-s50/.)"""
        held = dlg._held_scores
        if held is None or dlg._seq is None:
            return
        pos = self._score_positions(dlg)
        rows = np.zeros((sum(self._scored_heads().values()), len(pos)), np.float32)
        held_scores.add_to(held, pos, rows)
        got = bindings.llama_loopserve_scores_set_heads(self._ctx.ctx, dlg._seq, rows.ctypes.data_as(bindings._f32p),
                                                        len(pos), held.n_rows)
        if got != len(pos):
            raise RuntimeError(f"llama_loopserve_scores_set_heads returned {got}, expected {len(pos)}")
        dlg._held_scores = None

    @property
    def saved_room(self) -> int:
        """How many query rows the runtime keeps before it scores them (saved_queries):
        room for an input's window and a deferred cut's rows; more flush early."""
        cfg = self.config
        return max(64, cfg.prefill_window + cfg.defer_cut + cfg.window)

    @property
    def saved_rows(self) -> int:
        """Query rows saved by scored decodes and not yet scored (LoopServeConfig.saved_queries;
        any read of the scores scores them)."""
        return bindings.llama_loopserve_scores_n_saved(self._ctx.ctx)

    def attention_scores(self, dlg: Resident) -> tuple[np.ndarray, np.ndarray]:
        """(positions, scores) of dlg's cells in position order; a score is the attention
        mass summed over window rows, scored layers and all query heads. Empty when dlg is
        not resident (its scores are held until it is back)."""
        if dlg._seq is None:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        n = self.seq_cells(dlg._seq)
        pos, sc = np.zeros(n, np.int32), np.zeros(n, np.float32)
        got = bindings.llama_loopserve_scores_get(
            self._ctx.ctx, dlg._seq, pos.ctypes.data_as(bindings._i32p),
            sc.ctypes.data_as(bindings._f32p), n)
        if got != n:
            raise RuntimeError(f"llama_loopserve_scores_get returned {got}, expected {n}")
        return pos, sc

    def cell_positions(self, dlg: Resident) -> list[int]:
        """The positions of dlg's cells in the full-attention cache, in order."""
        self.make_resident(dlg)
        return self._score_positions(dlg).tolist()

    def _score_positions(self, dlg: Resident) -> np.ndarray:
        pos = np.zeros(self.seq_cells(dlg._seq), np.int32)
        got = bindings.llama_loopserve_scores_get(
            self._ctx.ctx, dlg._seq, pos.ctypes.data_as(bindings._i32p), None, len(pos))
        if got != len(pos):
            raise RuntimeError(f"llama_loopserve_scores_get returned {got}, expected {len(pos)}")
        return pos

    def _scored_heads(self) -> dict[int, int]:
        """{layer: KV heads} of the scored layers (all but sliding-window ones)."""
        if self._heads is None:
            n_layer = llama_c.llama_model_n_layer(self._llm._model.model)
            heads = {il: bindings.llama_loopserve_scores_n_head_kv(self._ctx.ctx, il) for il in range(n_layer)}
            self._heads = {il: h for il, h in heads.items() if h > 0}
        return self._heads

    def attention_scores_by_head(self, dlg: Resident) -> tuple[np.ndarray, np.ndarray]:
        """(positions, scores [n_heads, n_cells]): one row per KV head of every scored
        layer in layer order, each summed over its query heads and the window rows."""
        n_heads = sum(self._scored_heads().values())
        if dlg._seq is None:
            return np.zeros(0, np.int32), np.zeros((n_heads, 0), np.float32)
        pos = self._score_positions(dlg)
        rows = np.zeros((n_heads, len(pos)), np.float32)
        got = bindings.llama_loopserve_scores_get_heads(
            self._ctx.ctx, dlg._seq, rows.ctypes.data_as(bindings._f32p), rows.size)
        if got != len(pos):
            raise RuntimeError(f"llama_loopserve_scores_get_heads returned {got}, expected {len(pos)}")
        return pos, rows

    def value_norms(self, dlg: Resident) -> np.ndarray:
        """[n_heads, n_cells]: the L2 norm of each scored KV head's V row at dlg's cells, in
        the layout of attention_scores_by_head."""
        n_heads = sum(self._scored_heads().values())
        if dlg._seq is None:
            return np.zeros((n_heads, 0), np.float32)
        n = bindings.llama_loopserve_value_norms(self._ctx.ctx, dlg._seq, None, 0)
        out = np.zeros((n_heads, max(n, 0)), np.float32)
        got = bindings.llama_loopserve_value_norms(self._ctx.ctx, dlg._seq, out.ctypes.data_as(bindings._f32p), out.size)
        if got == -2:
            raise LoopServeError("value norms need V stored untransposed (flash attention on) in a "
                                 "type with a dequantizer")
        if got != out.shape[1]:
            raise RuntimeError(f"llama_loopserve_value_norms returned {got}, expected {out.shape[1]}")
        return out

    def attention_scores_by_layer(self, dlg: Resident) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """(positions, {layer: scores [n_head_kv, n_cells]}) for the scored layers, read
        layer by layer (llama_loopserve_scores_get_layer)."""
        out: dict[int, np.ndarray] = {}
        if dlg._seq is None:
            return np.zeros(0, np.int32), out
        pos = self._score_positions(dlg)
        for il, h in self._scored_heads().items():
            buf = np.zeros((h, len(pos)), np.float32)
            got = bindings.llama_loopserve_scores_get_layer(
                self._ctx.ctx, dlg._seq, il, buf.ctypes.data_as(bindings._f32p), len(pos))
            if got != len(pos):
                raise RuntimeError(f"llama_loopserve_scores_get_layer returned {got}, expected {len(pos)}")
            out[il] = buf
        return pos, out

    # -- sparse prefill ------------------------------------------------------------------

    def set_sparse_prefill(self, cfg: LoopServeConfig | None) -> None:
        """Enable the adaptive sparse prefill with cfg's prefill fields (None or
        cfg.sparse_prefill False: the stock path). See include/llama-loopserve.h."""
        if cfg is None or not cfg.sparse_prefill:
            bindings.llama_loopserve_prefill_set(self._ctx.ctx, None)
            return
        p = bindings.llama_loopserve_prefill_default_params()
        p.alpha, p.last_q = cfg.alpha, cfg.last_q
        p.n_min_vertical, p.n_max_vertical = cfg.min_vertical, cfg.max_vertical or 0
        p.n_min_slash, p.n_max_slash = cfg.min_slash, cfg.max_slash or 0
        p.n_sink, p.n_local = cfg.prefill_sink, cfg.local_window
        p.n_min_tokens, p.block_q = cfg.sparse_min_tokens, cfg.prefill_block or 0
        p.reuse = cfg.prefill_reuse
        rc = bindings.llama_loopserve_prefill_set(self._ctx.ctx, ctypes.byref(p))
        if rc == -2:
            raise LoopServeError("sparse prefill needs a KV cache of type f16, q8_0 or f32 "
                                 "(type_k/type_v); see the log for the types in use")
        if rc != 0:
            raise LoopServeError("sparse prefill cannot run on this model/context "
                                 "(it needs a decoder-only model with a KV cache)")

    def set_prefill_profile(self, on: bool) -> None:
        """Time estimation vs attention of the sparse path (runs the graph in pieces,
        slower; for measurements)."""
        if bindings.llama_loopserve_prefill_set_profile(self._ctx.ctx, bool(on)) != 0:
            raise LoopServeError("prefill profiling needs sparse prefill enabled and no eval callback")

    def prefill_stats(self) -> dict:
        """What the sparse prefill did in the last multi-token decode call: ubatches
        that ran sparse / kept the stock path, their tokens, the density (share of the
        causal attention matrix computed, in KV cells) overall and per layer (None for
        layers that ran stock), and times in ms (estimate/attend only in profile mode)."""
        s = bindings.llama_loopserve_prefill_stats()
        enabled = bindings.llama_loopserve_prefill_stats_get(self._ctx.ctx, ctypes.byref(s))
        n_layer = bindings.llama_loopserve_prefill_layer_pairs(self._ctx.ctx, None, None, 0)
        comp = (ctypes.c_double * n_layer)()
        caus = (ctypes.c_double * n_layer)()
        bindings.llama_loopserve_prefill_layer_pairs(self._ctx.ctx, comp, caus, n_layer)
        return {
            "enabled": bool(enabled),
            "n_ubatch_sparse": s.n_ubatch_sparse, "n_ubatch_stock": s.n_ubatch_stock,
            # sparse ubatches whose mask was causal in cells: on the GPU they ran without it
            "n_ubatch_cell_causal": s.n_ubatch_cell_causal,
            # sparse ubatches that attended over the previous ubatch's selection (prefill_reuse)
            "n_ubatch_reused": s.n_ubatch_reused,
            # their layers estimated on a GPU by stock ops, not the fused one (K not f16, a head dim
            # not 64/128/256, a GPU before sm_80, or more shared memory than a block gets)
            "n_layer_est_chain": s.n_layer_est_chain,
            "n_tokens_sparse": s.n_tokens_sparse,
            "density": s.density if s.n_ubatch_sparse else None,
            "layer_density": [c / d if d > 0 else None for c, d in zip(comp, caus)],
            "t_sparse_ms": s.t_sparse_ms, "t_estimate_ms": s.t_estimate_ms, "t_select_ms": s.t_select_ms,
            "t_attend_ms": s.t_attend_ms,
        }

    # -- decoding ----------------------------------------------------------------------

    def remove_positions(self, seq: int, p0: int, p1: int = -1) -> None:
        self._seq_rm(seq, p0, p1)

    @property
    def can_shift(self) -> bool:
        """Whether cells can be given new positions (keys re-rotated): RoPE models can."""
        return bool(llama_c.llama_memory_can_shift(self._mem))

    @property
    def can_compact(self) -> bool:
        """Whether cells can be given new positions by compact_positions: RoPE models can, and
        Gemma 3 with its window-sized window cache too (which llama.cpp shifts no other way)."""
        return bool(bindings.llama_loopserve_can_compact_positions(self._ctx.ctx))

    @property
    def n_ctx_train(self) -> int:
        return int(llama_c.llama_model_n_ctx_train(self._llm._model.model))

    def compact_positions(self, dlg: Resident, p0: int = 0) -> int:
        """Give dlg's cells, in position order, the positions p0, p0 + 1, ... with their keys
        re-rotated (llama_loopserve_seq_compact_positions); returns the cells that moved. On a
        sliding-window model the window's positions are ranked with them, so the new positions
        can have gaps (`cell_positions` reads them)."""
        seq = self.make_resident(dlg)
        rc = bindings.llama_loopserve_seq_compact_positions(self._ctx.ctx, seq, p0)
        if rc == -2:
            raise LoopServeError("this model's position encoding cannot be shifted, so the "
                                 "positions an eviction frees cannot be reused")
        if rc < 0:
            raise RuntimeError(f"llama_loopserve_seq_compact_positions failed ({rc})")
        return rc

    def can_truncate(self, dlg: Resident, p: int) -> bool:
        """Whether dlg's cells from position p on can be dropped and new tokens computed from
        there: a window-sized sliding-window cache (llama.cpp drops the cells that fell out of
        the window) must still hold every kept position within the window before p."""
        n_swa = self._n_swa
        if not n_swa or not self.sliding_window or not dlg.positions:
            return True
        self.make_resident(dlg)
        lo = int(llama_c.llama_memory_seq_pos_min(self._mem, dlg._seq))  # of the window cache
        need = [q for q in dlg.positions if p - n_swa < q < p]
        return not need or lo <= need[0]

    @property
    def sliding_window(self) -> bool:
        """Whether some layers attend through a sliding window (not scored; Gemma 3)."""
        return len(self._scored_heads()) != llama_c.llama_model_n_layer(self._llm._model.model)

    def _check_head_wise(self, kwargs: dict) -> None:
        """Refuse, at construction, what head-wise cuts cannot do (llama_loopserve_seq_keep_per_head)."""
        why = None
        if not {int(self.context_params.type_k), int(self.context_params.type_v)} <= {1, 2, 8}:
            why = "a KV cache other than f16, q8_0 or q4_0 (type_k/type_v)"
        elif kwargs.get("flash_attn") is False:
            why = "flash attention off (V is then stored transposed)"
        if why:
            raise LoopServeError(f"granularity='head' cannot run with {why}; use granularity='cell'")

    def keep_per_head(self, dlg: Resident, sel: np.ndarray) -> int:
        """Keep, in each scored layer and KV head, its own cells of dlg: sel [n_heads, n_keep],
        each row ascending indices into dlg's cells in position order (the columns of
        attention_scores_by_head). Returns the number of cells freed."""
        seq = self.make_resident(dlg)
        sel = np.ascontiguousarray(sel, dtype=np.int32)
        rc = bindings.llama_loopserve_seq_keep_per_head(self._ctx.ctx, seq, sel.ctypes.data_as(bindings._i32p),
                                                        sel.shape[1])
        if rc == -2:
            raise LoopServeError("head-wise cuts need f16, q8_0 or q4_0 K/V and flash attention")
        if rc < 0:
            raise RuntimeError(f"llama_loopserve_seq_keep_per_head failed ({rc})")
        return rc

    def layer_heads(self) -> list[int]:
        """KV heads of each scored layer, in layer order (the rows of attention_scores_by_head)."""
        return list(self._scored_heads().values())

    def set_hidden(self, dlg: Resident, hidden: np.ndarray | None) -> None:
        """Hide, in each scored KV head, the rows of dlg's first hidden.shape[1] cells where
        hidden [n_heads, K] is 1 from that head's attention (a cut's allocation); None shows
        every row. Kept on the dialogue: a state load shows every row, so it is applied again."""
        dlg.hidden = hidden
        self._hide(self.make_resident(dlg), hidden)

    def _hide(self, seq: int, hidden: np.ndarray | None) -> None:
        if hidden is None:
            bindings.llama_loopserve_seq_hide(self._ctx.ctx, seq, None, 0, 0)
            return
        n = min(hidden.shape[1], self.seq_cells(seq))
        h = np.ascontiguousarray(hidden[:, :n], dtype=np.uint8)
        rc = bindings.llama_loopserve_seq_hide(self._ctx.ctx, seq, h.ctypes.data_as(bindings._u8p), h.shape[0], n)
        if rc == -2:
            raise LoopServeError("a non-uniform allocation needs flash attention and one KV stream")
        if rc < 0:
            raise RuntimeError(f"llama_loopserve_seq_hide failed ({rc})")

    def hidden_rows(self, dlg: Resident) -> np.ndarray:
        """[n_heads, n_cells] uint8: the rows of dlg's cells (position order) hidden from their
        head, as the runtime holds them."""
        seq = self.make_resident(dlg)
        n_heads = sum(self._scored_heads().values())
        out = np.zeros((n_heads, self.seq_cells(seq)), np.uint8)
        got = bindings.llama_loopserve_seq_hidden(self._ctx.ctx, seq, out.ctypes.data_as(bindings._u8p), out.size)
        if got != out.shape[1]:
            raise RuntimeError(f"llama_loopserve_seq_hidden returned {got}, expected {out.shape[1]}")
        return out

    def remove_cells(self, seq: int, positions: np.ndarray) -> None:
        """Remove the cells of seq at these positions, in one pass over its cells."""
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        got = bindings.llama_loopserve_seq_rm_positions(
            self._ctx.ctx, seq, pos.ctypes.data_as(bindings._i32p), len(pos))
        if got != len(pos):
            raise RuntimeError(f"llama_loopserve_seq_rm_positions removed {got} of {len(pos)} cells")

    def decode(self, dlg: Resident, tokens: list[int], positions: list[int]) -> np.ndarray:
        """Append tokens at positions to dlg's sequence; returns the logits of the last.
        On a full context nothing is kept and ContextFullError is raised."""
        seq = self.make_resident(dlg)
        self._free_cells(len(tokens), keep=(dlg,))
        if len(tokens) > 1:
            bindings.llama_loopserve_prefill_stats_reset(self._ctx.ctx)  # stats are per prefill call
        starts = list(range(0, len(tokens), self.n_batch))
        # llama.cpp scores the last `window` tokens of every llama_decode call: a prompt of
        # several batches must be scored by its own last tokens only, not also by the last
        # tokens of each batch (arbitrary places in the middle of the text). So the batches
        # before the last are decoded unscored, and the last one holds the whole window.
        window = self.score_window if len(starts) > 1 else 0
        if window:
            starts[-1] = min(starts[-1], len(tokens) - min(window, self.n_batch))
        try:
            for k, i in enumerate(starts):
                if interrupt.is_set():
                    interrupt.clear()
                    raise KeyboardInterrupt
                j = starts[k + 1] if k + 1 < len(starts) else len(tokens)
                if window:
                    self.set_score_window(window if j == len(tokens) else 0)
                self._decode_chunk(seq, tokens[i:j], positions[i:j], last=j == len(tokens))
        except _NoSlot:
            self.remove_positions(seq, positions[0])
            raise ContextFullError(f"the KV cache has no room for {len(tokens)} more tokens "
                                   f"(n_ctx={self.n_ctx})") from None
        except BaseException:
            self.remove_positions(seq, positions[0])
            raise
        finally:
            if window:
                self.set_score_window(window)
        return self._logits(-1)

    def prompt_logprobs(self, tokens: list[int], top: int) -> tuple[list[tuple[int, float, tuple]], np.ndarray, int]:
        """For each of tokens[1:], (the token, its log-probability after the tokens before it,
        the `top` most likely tokens there with theirs), as sampling.logprobs gives a reply's,
        the logits after the last token and how many tokens' cells were reused (below):
        a text's own log-probabilities (OpenAI's legacy `echo` with `logprobs`, which scoring
        tools read). One pass over the tokens in a sequence of their own (_ScoreCache), with
        every row's logits, in chunks of at most SCORE_CHUNK rows (the logits buffer holds a
        chunk's rows of n_vocab floats); the dialogues' cells and scores stay as they were (a
        full pool raises ContextFullError). That sequence keeps the text until the next call,
        which decodes only from the first token the two texts do not share (one token before
        it, for the logits there) and takes the entries before it as they were; pool pressure
        drops it."""
        cache = self._score_cache
        if cache._seq is None or cache.top != top:   # no cells, or entries of another number of best tokens
            cache.reset()
        seq = self.make_resident(cache)
        # the cells kept; decoding from `keep` gives the logits there
        keep = max(0, common_prefix(cache.tokens, tokens) - 1)
        self._seq_rm(seq, keep, -1)
        out = cache.entries[:keep]
        cache.tokens, cache.entries, cache.positions, cache.top = tokens[:keep], out, list(range(keep)), top
        window = self.score_window
        try:
            self._free_cells(len(tokens) - keep, keep=(cache,))
            if window:
                self.set_score_window(0)   # nothing here is to be scored
            step = min(self.n_batch, SCORE_CHUNK)
            for i in range(keep, len(tokens), step):
                part = tokens[i:i + step]
                try:
                    self._decode_chunk(seq, part, list(range(i, i + len(part))), last=True, every=True)
                except _NoSlot:
                    raise ContextFullError(f"the KV cache has no room for a text of {len(tokens)} tokens "
                                           f"(n_ctx={self.n_ctx})") from None
                rows = self._logits_rows(len(part))
                nxt = tokens[i + 1:i + 1 + len(part)]   # the token each row scores (the text's last: none)
                out += logprobs_rows(rows[:len(nxt)], nxt, top, threads=self._llm.n_threads_batch)
            last = rows[-1].copy()
        except BaseException:
            self.drop_score_cache()
            raise
        finally:
            if window:
                self.set_score_window(window)
        cache.tokens, cache.positions = list(tokens), list(range(len(tokens)))
        return list(out), last, keep

    def _logits_rows(self, n: int) -> np.ndarray:
        """The logits of the last decode's n output rows (every row of it an output), as one
        (n, n_vocab) array: a view of llama.cpp's buffer, valid until the next decode."""
        first = llama_c.llama_get_logits_ith(self._ctx.ctx, 0)
        last = llama_c.llama_get_logits_ith(self._ctx.ctx, n - 1)
        base = ctypes.addressof(first.contents)
        if ctypes.addressof(last.contents) != base + 4 * (n - 1) * self.n_vocab:   # rows not in batch order
            return np.stack([self._logits(j) for j in range(n)])
        return np.frombuffer((ctypes.c_float * (n * self.n_vocab)).from_address(base),
                             dtype=np.float32).reshape(n, self.n_vocab)

    def _logits(self, i: int) -> np.ndarray:
        """A copy of the logits of output row i (-1: the last); np.frombuffer over a cached
        ctypes array type costs half of np.ctypeslib.as_array's per-call type building."""
        ptr = llama_c.llama_get_logits_ith(self._ctx.ctx, i)
        return np.frombuffer(self._logits_type.from_address(ctypes.addressof(ptr.contents)), dtype=np.float32).copy()

    def decode_batch(self, steps: list[tuple[Resident, int, int]],
                     scored: bool | Sequence[bool] = False) -> list[np.ndarray]:
        """Decode one token in each of several dialogues in one llama_decode: steps are
        (dialogue, token, position), at most one per dialogue and at most max_resident. Returns
        each token's logits. `scored`: which steps score their own dialogue's cells (a row
        attends to its own sequence only), one flag per step or one for all. A full pool raises
        ContextFullError and keeps none of the tokens."""
        if len(steps) > self.config.max_resident or len({id(d) for d, _, _ in steps}) != len(steps):
            raise ValueError("one step per dialogue, at most max_resident of them")
        if len(steps) > self.n_batch:
            raise ValueError(f"at most n_batch={self.n_batch} steps")
        flags = [bool(scored)] * len(steps) if np.ndim(scored) == 0 else [bool(s) for s in scored]
        if len(flags) != len(steps):
            raise ValueError(f"{len(flags)} scored flags for {len(steps)} steps")
        # a dialogue of the batch swapped in makes room by swapping out others, never one of
        # the batch (its sequence is already in the batch)
        batch = tuple(d for d, _, _ in steps)
        if self._swa_cache is not None and sum(self.window_need(d) for d in batch) > self.window_cache_cells:
            # refused before any is swapped in: each one's window must be there at once
            raise ContextFullError(f"the sliding-window cache ({self.window_cache_cells} cells) cannot hold the "
                                   f"windows of {len(batch)} dialogues decoded together (n_ctx={self.n_ctx})")
        seqs = [self.make_resident(d, keep=batch) for d in batch]
        self._free_cells(len(steps), keep=batch)
        # the runtime scores a batch's last rows, so the scored steps go last: a dialogue whose
        # step is not scored (LoopServe between its windows, the rest of a defer_scored wait)
        # gets nothing from the others' scored steps, which a later cut or H2O's history would
        # count, and its scores are those it would have alone (a row's logits do not depend on
        # its place in the batch)
        order = sorted(range(len(steps)), key=flags.__getitem__)
        window = self.score_window
        self.set_score_window(sum(flags))
        b = self._batch
        n = b.n_tokens = len(steps)
        for row, i in enumerate(order):
            _, tok, pos = steps[i]
            b.token[row], b.pos[row], b.n_seq_id[row], b.logits[row] = tok, pos, 1, 1
            b.seq_id[row][0] = seqs[i]
        try:
            rc = llama_c.llama_decode(self._ctx.ctx, b)
        finally:
            self.set_score_window(window)
        if rc == 1:
            raise ContextFullError(f"the KV pool has no room for {n} more tokens (n_ctx={self.n_ctx})")
        if rc != 0:
            for (_, _, pos), seq in zip(steps, seqs):
                self.remove_positions(seq, pos)
            raise RuntimeError(f"llama_decode failed ({rc})")
        logits = [None] * n
        for row, i in enumerate(order):
            logits[i] = self._logits(row)
        return logits

    def _decode_chunk(self, seq: int, tokens: list[int], positions: list[int], last: bool,
                      every: bool = False) -> None:
        """llama_decode of tokens at positions in seq, with the logits of the last row (`last`)
        or of every row (`every`)."""
        b = self._batch
        n = len(tokens)
        b.n_tokens = n
        if n == 1:
            # a decode step: numpy's conversions cost ~7 us of the ~1.4 ms a 1B-shape step
            # takes on the GPU, where the controller's per-step host time shows
            b.token[0], b.pos[0], b.n_seq_id[0], b.logits[0] = tokens[0], positions[0], 1, int(last)
            b.seq_id[0][0] = seq
        else:
            tok = np.asarray(tokens, dtype=np.int32)  # held: memmove reads it after this line
            pos = np.asarray(positions, dtype=np.int32)
            ctypes.memmove(b.token, tok.ctypes.data, 4 * n)
            ctypes.memmove(b.pos, pos.ctypes.data, 4 * n)
            ctypes.memset(b.logits, int(every), n)
            for i in range(n):
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
            if last:
                b.logits[n - 1] = 1
        rc = llama_c.llama_decode(self._ctx.ctx, b)
        if rc == 1:
            raise _NoSlot()
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")

