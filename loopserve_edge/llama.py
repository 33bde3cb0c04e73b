"""`Llama`: the object users hold: a `Context` (one model, one llama.cpp context, several
KV sequences) with dialogues on top, the eviction policy of its `LoopServeConfig`, and the
state files dialogues are saved to.

Layers, each importing only those before it: context.py (llama.cpp) -> eviction.py (which
cells to keep) -> dialogue.py (turns) -> llama.py (dialogues of one model).
"""
from __future__ import annotations

import os
from pathlib import Path

from . import paths, state_file
from .config import LoopServeConfig
from .context import Context
from .dialogue import Dialogue
from .errors import DialogueNotFoundError, StateFileError
from .eviction import Evictor


class Llama(Context):
    def __init__(self, model_path: str | os.PathLike, *, loopserve: LoopServeConfig | None = None,
                 dialogues_dir: str | os.PathLike | None = None, **kwargs):
        """`kwargs` are llama_cpp.Llama's constructor arguments (n_ctx, n_gpu_layers,
        n_threads, flash_attn, type_k, seed, verbose, ...)."""
        super().__init__(model_path, loopserve=loopserve, **kwargs)
        self._dialogues_dir = dialogues_dir
        self.evictor = Evictor(self, self.config)

    # -- dialogues ---------------------------------------------------------------------

    def dialogue(self, system: str | None = None, name: str | None = None) -> Dialogue:
        return Dialogue(self, self.evictor, system=system, name=name, dialogues_dir=self._dialogues_dir)

    def dialogues_dir(self) -> Path:
        return paths.dialogues_dir(self._dialogues_dir)

    def dialogue_path(self, name_or_path: str | os.PathLike) -> Path:
        """A path as given, or the default file of a dialogue name."""
        return paths.dialogue_path(name_or_path, self._dialogues_dir)

    def load_dialogue(self, name_or_path: str | os.PathLike) -> Dialogue:
        """Resume a saved dialogue. Every check runs before the live context is touched."""
        path = self.dialogue_path(name_or_path)
        if paths.is_dialogue_name(name_or_path) and not path.exists():
            raise DialogueNotFoundError(f"no saved dialogue {name_or_path!r} (looked for {path})")
        st = state_file.read(path)
        h = st.header
        if h["model"].get("fingerprint") != self.fingerprint:
            raise StateFileError(
                f"{path}: made with another model ({h['model'].get('name', '?')}, fingerprint "
                f"{h['model'].get('fingerprint')}); this model is {self.fingerprint}")
        mine, theirs = self.context_settings(), h["context"]
        for key in ("type_k", "type_v"):
            if theirs.get(key) != mine[key]:
                raise StateFileError(f"{path}: KV cache {key}={theirs.get(key)} in the file, "
                                     f"{mine[key]} in this context; load it with the same setting")
        dlg = Dialogue.from_header(self, self.evictor, h, path, dialogues_dir=self._dialogues_dir)
        if len(dlg.positions) >= self.n_ctx:
            raise StateFileError(f"{path}: holds {len(dlg.positions)} cells, more than this "
                                 f"context's n_ctx={self.n_ctx}; load it with a larger n_ctx")
        dlg._swapped = st.seq_state
        try:
            self.make_resident(dlg)
        except StateFileError as e:
            raise StateFileError(f"{path}: {e}") from None
        return dlg
