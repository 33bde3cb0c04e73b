"""Fidelity to full attention, meaningful even for a small model.

Full attention generates greedily and its next-token distributions are recorded
(`GreedyRecorder`); a method then reads the same dialogue and is teacher-forced along full's
tokens (`TeacherForcer`), so at every step both distributions condition on the same text.
Per step: is the method's greedy choice full's token, and KL(full || method).

The record of full's distribution is either the whole vocabulary (exact KL) or, to keep it
small enough to store, its `top_k` tokens; KL is then taken over those tokens plus one
bucket for the rest of the vocabulary: a lower bound of the exact KL, equal to it when
the rest carries no mass (tests/test_bench.py checks how close).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


@dataclass
class RefStep:
    """Full attention at one step: its greedy token and log-probabilities over `ids`
    (None: the whole vocabulary)."""
    token: int
    logp: np.ndarray
    ids: np.ndarray | None = None

    @classmethod
    def of(cls, logits: np.ndarray, top_k: int | None) -> "RefStep":
        lp = log_softmax(logits)
        token = int(np.argmax(lp))
        if top_k is None or top_k >= lp.size:
            return cls(token, lp.astype(np.float32))
        ids = np.argpartition(-lp, top_k - 1)[:top_k]
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        return cls(token, lp[ids].astype(np.float32), ids.astype(np.int32))


def kl_to(ref: RefStep, logits: np.ndarray) -> float:
    """KL(full || method) at one step (top-k: over full's top tokens and one bucket for
    the rest of the vocabulary)."""
    lq = log_softmax(logits)
    lp = np.asarray(ref.logp, dtype=np.float64)
    if ref.ids is None:
        return float((np.exp(lp) * (lp - lq)).sum())
    lq_k = lq[ref.ids]
    p = np.exp(lp)
    kl = float((p * (lp - lq_k)).sum())
    p_rest = max(0.0, 1.0 - float(p.sum()))
    q_rest = max(1e-30, 1.0 - float(np.exp(lq_k).sum()))
    if p_rest > 1e-12:
        kl += p_rest * np.log(p_rest / q_rest)
    return max(kl, 0.0)


class GreedyRecorder:
    """token_fn for Dialogue.send: greedy choice, keeping full's logits (a copy; turned into
    RefSteps after the turn so that decode timings are not charged for it)."""

    def __init__(self, top_k: int | None = 64):
        self.top_k = top_k
        self.tokens: list[int] = []
        self._logits: list[np.ndarray] = []

    def __call__(self, logits: np.ndarray) -> int:
        self._logits.append(np.array(logits, dtype=np.float32, copy=True))
        self.tokens.append(int(np.argmax(logits)))
        return self.tokens[-1]

    @property
    def steps(self) -> list[RefStep]:
        return [RefStep.of(lg, self.top_k) for lg in self._logits]

    def forced_along(self, refs: list[RefStep]) -> "TeacherForcer | None":
        """When this greedy run chose exactly full's tokens, it *is* the teacher-forced run:
        the comparison, without a second pass (else None)."""
        if self.tokens != [r.token for r in refs]:
            return None
        f = TeacherForcer(refs)
        for lg in self._logits:
            f(lg)
        return f


@dataclass
class TeacherForcer:
    """token_fn for Dialogue.send: feeds full's tokens and compares distributions.
    send(..., max_tokens=len(refs)) replays full's reply exactly (its end-of-turn included)."""
    refs: list[RefStep]
    same: list[bool] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)

    def __call__(self, logits: np.ndarray) -> int:
        ref = self.refs[len(self.same)]
        self.same.append(int(np.argmax(logits)) == ref.token)
        self.kls.append(kl_to(ref, logits))
        return ref.token


def summary(forcers) -> dict:
    """Same-greedy share and mean KL over every step of every turn, and over the turns after
    the first only (`later_*`): those run over a cache cut in an earlier turn, whatever a
    method waits for before its first cut (a `defer_cut` longer than a reply decodes the
    whole first reply over the uncut input)."""
    def of(fs, prefix=""):
        same = [s for f in fs for s in f.same]
        kls = [k for f in fs for k in f.kls]
        return {f"{prefix}same_greedy": float(np.mean(same)) if same else None,
                f"{prefix}mean_kl": float(np.mean(kls)) if kls else None, f"{prefix}steps": len(same)}
    return dict(of(forcers), **of(forcers[1:], "later_"))


def save_refs(path, turns: list[list[RefStep]]) -> None:
    """Full's per-turn records as one .npz (top-k records only)."""
    arrays = {}
    for t, steps in enumerate(turns):
        arrays[f"t{t}_token"] = np.array([s.token for s in steps], dtype=np.int32)
        arrays[f"t{t}_logp"] = np.array([s.logp for s in steps], dtype=np.float32).reshape(len(steps), -1)
        arrays[f"t{t}_ids"] = np.array([s.ids for s in steps], dtype=np.int32).reshape(len(steps), -1)
    np.savez_compressed(path, n_turns=np.array(len(turns)), **arrays)


def load_refs(path) -> list[list[RefStep]]:
    with np.load(path) as z:
        return [[RefStep(int(tok), logp, ids) for tok, logp, ids in
                 zip(z[f"t{t}_token"], z[f"t{t}_logp"], z[f"t{t}_ids"])]
                for t in range(int(z["n_turns"]))]
