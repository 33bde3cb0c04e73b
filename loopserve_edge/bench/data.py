"""The real data the benchmark reads: "Lost in the Middle" (Liu et al., 2023), read in place.

`$LOOPSERVE_DATA/lost-in-the-middle/`, else `<repo>/../shared/data/lost-in-the-middle/`
(see its README): Natural Questions (open) questions with their gold Wikipedia passages,
and the synthetic key-value retrieval records (UUID keys and values).
"""
from __future__ import annotations

import functools
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoopServeError

ENV_DATA = "LOOPSERVE_DATA"
DATASET = "lost-in-the-middle"
NQ_FILE = "nq-open-oracle.jsonl.gz"
KV_FILE = "kv-retrieval-75_keys.jsonl.gz"
REPO = Path(__file__).resolve().parents[2]


class DataMissingError(LoopServeError):
    """The benchmark's data folder or one of its files is not there."""


def data_dir() -> Path:
    env = os.environ.get(ENV_DATA)
    root = Path(env) if env else REPO.parent / "shared" / "data"
    return root / DATASET


def data_file(name: str) -> Path:
    path = data_dir() / name
    if not path.is_file():
        raise DataMissingError(
            f"benchmark data not found: no {path} (put the lost-in-the-middle data in "
            f"{REPO.parent / 'shared' / 'data'} or set ${ENV_DATA} to the folder that holds it)")
    return path


def check_data() -> None:
    for name in (NQ_FILE, KV_FILE):
        data_file(name)


@dataclass(frozen=True)
class NQItem:
    """A Natural Questions question, its answers and its gold passage."""
    index: int
    question: str
    answers: tuple[str, ...]
    title: str
    text: str


@functools.lru_cache(maxsize=1)
def nq_items() -> tuple[NQItem, ...]:
    out = []
    with gzip.open(data_file(NQ_FILE), "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            gold = r["ctxs"][0]
            out.append(NQItem(i, r["question"], tuple(r["answers"]), gold["title"], gold["text"]))
    return tuple(out)


SPLITS = ("dev", "test")


def split_of(index: int) -> str:
    """Which split a record of the shared data belongs to: even indices are `dev`, odd ones
    `test`, in each file. Tuning runs read only `dev`; reported runs only `test`."""
    return SPLITS[index % 2]


class Corpus:
    """One split's share of the shared data: the Natural Questions items and key-value
    records whose index falls in it (generators read nothing else of the data)."""

    def __init__(self, split: str):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        self.split = split

    @functools.cached_property
    def nq(self) -> tuple[NQItem, ...]:
        return tuple(it for it in nq_items() if split_of(it.index) == self.split)

    @functools.cached_property
    def kv(self) -> tuple[tuple[tuple[str, str], ...], ...]:
        return tuple(r for i, r in enumerate(kv_records()) if split_of(i) == self.split)


def passages_and_questions(n: int):
    """(title, passage, question) of the first n items (benchmarks/turns.py, decode.py)."""
    for item in nq_items()[:n]:
        yield item.title, item.text, item.question


@functools.lru_cache(maxsize=1)
def kv_records() -> tuple[tuple[tuple[str, str], ...], ...]:
    """Each case's 75 (key, value) UUID pairs, in order."""
    with gzip.open(data_file(KV_FILE), "rt", encoding="utf-8") as f:
        return tuple(tuple((k, v) for k, v in json.loads(line)["ordered_kv_records"]) for line in f)
