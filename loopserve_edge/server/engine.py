"""One model serving chat requests: each request runs in a worker thread, one at a time on the
llama.cpp context (it is not thread-safe), with a bounded number waiting.

Requests are served in turn, not decoded together in one batch: several sequences per
llama_decode (issue 17) is not done yet.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import LoopServeConfig
from ..errors import ContextFullError, LoopServeError
from ..eviction import Evictor
from . import protocol
from .metrics import Metrics
from .protocol import ApiError, ChatRequest
from .store import DialogueStore


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


class Busy(Exception):
    pass


class Engine:
    def __init__(self, llm, opts: ServeOptions):
        self.llm, self.opts = llm, opts
        self.metrics = Metrics()
        self.store = DialogueStore(llm, opts.dialogues_dir, opts.ram_limit)
        self.restored = self.store.restore()
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._pending = 0                 # running + waiting
        self._evictors: dict[LoopServeConfig, Evictor] = {llm.config: llm.evictor}

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

    # -- a completion ---------------------------------------------------------------------

    def _evictor(self, req: ChatRequest) -> Evictor:
        cfg = protocol.merged_config(self.llm.config, req.loopserve)
        if (cfg.sparse_prefill, cfg.granularity) != (self.llm.config.sparse_prefill, self.llm.config.granularity):
            raise ApiError(400, "sparse_prefill and granularity are set when the server starts "
                           "(--sparse-prefill, --granularity), not per request", param="loopserve")
        if cfg not in self._evictors:
            self._evictors[cfg] = Evictor(self.llm, cfg)
        return self._evictors[cfg]

    def run(self, req: ChatRequest, dialogue_id: str | None, emit: Callable[[str], None],
            cancelled: threading.Event, started: Callable[[str], None] | None = None) -> tuple[str, object, str]:
        """Run one request: started(dialogue id) once the prompt is prefilled, emit(text) for each
        piece of the reply as it comes. Returns (reply, TurnStats, dialogue id). Stops early,
        leaving the dialogue consistent, once cancelled."""
        with self._lock:
            if cancelled.is_set():
                raise ApiError(499, "the client went away", code="cancelled")
            evictor = self._evictor(req)
            e, d = self.store.for_request(req.system, list(req.history), req.prompt, dialogue_id, evictor)
            before = d.evicted
            o = self.opts
            sampling = dict(max_tokens=req.max_tokens or o.max_tokens,
                            temperature=o.temperature if req.temperature is None else req.temperature,
                            top_p=o.top_p if req.top_p is None else req.top_p,
                            top_k=o.top_k if req.top_k is None else req.top_k, seed=req.seed)
            try:
                gen = d.send(req.prompt, stream=True, stop=list(req.stop), **sampling)
            except ContextFullError as err:
                raise ApiError(400, str(err), param="messages", code="context_length_exceeded") from None
            except LoopServeError as err:
                raise ApiError(400, str(err)) from None
            pieces = []
            if started is not None:
                started(e.id)
            try:
                for piece in gen:
                    pieces.append(piece)
                    emit(piece)
                    if cancelled.is_set():
                        break
            finally:
                gen.close()   # ends the turn: the reply so far is the dialogue's last message
                self.store.updated(e)
            self.metrics.turn(d.last_stats, before)
            return "".join(pieces), d.last_stats, e.id

    # -- upkeep --------------------------------------------------------------------------

    def save(self, idle_s: float = 0.0) -> int:
        with self._lock:
            return self.store.save(idle_s)

    def gauges(self) -> dict:
        with self._lock:
            st = self.store.stats()
            used = self.llm.cells_used
        return {
            "loopserve_kv_cells_used": ("KV cells held by resident dialogues", used),
            "loopserve_kv_cells_total": ("KV cells of the pool (n_ctx)", self.llm.n_ctx),
            "loopserve_kv_bytes_allocated": ("bytes allocated for the KV pool", self.llm.kv_bytes),
            "loopserve_dialogues_resident": ("dialogues in the KV pool", st["resident"]),
            "loopserve_dialogues_in_ram": ("dialogues swapped out to RAM", st["in_ram"]),
            "loopserve_dialogues_on_disk": ("dialogues with a state file", st["on_disk"]),
            "loopserve_requests_pending": ("requests running or waiting", self._pending),
        }

    def saver(self, stop: threading.Event) -> None:
        """Background thread: save dialogues once idle, until stopped."""
        while not stop.wait(min(1.0, self.opts.save_idle_s)):
            self.save(self.opts.save_idle_s)
