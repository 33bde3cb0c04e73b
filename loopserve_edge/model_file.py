"""Checks on a model path before llama.cpp sees it, and the model's fingerprint."""
from __future__ import annotations

import hashlib
import os
import struct
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


# ggml's (block size, bytes a block) by type id, for the types GGUF files carry; a type not
# here leaves its tensor's size unknown (the check then uses where that tensor starts)
_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
           9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
           15: (256, 292), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2)}
# GGUF's metadata value types: fixed sizes by id (8: string, 9: array)
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_extent(path: Path) -> int | None:
    """The bytes a GGUF file must have to hold the tensors its header lists (read from the
    header alone); -1 where the file ends inside its header, None where the header cannot be
    read otherwise. Used to say why llama.cpp refused a file: a download cut short is the usual
    reason."""
    try:
        with open(path, "rb") as f:
            def take(fmt):
                n = struct.calcsize("<" + fmt)
                b = f.read(n)
                if len(b) < n:
                    raise EOFError
                return struct.unpack("<" + fmt, b)

            def skip_value(t):
                if t == 8:
                    f.seek(take("Q")[0], 1)
                elif t == 9:
                    et, n = take("IQ")
                    if et in _SCALAR:
                        f.seek(_SCALAR[et] * n, 1)
                    else:
                        for _ in range(n):
                            skip_value(et)
                elif t in _SCALAR:
                    f.seek(_SCALAR[t], 1)
                else:
                    raise ValueError(t)

            magic, version = f.read(4), take("I")[0]
            if magic != GGUF_MAGIC or version < 2:
                return None
            n_tensors, n_kv = take("QQ")
            alignment = 32
            for _ in range(n_kv):
                key = f.read(take("Q")[0])
                t = take("I")[0]
                if key == b"general.alignment" and t == 4:
                    alignment = take("I")[0]
                else:
                    skip_value(t)
            end = 0
            for _ in range(n_tensors):
                f.seek(take("Q")[0], 1)
                dims = take(f"{take('I')[0]}Q")
                t, offset = take("IQ")
                n = 1
                for d in dims:
                    n *= d
                block, size = _BLOCKS.get(t, (1, 0))
                end = max(end, offset + n // block * size)
            data = -(-f.tell() // alignment) * alignment
            return data + end
    except EOFError:
        return -1
    except (OSError, ValueError, struct.error, MemoryError):
        return None


def load_failure(path: Path, why: str) -> ModelFileError:
    """The one-line error for a model file llama.cpp refused, saying so when it is cut short."""
    need = gguf_extent(path)
    have = path.stat().st_size if path.exists() else 0
    if need == -1:
        return ModelFileError(f"{path}: the file is truncated ({have:,} bytes, ending inside its header): "
                              f"an interrupted download or copy?")
    if need is not None and have < need:
        return ModelFileError(f"{path}: the file is truncated ({have:,} bytes; its header lists tensors "
                              f"up to byte {need:,}): an interrupted download or copy?")
    return ModelFileError(f"{path}: llama.cpp could not load it ({why})")


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
