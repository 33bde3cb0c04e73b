"""The methods the benchmark compares, each a LoopServeConfig.

A method with a KV budget runs once per budget (`snapkv@512`); one with sparse prefill once
per alpha (`loopserve-prefill@a0.95`). A method whose configuration the installed package
refuses (sparse prefill before its issue lands) is reported as not available, with the
reason, and never run: enabling it is then a matter of the config accepting it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import LoopServeConfig


@dataclass(frozen=True)
class Method:
    name: str
    policy: str                  # decode-phase KV policy (config.POLICIES)
    sparse_prefill: bool = False
    describe: str = ""
    options: tuple = ()          # further LoopServeConfig fields, as (name, value) pairs
    baseline: bool = False       # a prior method LoopServe is measured against: report.py
                                 # compares the others with the best of these per budget
    pool: int | None = None      # budgeted prefill: n_ctx is this many times the budget (not
                                 # the dialogue's length), so inputs go in as chunks
    ubatch: int | None = None    # sparse prefill's ubatch (2048 otherwise): one estimation
                                 # serves this many rows
    kv_type: str = "f16"         # K and V of this type (context.KV_TYPES): a q8_0 cell takes
                                 # 0.53x the bytes of an f16 one, so twice the budget in q8_0
                                 # takes about the bytes of the budget in f16

    @property
    def uses_budget(self) -> bool:
        return self.policy != "full"

    @property
    def needs_flash_attn(self) -> bool:
        """Head-wise cuts move rows of V, which flash attention stores untransposed; quantized V
        is never transposed either."""
        return dict(self.options).get("granularity") == "head" or self.kv_type != "f16"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("full", "full", describe="full attention, the reference"),
    Method("streaming", "streaming", describe="first `sink` cells and the most recent ones", baseline=True),
    Method("snapkv", "snapkv", describe="compress once after each prefill, scored by the input's "
           "last tokens", baseline=True),
    Method("h2o", "h2o", describe="heavy hitters: scores accumulated over every token", baseline=True),
    # `loopserve` pins defer_cut=0 (its cut after a prefill scored by the input alone, the
    # default before the dev split chose 4), `loopserve-defer` is the default configuration
    Method("loopserve", "loopserve", describe="LoopServe decode only: progressive compression "
           "scored by recent output tokens; the cut after each prefill right away (defer_cut=0)",
           options=(("defer_cut", 0),)),
    Method("loopserve-defer", "loopserve", describe="loopserve whose cut after each prefill waits for "
           "the first 4 generated tokens and is scored by them too", options=(("defer_cut", 4),)),
    # head-wise (LoopServeConfig.granularity): each KV head keeps its own tokens in the same
    # number of cells; head-wise SnapKV and H2O are what their papers do, so they are baselines
    Method("snapkv-head", "snapkv", describe="snapkv, each KV head keeping its own tokens", baseline=True,
           options=(("granularity", "head"),)),
    Method("h2o-head", "h2o", describe="h2o, each KV head keeping its own tokens", baseline=True,
           options=(("granularity", "head"),)),
    Method("loopserve-head", "loopserve", describe="loopserve, each KV head keeping its own tokens",
           options=(("defer_cut", 0), ("granularity", "head"))),
    Method("loopserve-defer-head", "loopserve", describe="loopserve-defer, each KV head keeping its own "
           "tokens", options=(("defer_cut", 4), ("granularity", "head"))),
    # the default from session 6 to 21 (defer_cut 32: on the dev split 12 was +3.8 points over
    # 4, 32 +2.1 over 12); the two above keep 4, as in the committed runs
    Method("loopserve-d32", "loopserve", describe="loopserve whose cut after each prefill waits for the "
           "first 32 generated tokens", options=(("defer_cut", 32),)),
    Method("loopserve-d32-head", "loopserve", describe="loopserve-d32, each KV head keeping its own tokens",
           options=(("defer_cut", 32), ("granularity", "head"))),
    # issue 15, "a cut at the end of every reply", the default since session 22: the benchmark's
    # replies have at most 48 tokens, so this cut waits for the whole reply (over
    # loopserve-d32-head: dev split +0.64 points [+0.17, +1.11] of full's greedy tokens,
    # benchmarks/results/window-dev/; test split +0.15 to +0.46 at 2K-8K, d64-test-gpu/;
    # later turns level)
    Method("loopserve-d64", "loopserve", describe="loopserve whose cut after each prefill waits for the "
           "first 64 generated tokens (the default)", options=(("defer_cut", 64),)),
    Method("loopserve-d64-head", "loopserve", describe="loopserve-d64, each KV head keeping its own tokens",
           options=(("defer_cut", 64), ("granularity", "head"))),
    # issue 15: whole spans of 32 consecutive cells kept (LoopServeConfig.span, ChunkKV's
    # ranking) instead of cells one by one (benchmarks/results/chunk-dev/)
    Method("loopserve-d64-head-span32", "loopserve", describe="loopserve-d64-head keeping whole spans of 32 "
           "cells, ranked by their summed scores", options=(("defer_cut", 64), ("granularity", "head"),
                                                            ("span", 32))),
    Method("loopserve-d64-span32", "loopserve", describe="loopserve-d64 keeping whole spans of 32 cells",
           options=(("defer_cut", 64), ("span", 32))),
    # issue 15's decode speed: the deferred cut scored by the reply's first 4 tokens instead of
    # all 32 it waits for (a scored step costs more; dev split: within noise of all 32, test
    # split: -1.3 points of full's greedy tokens; benchmarks/results/defer-scored-dev/)
    Method("loopserve-d32-s4-head", "loopserve", describe="loopserve-d32-head, the deferred cut scored "
           "by the first 4 generated tokens only", options=(("defer_cut", 32), ("defer_scored", 4),
                                                           ("granularity", "head"))),
    # issue 15: head-wise at budget B does not keep what cell-wise keeps at 2B; q8_0 K/V hold
    # 2B cells in 1.06x the bytes of B f16 ones, so these two ask whether quantized K/V buy
    # the memory that selection does not
    Method("loopserve-d32-head-q8", "loopserve", describe="loopserve-d32-head with q8_0 K/V",
           options=(("defer_cut", 32), ("granularity", "head")), kv_type="q8_0"),
    Method("loopserve-d32-q8", "loopserve", describe="loopserve-d32 with q8_0 K/V",
           options=(("defer_cut", 32),), kv_type="q8_0"),
    # issue 15: budget allocation (LoopServeConfig.allocation). The heads keep the budget on
    # average, but the cells are the largest share (about twice the budget): compare with the
    # uniform methods at the same budget for the same tokens attended, at twice it for the
    # same memory. PyramidKV and Ada-KV (on SnapKV's scores, as their papers) are baselines
    Method("pyramidkv", "snapkv", describe="snapkv-head, per-layer shares falling from the first layer "
           "to the last (PyramidKV); cells: the largest share", baseline=True,
           options=(("granularity", "head"), ("allocation", "pyramid"))),
    Method("ada-snapkv", "snapkv", describe="snapkv-head, per-head shares by score mass within each "
           "layer (Ada-KV); cells: the largest share", baseline=True,
           options=(("granularity", "head"), ("allocation", "ada"))),
    Method("loopserve-d32-head-ada", "loopserve", describe="loopserve-d32-head with Ada-KV's per-head "
           "shares", options=(("defer_cut", 32), ("granularity", "head"), ("allocation", "ada"))),
    Method("loopserve-d32-head-pyramid", "loopserve", describe="loopserve-d32-head with PyramidKV's "
           "per-layer shares", options=(("defer_cut", 32), ("granularity", "head"), ("allocation", "pyramid"))),
    # budgeted prefill: a context of twice the budget, so each input that does not fit goes in
    # as chunks of about the budget, each cut back to it; StreamingLLM and SnapKV on the same
    # chunks are the baselines
    Method("streaming-chunked", "streaming", describe="streaming, n_ctx 2x the budget: inputs in chunks",
           baseline=True, pool=2),
    Method("snapkv-chunked", "snapkv", describe="snapkv, n_ctx 2x the budget: inputs in chunks, each cut "
           "scored by its last tokens", baseline=True, pool=2),
    Method("snapkv-head-chunked", "snapkv", describe="snapkv-head, n_ctx 2x the budget", baseline=True,
           pool=2, options=(("granularity", "head"),)),
    Method("loopserve-defer-chunked", "loopserve", describe="loopserve-defer, n_ctx 2x the budget",
           pool=2, options=(("defer_cut", 4),)),
    Method("loopserve-defer-head-chunked", "loopserve", describe="loopserve-defer-head, n_ctx 2x the budget",
           pool=2, options=(("defer_cut", 4), ("granularity", "head"))),
    Method("loopserve-prefill", "full", True, "LoopServe sparse prefill only"),
    # issue 18: the estimation on one ubatch in 4 (the whole input in one decode call)
    Method("loopserve-prefill-r4", "full", True, "loopserve-prefill, a selection serving 4 ubatches "
           "(prefill_reuse=4)", options=(("prefill_reuse", 4),)),
    Method("loopserve-prefill-r2", "full", True, "loopserve-prefill, a selection serving 2 ubatches "
           "(prefill_reuse=2)", options=(("prefill_reuse", 2),)),
    # issue 18: larger ubatches halve the estimations too (8B at 128K on the GPU: 3.89x against
    # 3.46x with 4096), at the cost of compute buffers
    Method("loopserve-prefill-u4096", "full", True, "loopserve-prefill in ubatches of 4096 (2048 "
           "otherwise): one estimation per 4096 rows", ubatch=4096),
    # issue 18: the GPU's 1B shape meets 4x at 128K only with ubatches of 8192 (4.18x; 3.43x with
    # 4096 before session 41's kernel): what one estimation per 8192 rows costs in fidelity
    Method("loopserve-prefill-u8192", "full", True, "loopserve-prefill in ubatches of 8192 (2048 "
           "otherwise): one estimation per 8192 rows", ubatch=8192),
    # issue 18: the estimation's cost is proportional to its rows (64 by default)
    Method("loopserve-prefill-q32", "full", True, "loopserve-prefill estimating from each ubatch's "
           "last 32 rows (64 otherwise)", options=(("last_q", 32),)),
    Method("loopserve-both", "loopserve", True, "LoopServe sparse prefill and progressive decode compression"),
)}


@dataclass(frozen=True)
class Run:
    """One method at one budget / alpha: what the harness runs and the tables list."""
    method: Method
    budget: int | None = None
    alpha: float | None = None

    @property
    def label(self) -> str:
        parts = [self.method.name]
        if self.budget is not None:
            parts.append(f"@{self.budget}")
        if self.alpha is not None:
            parts.append(f"@a{self.alpha:g}")
        return "".join(parts)

    def config(self, **extra) -> LoopServeConfig:
        """The configuration; ValueError when this package cannot run it."""
        kw = dict(max_resident=1, policy=self.method.policy, **dict(self.method.options), **extra)
        if self.budget is not None:
            kw["budget"] = self.budget
        if self.method.sparse_prefill:
            kw["sparse_prefill"] = True
            kw["alpha"] = self.alpha
        return LoopServeConfig(**kw)

    def unavailable(self) -> str | None:
        """None, or why this run cannot be made (e.g. 'sparse prefill not implemented')."""
        try:
            self.config()
        except ValueError as e:
            msg = str(e)
            return "sparse prefill not implemented" if "sparse prefill" in msg and "not implemented" in msg else msg
        return None


def expand(names, budgets, alphas) -> list[Run]:
    """The runs for these method names: `full` first (every other method is compared with
    it, so it runs whether asked or not), then each method at each budget / alpha."""
    runs = [Run(METHODS["full"])]
    for name in names:
        m = METHODS[name]
        if name == "full":
            continue
        for b in (budgets if m.uses_budget else [None]):
            for a in (alphas if m.sparse_prefill else [None]):
                runs.append(Run(m, b, a))
    return runs
