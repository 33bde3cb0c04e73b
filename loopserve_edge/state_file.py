"""The dialogue state file: everything needed to resume a dialogue without prefilling it.

Layout (little endian):
    magic        8 bytes  b"LSEDGE\\x00\\x01"
    version      u32
    header_len   u64, then a UTF-8 JSON header: model fingerprint, context settings,
                 LoopServe config, messages, token and position lists, the cells' layout
    blob_len     u64, then the llama.cpp sequence state (llama_state_seq_get_data)
    checksum     32 bytes, SHA-256 of everything before it

Version 2 added the layout: "cell" (every KV head of a cell holds the token at the cell's
position) or "head" (after a head-wise cut each head holds its own tokens, the cell's
position the latest of them). Version 1 files are all "cell" and are read as before; an
older loopserve-edge refuses a version 2 file by its version, so none misreads one.
Version 3 adds hidden rows (the dialogue's "hidden": the rows of its first cells that a
non-uniform allocation hid from their heads, as packed bits). Only a file that has them is
written as version 3, so that an older loopserve-edge refuses it rather than show those rows.
The dialogue's attention scores (its "scores": positions, rows per scored KV head, the query
rows counted) need no version: a reader that ignores them starts with none, as all did before.

A file is validated whole (size, magic, version, checksum, header) before any of it is
used, and written to a temporary file that is renamed over the old one only when
complete, so a crash mid-save leaves the previous file as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import StateFileError

MAGIC = b"LSEDGE\x00\x01"
VERSION = 3         # written when the dialogue has hidden rows, else 2
READABLE = (1, 2, 3)   # versions this one reads
SUFFIX = ".lsd"
_HEAD = struct.Struct("<8sIQ")
_LEN = struct.Struct("<Q")
_SUM = 32


@dataclass
class StateFile:
    header: dict
    seq_state: bytes


def _header_bytes(header: dict) -> bytes:
    return json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()


def encoded_size(header: dict, seq_state_len: int) -> int:
    """The size of the file `encode` writes for this header and a sequence state of
    seq_state_len bytes, without building it."""
    return _HEAD.size + len(_header_bytes(header)) + _LEN.size + seq_state_len + _SUM


def encode(state: StateFile) -> bytes:
    header = _header_bytes(state.header)
    version = VERSION if "hidden" in state.header.get("dialogue", {}) else 2
    body = b"".join([_HEAD.pack(MAGIC, version, len(header)), header,
                     _LEN.pack(len(state.seq_state)), state.seq_state])
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, name: str = "state file") -> StateFile:
    def bad(why: str) -> StateFileError:
        return StateFileError(f"{name}: {why}")

    if len(data) < _HEAD.size + _LEN.size + _SUM:
        raise bad(f"too short to be a loopserve-edge state file ({len(data)} bytes)")
    magic, version, header_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise bad("not a loopserve-edge state file (wrong magic)")
    body, digest = data[:-_SUM], data[-_SUM:]
    if hashlib.sha256(body).digest() != digest:
        raise bad("checksum mismatch: the file is truncated or corrupt")
    if version not in READABLE:
        raise bad(f"state file format version {version}; this loopserve-edge reads versions "
                  f"{', '.join(map(str, READABLE))}")
    off = _HEAD.size
    if off + header_len + _LEN.size > len(body):
        raise bad("header length runs past the end of the file")
    try:
        header = json.loads(body[off:off + header_len].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"unreadable header ({e})") from None
    off += header_len
    (blob_len,) = _LEN.unpack_from(body, off)
    off += _LEN.size
    if off + blob_len != len(body):
        raise bad("sequence state length does not match the file size")
    if not isinstance(header, dict) or not {"model", "context", "dialogue"} <= header.keys():
        raise bad("header lacks model, context or dialogue")
    return StateFile(header, body[off:])


def read(path: str | os.PathLike) -> StateFile:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateFileError(f"{path}: no such state file") from None
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({e.strerror})") from None
    return decode(data, str(path))


def read_header(path: str | os.PathLike) -> dict:
    """Just the header, for listings: the checksum over the sequence state is not checked."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD.size)
            if len(head) < _HEAD.size or head[:8] != MAGIC:
                raise StateFileError(f"{path}: not a loopserve-edge state file")
            _, version, header_len = _HEAD.unpack(head)
            if version not in READABLE:
                raise StateFileError(f"{path}: state file format version {version}")
            header = json.loads(f.read(header_len).decode())
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StateFileError(f"{path}: unreadable header") from None
    if not isinstance(header, dict) or "dialogue" not in header or "model" not in header:
        raise StateFileError(f"{path}: header lacks model or dialogue")
    return header


_TMP = ".tmp"   # a save writes .NAME.PID.tmp beside NAME, then renames it over NAME


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Remove the temporary files that saves of processes no longer running left in folder
    (a process killed mid-save: the state file it was replacing is still the previous one,
    whole). Returns how many went."""
    n = 0
    for tmp in Path(folder).glob(f".*{SUFFIX}.*{_TMP}"):
        pid = tmp.name[:-len(_TMP)].rsplit(".", 1)[-1]
        try:
            os.kill(int(pid), 0)
            continue                  # its process runs: maybe saving right now
        except PermissionError:
            continue
        except (ValueError, ProcessLookupError):
            pass
        tmp.unlink(missing_ok=True)
        n += 1
    return n


def write(path: str | os.PathLike, state: StateFile) -> int:
    """Atomically replace `path` with `state`; returns the size written."""
    return replace_atomically(path, encode(state))


def replace_atomically(path: str | os.PathLike, data: bytes) -> int:
    """Replace `path` with `data` whole or not at all, on the disk when this returns (also the
    server's stored responses)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk before we call the save done.
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return len(data)
