"""Next-token choice from logits: greedy at temperature 0, else seeded top-k/top-p; logit bias,
llama.cpp's repeat penalty and OpenAI's presence and frequency penalties applied first, at any
temperature; a grammar (grammar.py), when given, has the last word."""
from __future__ import annotations

import collections
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    # tokens less likely than min_p times the most likely one are left out (before the
    # temperature, as llama.cpp's min-p sampler); 0: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    # OpenAI's penalties (-2..2), over the reply's own tokens so far: a token's logit loses
    # presence_penalty once it has been chosen, and frequency_penalty for each time it has
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token, added to its logit) pairs
    # llama.cpp's (llama-server's, llama-cpp-python's): each distinct token among the last
    # repeat_last_n of the dialogue (its prompt too; -1: all, 0: none) has a positive logit
    # divided by repeat_penalty, a negative one multiplied; 1: off
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    # log-probabilities of the reply's tokens (Dialogue.reply_logprobs): None off, else how
    # many of the most likely tokens to list beside each chosen one
    logprobs: int | None = None
    # the reply's form: GBNF text (grammar.py; OpenAI's response_format becomes one), None: free
    grammar: str | None = None


# llama.cpp's seed for "random" (LLAMA_DEFAULT_SEED), as llama-server and llama-cpp-python take -1
RANDOM_SEED = -1


def rng_seed(seed: int | None) -> int | None:
    """numpy's seed for a sampling seed: None (random) for None and -1, else the seed's 64-bit
    two's complement, so that another negative seed repeats its reply too (numpy takes none)."""
    return None if seed is None or seed == RANDOM_SEED else seed & ((1 << 64) - 1)


class Sampler:
    def __init__(self, params: SamplingParams, constraint=None, history: list[int] | tuple[int, ...] = ()):
        """constraint: the grammar's state for this reply (grammar.Constraint: allows(token),
        mask(logits), accept(token)), or None; history: the dialogue's tokens before the reply
        (the repeat penalty's window starts among them)."""
        self.params = params
        self.rng = np.random.default_rng(rng_seed(params.seed))
        self.counts: collections.Counter[int] = collections.Counter()  # tokens chosen so far
        self.constraint = constraint
        n = params.repeat_last_n
        self.recent: collections.deque[int] | None = None
        if params.repeat_penalty != 1.0 and n != 0:
            self.recent = collections.deque(history if n < 0 else history[-n:], maxlen=None if n < 0 else n)

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """The logits the choice is made from: the bias, then the penalties applied (in llama.cpp's
        order; a copy when any applies)."""
        p = self.params
        pen = self.counts and (p.presence_penalty or p.frequency_penalty)
        rep = bool(self.recent)
        if not pen and not p.logit_bias and not rep:
            return logits
        x = logits.astype(np.float64)
        for tok, bias in p.logit_bias:
            if 0 <= tok < x.size:
                x[tok] += bias
        if rep:
            toks = np.unique(np.fromiter(self.recent, dtype=np.int64, count=len(self.recent)))
            toks = toks[(toks >= 0) & (toks < x.size)]
            v = x[toks]
            x[toks] = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        if pen:
            toks = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
            n = np.fromiter(self.counts.values(), dtype=np.float64, count=len(self.counts))
            x[toks] -= p.presence_penalty + p.frequency_penalty * n
        return x

    def __call__(self, logits: np.ndarray) -> int:
        x = self.adjusted(logits)
        tok = self._choose(x)
        c = self.constraint
        if c is not None:
            if not c.allows(tok):
                # chosen again among the tokens the grammar allows (grammar.py says why this
                # gives each of them its masked probability)
                tok = self._choose(c.mask(x))
            c.accept(tok)
        self.counts[tok] += 1
        if self.recent is not None:
            self.recent.append(tok)
        return tok

    def _choose(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(np.argmax(logits))
        x = np.asarray(logits, dtype=np.float64) / p.temperature   # no second copy of adjusted logits
        if 0 < p.top_k < x.size:
            idx = np.argpartition(-x, p.top_k)[: p.top_k]
        else:
            idx = np.arange(x.size)
        idx = idx[np.argsort(-x[idx], kind="stable")]
        if p.min_p > 0:
            idx = idx[(x[idx] - x[idx[0]]) * p.temperature >= np.log(p.min_p)]
        probs = np.exp(x[idx] - x[idx[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, probs = idx[:keep], probs[:keep] / probs[:keep].sum()
        return int(self.rng.choice(idx, p=probs))


def logprobs(logits: np.ndarray, tok: int, top: int) -> tuple[int, float, tuple[tuple[int, float], ...]]:
    """(tok, its log-probability, the `top` most likely tokens with theirs) under the model's
    own distribution: the logits as the model gave them, before temperature, penalties or bias
    (what the reply's tokens cost the model, whatever chose them)."""
    return logprobs_rows(np.asarray(logits)[None], [tok], top)[0]


# rows of a vocabulary that logprobs_rows works on at once: 8 x 49K floats stay in a core's
# cache, where a whole chunk's exponentials (128 rows, 25 MB) would go through memory
ROW_BLOCK = 8


def logprobs_rows(logits: np.ndarray, toks, top: int,
                  threads: int = 1) -> list[tuple[int, float, tuple[tuple[int, float], ...]]]:
    """logprobs() of each row of `logits` (rows x vocabulary) for its token of `toks`: a scored
    text's rows are thousands of vocabularies. The exponentials in float32 (the logits' own
    precision, less their row's maximum), their sums and the log-probabilities in float64:
    within ~1e-7 of an all-float64 computation, in blocks of ROW_BLOCK rows, spread over
    `threads` threads (numpy's loops let go of the GIL)."""
    def block(i: int) -> list:
        return _logprobs_block(logits[i:i + ROW_BLOCK], toks[i:i + ROW_BLOCK], top)

    starts = range(0, len(logits), ROW_BLOCK)
    parts = _pool(threads).map(block, starts) if threads > 1 and len(starts) > 1 else map(block, starts)
    return [r for p in parts for r in p]


_LOCAL = threading.local()


def _scratch(shape: tuple[int, int]) -> np.ndarray:
    """A float32 block of `shape` kept by this thread: with a fresh temporary per row block,
    the main thread's exponentials ran ~6x slower than a worker thread's on the dev box
    (most likely glibc's main heap handing back fresh pages each time after a large array
    moved its thresholds; a worker's arena did not), so each thread reuses one."""
    b = getattr(_LOCAL, "buf", None)
    if b is None or b.shape[1] != shape[1] or len(b) < shape[0]:
        b = _LOCAL.buf = np.empty((max(ROW_BLOCK, shape[0]), shape[1]), dtype=np.float32)
    return b[:shape[0]]


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="logprobs")
        return _POOLS[threads]


def _logprobs_block(logits: np.ndarray, toks, top: int) -> list[tuple[int, float, tuple[tuple[int, float], ...]]]:
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=1, keepdims=True)
    buf = _scratch(x.shape)
    np.exp(np.subtract(x, m, out=buf), out=buf)
    lse = m[:, 0].astype(np.float64) + np.log(buf.sum(axis=1, dtype=np.float64))
    rows = np.arange(len(x))
    lp = x[rows, np.asarray(toks, dtype=np.int64)].astype(np.float64) - lse
    best = [()] * len(x)
    if top > 0:
        # the best `top` by repeated argmax (ties: the lowest id first): a pass over a row is
        # ~1/100 of argpartition's time at the few best tokens asked for (OpenAI: up to 20)
        top = min(top, x.shape[1])
        y = x
        if top > 1:   # masked as it goes: a copy, in the scratch block the exponentials are done with
            np.copyto(buf, x)
            y = buf
        idx = np.empty((len(x), top), dtype=np.int64)
        for j in range(top):
            idx[:, j] = y.argmax(axis=1)
            if j + 1 < top:
                y[rows, idx[:, j]] = -np.inf
        best = [tuple((int(i), float(x[r, i]) - float(lse[r])) for i in idx[r]) for r in rows]
    return [(int(t), float(v), b) for t, v, b in zip(toks, lp, best)]
