"""Checks on a model path before llama.cpp sees it, and the model's fingerprint."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import ModelFileError

GGUF_MAGIC = b"GGUF"
_EDGE = 1 << 20


def check_model_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(f"{p}: no such model file")
    if not p.is_file():
        raise ModelFileError(f"{p}: not a file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"{p}: cannot read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{p}: not a GGUF model file")
    return p


def fingerprint(path: Path, metadata: dict[str, str]) -> str:
    """Identifies the weights a KV state was computed with, without hashing gigabytes:
    the metadata, the file size, and the first and last MiB (tensor data sits at the end)."""
    h = hashlib.sha256()
    for k in sorted(metadata):
        h.update(f"{k}={metadata[k]}\n".encode())
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        f.seek(max(0, size - _EDGE))
        h.update(f.read(_EDGE))
    return h.hexdigest()[:32]
