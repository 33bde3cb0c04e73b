"""One model serving chat requests. A scheduler thread owns the llama.cpp context (it is not
thread-safe): it prefills each new request, one per step so that replies in progress keep
going, and decodes the next token of every reply in progress together, one llama_decode for
all of them (Context.decode_batch). Requests beyond the batch wait in line; beyond
`max_queue`, they are refused (503).
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import openai_api
from ..dialogue import Step, render, wants_bos
from ..dialogue_store import DialogueBusy, DialogueStore, Entry
from ..errors import ChatTemplateError, ContextFullError, LoopServeError
from ..openai_api import ChatRequest, LogprobCursor, RequestError, TextRequest
from .metrics import Metrics
from .protocol import ApiError

log = logging.getLogger("loopserve_edge.server")


@dataclass(frozen=True)
class ServeOptions:
    model_name: str
    dialogues_dir: Path
    ram_limit: int = 1 << 30          # bytes of swapped-out KV state kept in RAM
    max_queue: int = 16               # requests waiting beyond the one running; then 503
    max_tokens: int = 512             # a reply's default length
    temperature: float = 0.8          # when the request gives none (llama-server's default)
    top_p: float = 0.95
    top_k: int = 40
    save_idle_s: float = 5.0          # a changed dialogue is saved once idle this long
    reasoning_format: str = "auto"    # a reply's thinking apart from its content (reasoning.py)


@dataclass(eq=False)
class _Job:
    req: ChatRequest
    dialogue_id: str | None
    emit: Callable[[str, list | None], None]
    cancelled: threading.Event
    started: Callable[[str, tuple[int, int]], None] | None
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple | None = None
    error: BaseException | None = None
    # while running
    entry: Entry | None = None
    dlg: object = None
    gen: object = None
    feed: tuple | None = None     # ("send", logits) or ("throw", exception) for the next step
    primed: bool = False          # the reply's generator has run (its cleanup will run)
    waiting: Step | None = None   # its next token, kept while the KV pool has no room for it
    before: int = 0
    pieces: list = field(default_factory=list)
    shown: int = 0                # bytes of the reply emitted
    logprobs: LogprobCursor | None = None
    head: list | None = None      # the prompt's log-probability entries (a text request's echo)


class Engine:
    def __init__(self, llm, opts: ServeOptions):
        self.llm, self.opts = llm, opts
        self.metrics = Metrics()
        self.store = DialogueStore(llm, opts.dialogues_dir, opts.ram_limit)
        self.restored = self.store.restore()
        self._lock = threading.RLock()    # the model: the scheduler's steps, saves, gauges
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._count_lock = threading.Lock()
        self._pending = 0                 # running + waiting
        self._stopping = False
        self.max_batch = llm.config.max_resident
        self.batches = collections.Counter()   # decode steps by batch size
        self.waits = 0                          # replies that waited a step for room
        self._thread = threading.Thread(target=self._loop, name="loopserve-scheduler", daemon=True)
        self._thread.start()

    # -- admission ------------------------------------------------------------------------

    def admit(self) -> None:
        with self._count_lock:
            if self._pending > self.opts.max_queue:
                raise ApiError(503, f"the server is busy ({self._pending} requests in progress or waiting); "
                               "retry shortly", type="server_error", code="server_busy",
                               headers={"Retry-After": "1"})
            self._pending += 1

    def release(self) -> None:
        with self._count_lock:
            self._pending -= 1

    def run(self, req: ChatRequest, dialogue_id: str | None, emit: Callable[[str, list | None], None],
            cancelled: threading.Event, started: Callable[[str, tuple[int, int]], None] | None = None) -> tuple:
        """Run one request (blocking): started(dialogue id, (prompt tokens, tokens of them
        reused)) once the prompt is prefilled,
        emit(text, logprobs) for each piece of the reply as it comes (from the scheduler thread;
        logprobs: OpenAI's entries of the tokens that start in it, None unless the request asked
        for them). Returns (reply, TurnStats, dialogue id, logprobs of the tokens not emitted
        with a piece). Stops early, leaving the dialogue consistent, once cancelled."""
        job = _Job(req, dialogue_id, emit, cancelled, started)
        with self._cv:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            self._waiting.append(job)
            self._cv.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def count_tokens(self, req: ChatRequest) -> int:
        """The tokens of the request's prompt, as a dialogue holding nothing yet prefills it
        (Anthropic's count_tokens)."""
        llm = self.llm
        try:
            text = render(llm.template, req.system, [*req.history, {"role": "user", "content": req.prompt}],
                          req.chat_template_kwargs)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages") from None
        text += req.reply_prefix
        return len(llm.tokenize(text, add_bos=wants_bos(llm, llm.template, text)))

    def stop(self) -> None:
        """Finish the replies in progress (as if their clients went away), refuse the waiting."""
        with self._cv:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cv.notify()
        for job in waiting:
            job.error = ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            job.done.set()
        self._thread.join(timeout=60)

    # -- the scheduler ----------------------------------------------------------------------

    def _loop(self) -> None:
        active: list[_Job] = []
        while True:
            with self._cv:
                if self._stopping:
                    for job in active:
                        job.cancelled.set()
                    if not active:
                        return
                while not active and not self._waiting and not self._stopping:
                    self._cv.wait()
                # one new prefill per step while replies are in progress: they keep going; none
                # while a reply waits for room in the pool (its prefill would push them out)
                job = (self._waiting.popleft() if self._waiting and len(active) < self.max_batch
                       and not any(j.waiting is not None for j in active) else None)
            try:
                if job is not None:
                    with self._lock:
                        self._start(job, active)
                if active:
                    with self._lock:
                        self._step(active)
            except Exception as e:  # noqa: BLE001 (a bug must not stop the server: fail the replies)
                log.exception("scheduler step failed")
                for j in list(active):
                    self._finish(j, active, e)

    def _start(self, job: _Job, active: list[_Job]) -> None:
        """Prefill a request's prompt in its dialogue; it then decodes with the others."""
        try:
            if job.cancelled.is_set():
                raise ApiError(499, "the client went away", code="cancelled")
            req, o = job.req, self.opts
            try:
                sampling = openai_api.sampling(req, max_tokens=o.max_tokens, temperature=o.temperature,
                                                top_p=o.top_p, top_k=o.top_k, n_vocab=self.llm.n_vocab)
                evictor = self.store.evictor(req.loopserve)
                if openai_api.scores_only(req):   # scoring tools' texts: the scoring pass alone
                    text, stats, entries = openai_api.score_text(self.llm, req, sampling)
                    self.metrics.turn(stats, 0)
                    job.result = (text, stats, None, entries)
                    job.done.set()
                    return
                if isinstance(req, TextRequest):
                    if req.scores_prompt:
                        job.head = openai_api.prompt_logprobs(self.llm, req)
                    job.entry, job.dlg = self.store.for_text(req.prompt, evictor)
                else:
                    job.entry, job.dlg = self.store.for_request(req.system, list(req.history), req.prompt,
                                                                job.dialogue_id, evictor)
            except RequestError as e:
                raise ApiError.bad_request(e) from None
            except ContextFullError as e:
                raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from None
            except DialogueBusy as e:
                raise ApiError(409, str(e), code="dialogue_busy") from None
            except LoopServeError as e:
                raise ApiError(400, str(e)) from None
            job.entry.busy = True
            job.before = job.dlg.evicted
            job.logprobs = LogprobCursor(self.llm, job.dlg)
            try:
                job.gen = job.dlg.send_steps(req.prompt, stop=list(req.stop), reply_prefix=req.reply_prefix,
                                             chat_template_kwargs=req.chat_template_kwargs or None,
                                             **sampling)
            except ContextFullError as e:
                raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
            except ChatTemplateError as e:
                raise ApiError(400, str(e), param="messages") from None
            except LoopServeError as e:
                raise ApiError(400, str(e)) from None
        except BaseException as e:  # noqa: BLE001 (answered to its request; the server goes on)
            if job.entry is not None:
                self.store.failed(job.entry)
            if not isinstance(e, ApiError):   # a bug: the operator sees its traceback
                log.error("internal error in a request", exc_info=e)
            job.error = e if isinstance(e, ApiError) else ApiError(500, f"internal error ({type(e).__name__})",
                                                                  type="server_error")
            job.done.set()
            return
        if job.started is not None:
            job.started(job.entry.id, job.dlg.prompt_counts)
        active.append(job)

    def _step(self, active: list[_Job]) -> None:
        """Advance every reply in progress to its next token to decode, then decode them all."""
        steps: list[tuple[_Job, Step]] = []
        for job in list(active):
            if job.waiting is not None and not job.cancelled.is_set():
                steps.append((job, job.waiting))
                job.waiting = None
                continue
            job.waiting = None
            try:
                if job.primed and job.cancelled.is_set():
                    raise GeneratorExit
                feed, job.feed = job.feed, None
                if feed is None:
                    item = next(job.gen)
                elif feed[0] == "send":
                    item = job.gen.send(feed[1])
                else:
                    item = job.gen.throw(feed[1])
                job.primed = True
                while not isinstance(item, Step):
                    job.pieces.append(item)
                    job.shown += len(item.encode())
                    # a whole reply's log-probabilities come with the reply (Engine.run's result)
                    job.emit(item, job.logprobs.take(job.shown) if job.req.stream else None)
                    if job.cancelled.is_set():
                        raise GeneratorExit
                    item = next(job.gen)
                steps.append((job, item))
            except (StopIteration, GeneratorExit):
                self._finish(job, active)
            except BaseException as e:  # noqa: BLE001
                self._finish(job, active, e)
        steps = self._fit(steps)
        if not steps:
            return
        scored = [job.dlg.score_window > 0 for job, _ in steps]   # each reply's own wish
        try:
            logits = self.llm.decode_batch([(job.dlg, st.token, st.pos) for job, st in steps], scored=scored)
        except ContextFullError as e:   # each reply ends as it would alone on a full context
            for job, _ in steps:
                job.feed = ("throw", e)
            return
        except Exception as e:  # noqa: BLE001 (those requests fail; the server goes on)
            for job, _ in steps:
                self._finish(job, active, e)
            return
        self.batches[len(steps)] += 1
        for (job, _), lg in zip(steps, logits):
            job.feed = ("send", lg)

    def _fit(self, steps: list[tuple[_Job, Step]]) -> list[tuple[_Job, Step]]:
        """The steps whose dialogues fit in the KV pool together, the replies that started
        first first (so that each gets to finish and free its cells); the others keep their
        token for a later step. Decoding them all at once would not fit: a batch's dialogues
        must all be resident, and a full pool would end every reply of the batch. On a
        sliding-window model their windows must also fit in its window cache together. The first
        always runs (alone on a full pool it ends as it would alone)."""
        room, fit = self.llm.n_ctx, []
        window_room = self.llm.window_cache_cells
        for job, st in steps:
            need = len(job.dlg.positions) + 1
            window = self.llm.window_need(job.dlg)
            if fit and (need > room or window > window_room):
                job.waiting = st
                self.waits += 1
                continue
            room -= need
            window_room -= window
            fit.append((job, st))
        return fit

    def _finish(self, job: _Job, active: list[_Job], error: BaseException | None = None) -> None:
        active.remove(job)
        job.entry.busy = False
        try:
            job.gen.close()     # ends the turn: the reply so far is the dialogue's last message
            openai_api.answer_only(job.req, job.dlg)
            self.store.updated(job.entry)
        except Exception as e:  # noqa: BLE001
            error = error or e
        if error is not None:
            log.error("internal error in a reply", exc_info=error)
            job.error = ApiError(500, f"internal error ({type(error).__name__}: {error})", type="server_error")
        else:
            self.metrics.turn(job.dlg.last_stats, job.before)
            reply = "".join(job.pieces)
            logprobs = job.logprobs.take(len(reply.encode()))
            if job.head is not None:
                logprobs = openai_api.scored_reply(self.llm, job.head, logprobs, job.dlg)
            job.result = (reply, job.dlg.last_stats, job.entry.id, logprobs)
        job.done.set()

    # -- upkeep --------------------------------------------------------------------------

    def save(self, idle_s: float = 0.0) -> int:
        with self._lock:
            return self.store.save(idle_s)

    def gauges(self) -> dict:
        with self._lock:
            st = self.store.stats()
            used = self.llm.cells_used
            scored = self.llm.score_cache_cells
            events = dict(self.llm.pool_events)
        return {
            "loopserve_kv_cells_used": ("KV cells held by resident dialogues and the last scored text", used),
            "loopserve_kv_cells_scored_text": ("KV cells the last scored text (echo with logprobs) holds for the "
                                               "next one that starts as it does; dropped first for room", scored),
            "loopserve_kv_cells_total": ("KV cells of the pool (n_ctx)", self.llm.n_ctx),
            "loopserve_kv_bytes_allocated": ("bytes allocated for the KV pool", self.llm.kv_bytes),
            "loopserve_dialogues_resident": ("dialogues in the KV pool", st["resident"]),
            "loopserve_dialogues_in_ram": ("dialogues swapped out to RAM", st["in_ram"]),
            "loopserve_dialogues_on_disk": ("dialogues with a state file", st["on_disk"]),
            "loopserve_requests_pending": ("requests running or waiting", self._pending),
            "loopserve_decode_batch_mean": ("mean replies decoded together per step so far",
                                            sum(k * n for k, n in self.batches.items()) /
                                            max(1, sum(self.batches.values()))),
            "loopserve_decode_steps_total": ("decode steps of replies in progress (one llama_decode each)",
                                             sum(self.batches.values()), "counter"),
            "loopserve_decode_step_replies_total": ("replies' tokens decoded in those steps",
                                                    sum(k * n for k, n in self.batches.items()), "counter"),
            "loopserve_kv_swaps_out_total": ("dialogues swapped out of the KV pool to make room",
                                             events.get("swap_out", 0), "counter"),
            "loopserve_kv_scored_text_drops_total": ("times the last scored text's cells were dropped for room",
                                                     events.get("score_cache_drop", 0), "counter"),
            "loopserve_kv_repacks_total": ("KV pool repacks (batch-invariant placement found too few "
                                           "cells at the pool's end)", events.get("repack", 0), "counter"),
            "loopserve_decode_waits_total": ("times a reply in progress waited a step for room in the KV pool",
                                             self.waits, "counter"),
        }

    def saver(self, stop: threading.Event) -> None:
        """Background thread: save dialogues once idle, until stopped."""
        while not stop.wait(min(1.0, self.opts.save_idle_s)):
            self.save(self.opts.save_idle_s)
