"""The dialogues of OpenAI-style chat (the server, `Llama.create_chat_completion`): found
again from stateless requests, kept in RAM within a limit, and (the server's) saved as state
files and restored after a restart.

OpenAI-style clients resend the whole conversation each time. Every dialogue is indexed by a
hash of (system prompt, messages[:j]) for every message boundary j, so a request's history
finds the dialogue that holds its longest prefix. A dialogue whose every message the request
repeats goes on in place (the new messages are prefilled, the rest reused); one that shares
only part of it (an edited or regenerated turn) is branched: a copy of its KV state goes on
with the request's history and recomputes from where the texts differ, and the original
stays for whoever continues it.

Text completions (one prompt, the whole text) go on in the text dialogue whose text shares the
longest start with the prompt (as llama-server's slots: what differs is recomputed in place).
They are kept in RAM only, never in state files.

Not thread-safe: the server's engine calls it under its lock.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import state_file
from .config import LoopServeConfig
from .chat_template import RawText
from .dialogue import Dialogue, common_start
from .errors import LoopServeError, StateFileError
from .eviction import Evictor
from .openai_api import RequestError, merged_config

log = logging.getLogger("loopserve_edge.dialogues")


# a dialogue id names its state file: nothing that could leave the folder
ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class DialogueBusy(LoopServeError):
    """A dialogue named by a request is answering another one."""


class _Unloadable(Exception):
    """An indexed dialogue's state file no longer loads (set aside by _live)."""


def prefix_key(system: str | None, messages) -> str:
    data = json.dumps([system, [[m["role"], m["content"]] for m in messages]], ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()


@dataclass
class Entry:
    id: str
    system: str | None
    messages: list[dict]                  # as the dialogue holds them (also while on disk)
    dialogue: Dialogue | None = None      # None: only in its state file
    keys: list[str] = field(default_factory=list)
    used: float = field(default_factory=time.time)
    dirty: bool = False                   # changed since its state file was written
    busy: bool = False                    # a request is running in it: not to be matched
    text: bool = False                    # a text completions' dialogue (chat_template.RawText)


class DialogueStore:
    def __init__(self, llm, root: Path | None, ram_limit: int):
        """llm: the Llama the dialogues live in; root: their state files (None: none, in RAM
        only); ram_limit: bytes of swapped-out KV state kept in RAM before the least recently
        used go to disk only (with no root: are forgotten)."""
        self.llm, self.root, self.ram_limit = llm, None if root is None else Path(root), ram_limit
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, Entry] = {}
        self.index: dict[str, set[str]] = {}  # prefix key -> ids of the entries that hold it
        self._evictors: dict[LoopServeConfig, Evictor] = {llm.config: llm.evictor}

    def evictor(self, settings: dict) -> Evictor:
        """The eviction of the model's config with a request's LoopServe settings (one Evictor
        per distinct config). Sparse prefill and granularity shape the context itself: they are
        the model's."""
        base = self.llm.config
        cfg = merged_config(base, settings)
        if (cfg.sparse_prefill, cfg.granularity) != (base.sparse_prefill, base.granularity):
            raise RequestError("sparse_prefill and granularity are set when the model is loaded (the server's "
                               "--sparse-prefill, --granularity), not per request", "loopserve")
        if cfg not in self._evictors:
            try:
                self._evictors[cfg] = Evictor(self.llm, cfg)
            except LoopServeError as e:
                raise RequestError(f"loopserve settings: {e}", "loopserve") from None
        return self._evictors[cfg]

    # -- finding a request's dialogue --------------------------------------------------------

    def _unregister(self, e: Entry) -> None:
        for k in e.keys:
            ids = self.index.get(k)
            if ids is not None:
                ids.discard(e.id)
                if not ids:
                    del self.index[k]

    def _register(self, e: Entry) -> None:
        self._unregister(e)
        e.keys = [prefix_key(e.system, e.messages[:j]) for j in range(len(e.messages) + 1)]
        for k in e.keys:
            self.index.setdefault(k, set()).add(e.id)

    def match(self, system: str | None, history: list[dict]) -> tuple[Entry | None, int]:
        """The entry holding the longest prefix of (system, history) (the most recently used of
        several), and the prefix's length in messages."""
        for j in range(len(history), -1, -1):
            free = [self.entries[i] for i in self.index.get(prefix_key(system, history[:j]), ()) if
                    not self.entries[i].busy]
            if free:
                return max(free, key=lambda e: e.used), j
        return None, 0

    def for_request(self, system: str | None, history: list[dict], prompt: str, dialogue_id: str | None,
                    evictor: Evictor) -> tuple[Entry, Dialogue]:
        """The dialogue to run a request in, its messages set to the request's history (the
        prompt, its last user message, is sent to it next). The match covers the prompt too,
        so that a regenerated reply reuses the whole prompt."""
        try:
            if dialogue_id is not None:
                if not ID.fullmatch(dialogue_id):
                    raise LoopServeError("a dialogue id is 1-64 letters, digits, '-' or '_'")
                e = self.entries.get(dialogue_id)
                if e is None:
                    e = self._new(system, dialogue_id)
                elif e.text:
                    raise LoopServeError(f"dialogue {dialogue_id} holds text completions, not a chat")
                elif e.busy:
                    raise DialogueBusy(f"dialogue {dialogue_id} is answering another request")
                elif e.system != system:
                    raise LoopServeError(f"dialogue {dialogue_id} has another system prompt")
            else:
                e, j = self.match(system, history + [{"role": "user", "content": prompt}])
                if e is None or (j == 0 and e.messages):
                    e = self._new(system)           # only the system prompt in common: start afresh
                elif j < len(e.messages):
                    e = self._branch(e, j)
            d = self._live(e)
        except _Unloadable:
            # the request holds the whole conversation: it goes on in a new dialogue, prefilled
            e = self._new(system, dialogue_id)
            d = e.dialogue
        d.evictor = evictor
        if d.messages != list(history):
            d.messages = list(history)          # rendered and compared with the cache at send()
        e.used = time.time()
        return e, d

    def for_text(self, prompt: str, evictor: Evictor) -> tuple[Entry, Dialogue]:
        """The dialogue to run a text completion in: the free text dialogue whose text (prompt
        and reply so far) shares the longest start with the prompt, at least half of the
        prompt, or a new one. Its messages
        are emptied: the prompt, sent to it next, is the whole text, and what the cache holds
        beyond their common start is recomputed (Dialogue._prefill)."""
        best, common = None, 0
        for e in self.entries.values():
            if e.text and not e.busy:
                n = common_start(e.dialogue.kv_text, prompt)
                # at least half of the prompt (as llama-server picks a slot): a prompt that shares
                # only a short start with it (another client's) should not cut down its cache
                if 2 * n >= len(prompt) and (n > common or (n == common and best is not None
                                                            and e.used > best.used)):
                    best, common = e, n
        e = best
        if e is None:
            e = Entry(uuid.uuid4().hex, None, [], text=True)
            e.dialogue = Dialogue(self.llm, evictor, name=e.id, template=RawText(self.llm.template.bos_token))
            self.entries[e.id] = e
        e.dialogue.evictor = evictor
        e.dialogue.messages = []
        e.used = time.time()
        return e, e.dialogue

    def _new(self, system: str | None, eid: str | None = None) -> Entry:
        e = Entry(eid or uuid.uuid4().hex, system, [])
        e.dialogue = self.llm.dialogue(system=system, name=e.id)
        self.entries[e.id] = e
        self._register(e)
        return e

    def _branch(self, src: Entry, j: int) -> Entry:
        """A copy of src's dialogue (KV state and all) under a new id."""
        d = self._live(src)
        e = Entry(uuid.uuid4().hex, src.system, [])
        header = d.to_header()   # what a state file holds, so the copy is what loading one gives
        header["dialogue"]["name"] = e.id
        c = Dialogue.from_header(self.llm, d.evictor, header, self._path(e.id))
        c._swapped = self.llm.sequence_state(d._seq) if d._seq is not None else d._swapped
        e.dialogue, e.messages = c, list(d.messages)
        self.entries[e.id] = e
        self._register(e)
        log.info("branched dialogue %s from %s at message %d", e.id, src.id, j)
        return e

    def _live(self, e: Entry) -> Dialogue:
        if e.dialogue is None:   # only with a root: without one, a dialogue leaving RAM is forgotten
            path = self._path(e.id)
            try:
                e.dialogue = self.llm.load_dialogue(path)
            except StateFileError as err:
                # damaged on disk, or a state this runtime or context refuses: every request that
                # repeated the conversation failed on it. It leaves the index, and the file is
                # kept beside under a name that is not indexed again
                self.entries.pop(e.id, None)
                self._unregister(e)
                aside = path.with_name(path.name + ".unloadable")
                try:
                    path.replace(aside)
                except OSError:
                    pass
                log.warning("dialogue %s could not be loaded (%s); its file set aside as %s, the "
                            "conversation prefilled afresh", e.id, err, aside.name)
                raise _Unloadable from None
        return e.dialogue

    # -- after a turn ----------------------------------------------------------------------

    def failed(self, e: Entry) -> None:
        """A request refused before anything was computed in e (a full context, messages the
        chat template cannot render): its dialogue's messages back to those its cache holds,
        which for_request had set to the request's (a state file written later must not list
        a turn it lacks)."""
        e.busy = False
        if e.dialogue is not None and not e.text:
            e.dialogue.messages = list(e.messages)

    def updated(self, e: Entry) -> None:
        e.messages = list(e.dialogue.messages)
        e.used = time.time()
        if not e.text:     # a text dialogue is found by its text, and never saved
            e.dirty = True
            self._register(e)
        self._limit_ram(keep=e)

    def _limit_ram(self, keep: Entry) -> None:
        # never one answering a request: its reply goes on in that Dialogue (swapped out while
        # another request prefilled), which a move to disk would close under it
        swapped = [x for x in self.entries.values()
                   if x is not keep and not x.busy and x.dialogue is not None and x.dialogue._seq is None]
        total = sum(len(x.dialogue._swapped or b"") for x in swapped)
        for x in sorted(swapped, key=lambda x: x.used):
            if total <= self.ram_limit:
                break
            total -= len(x.dialogue._swapped or b"")
            self._to_disk(x)

    def _to_disk(self, e: Entry) -> None:
        if self.root is None or e.text:
            self._forget(e)
            return
        if e.dirty or not self._path(e.id).exists():
            e.dialogue.save(self._path(e.id))
            e.dirty = False
        e.dialogue.close()
        e.dialogue = None

    def _forget(self, e: Entry) -> None:
        e.dialogue.close()
        del self.entries[e.id]
        self._unregister(e)

    # -- state files ---------------------------------------------------------------------

    def _path(self, eid: str) -> Path:
        name = f"{eid}{state_file.SUFFIX}"
        return Path(name) if self.root is None else self.root / name   # without a root: for messages

    def save(self, idle_s: float = 0.0) -> int:
        """Write the state files of the dialogues changed and idle for idle_s seconds. One
        answering a request waits for its turn's end (updated): mid-reply its cache may hold a
        token its lists do not yet (decoded, its logits not yet handed on)."""
        n, now = 0, time.time()
        for e in self.entries.values():
            if e.dirty and not e.busy and e.dialogue is not None and now - e.used >= idle_s:
                e.dialogue.save(self._path(e.id))
                e.dirty = False
                n += 1
        return n

    def restore(self) -> int:
        """Index the state files of this model found in root (loaded when a request needs one;
        one whose K/V types, flash attention or size this context cannot take is left out, on
        disk).
        The temporary file of a save that a killed process left behind goes (the state file
        it was to replace is still the previous one, whole)."""
        state_file.remove_stale_temporaries(self.root)
        n = 0
        for path in sorted(self.root.glob(f"*{state_file.SUFFIX}")):
            try:
                h = state_file.read_header(path)
                if h["model"].get("fingerprint") != self.llm.fingerprint:
                    continue
                why = self.llm.state_mismatch(h)
                if why is not None:
                    # a server started with other K/V types, flash attention or a smaller pool:
                    # the file stays as it is (a restart with its settings finds it again), and a
                    # request that repeats its conversation prefills it afresh
                    log.warning("skipped %s: %s", path, why)
                    continue
                d = h["dialogue"]
                e = Entry(path.stem, d["system"], list(d["messages"]), used=float(d["updated"]))
            except (LoopServeError, KeyError, TypeError, ValueError) as err:
                log.warning("skipped %s: %s", path, err)
                continue
            self.entries[e.id] = e
            self._register(e)
            n += 1
        return n

    def stats(self) -> dict:
        live = [e for e in self.entries.values() if e.dialogue is not None]
        return {"resident": sum(e.dialogue._seq is not None for e in live),
                "in_ram": sum(e.dialogue._seq is None for e in live),
                "on_disk": sum(self._path(e.id).exists() for e in self.entries.values()),
                "total": len(self.entries)}
