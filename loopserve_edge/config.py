"""The one frozen configuration object that is passed down through the controller."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

POLICIES = ("full", "streaming", "snapkv", "h2o", "loopserve")
COMPACTIONS = ("auto", "always", "never")
GRANULARITIES = ("cell", "head")
ALLOCATIONS = ("uniform", "pyramid", "ada")
PYRAMID_BETA = 20  # PyramidKV's beta: its last layer keeps 1/beta of the mean beside the fixed cells
AGGREGATIONS = ("mean", "max")
CUPY_SELECT = ("auto", "on", "off")
# llama.cpp attends over n_kv cells, the highest cell in use rounded up to this (get_n_kv in
# llama-kv-cache.cpp; patch 0012 holds it through a cut of one such step)
N_KV_PAD = 256


def default_interval(budget: int) -> int:
    """Generated tokens between compressions when `interval` is None: budget // 16 within
    16..128, a sixteenth of overshoot at most; raised to the next multiple of N_KV_PAD cells
    above the budget where that is no more than budget // 8. Between cuts a decode attends over
    the padded n_kv, which that raise leaves where it was (at budget 2048: 2304 cells either
    way), so the cells it adds cost KV memory but no attention time on the GPU, while a
    compression's fixed cost comes half as often (budget 2048: every 256 tokens instead of
    128). On the CPU, whose attention costs what the cells cost, the two were level within the
    runs' spread (decode.md, session 26: 4K of history, two calls)."""
    base = min(128, max(16, budget // 16))
    gap = -(-(budget + base) // N_KV_PAD) * N_KV_PAD - budget
    return gap if base < gap <= budget // 8 else base


@dataclass(frozen=True)
class LoopServeConfig:
    # Dialogues resident at once. They share the context's KV pool of n_ctx cells, each using
    # only the cells it holds (so this costs no KV memory); when a turn needs more free
    # cells than the pool has, or more dialogues want a place, the least recently used other
    # one is swapped out to RAM and swapped back on its next turn.
    max_resident: int = 4

    # Batch-invariant CPU attention (include/llama-loopserve.h): a dialogue's logits on the CPU
    # are then the same whether it is decoded alone or beside other dialogues, wherever its
    # cells sit in the pool, so a server's concurrent greedy replies are its single-client ones.
    # Needs flash attention (without it, the attention's sums run over every cell in view).
    # CUDA's kernels tile by the cells in view, so layers on the GPU stay as they are.
    batch_invariant: bool = False

    # Phase 1, adaptive vertical-slash sparse prefill (README "Sparse prefill"). Per
    # full-attention layer of a prompt ubatch of at least `sparse_min_tokens` tokens, the
    # last `last_q` queries estimate per KV head which key columns (vertical) and diagonals
    # (slash) carry the attention mass; the fewest lines reaching `alpha` of it (clamped to
    # [min, max]; max None = no cap), the first `prefill_sink` columns and the
    # `local_window` diagonals next to the main one are attended, with exact softmax.
    sparse_prefill: bool = False
    alpha: float = 0.95
    # 32 was a little worse on the dev split at 8K (94.7% of full's greedy tokens against 95.3%)
    # and saved 3% of the 8B shape's TTFT at 128K (benchmarks/results/ubatch-dev-cpu/)
    last_q: int = 64
    min_vertical: int = 16
    max_vertical: int | None = None
    min_slash: int = 16
    max_slash: int | None = None
    prefill_sink: int = 4
    local_window: int = 64
    sparse_min_tokens: int = 1024
    # query rows that share one key set in the attention (a diagonal costs ~this many keys
    # per block); None: 64 / the GQA ratio, at least 16
    prefill_block: int | None = None
    # the selection estimated on one ubatch of an input also serves its next
    # `prefill_reuse - 1` ubatches (their own new keys through the diagonals and the local
    # window), so the estimation, whose cost grows with the cache, runs on one ubatch in
    # `prefill_reuse` (at 128K on an H100 it was 0.42 of the 1B shape's 2.28 s). Only within
    # one decode call: n_batch must hold several ubatches. 1 (the default): each ubatch
    # estimates; 4 and 2 lost 7.9 and 5.5 points of full's greedy tokens on the dev split at
    # 8K (benchmarks/results/ubatch-dev-cpu/), though 4 made the 8B shape's prefill at 128K
    # 4.11x stock instead of 3.46x on the GPU. A larger n_ubatch estimates less often and
    # kept the fidelity there.
    prefill_reuse: int = 1

    # Phase 2, progressive KV compression in decoding (eviction.py says what each policy
    # does). A dialogue holds at most budget + interval cells; None = never evict. Policy None:
    # "loopserve" when a budget is given, else "full" (a budget alone asks for compression, and
    # "full" with a budget is refused rather than keeping every token unasked)
    policy: str | None = None
    budget: int | None = None
    # compress every `interval` generated tokens; None: default_interval(budget), about
    # budget // 16, so that a dialogue overshoots its budget by little while the fixed cost of
    # a compression is spread over more tokens at large budgets
    interval: int | None = None
    window: int = 4         # recent tokens whose attention scores the cache in decoding
    # an input's last tokens whose attention scores the cut after it (SnapKV's observation
    # window; in a chat turn they hold the reply's header and cue); None: `window`. 32 instead
    # of 4 changed nothing on the benchmark's dev split (default model, 2K, budget 1/8, with
    # defer_cut 4: -0.1 points [-1.5, +1.2]; benchmarks/results/chunk-probe-dev/; head-wise with
    # defer_cut 64: -0.8 [-2.6, +0.9], prefill-window-dev/; Gemma-3-270M, whose replies are
    # short: +0.02 [-4.90, +4.95] at 8K, -1.05 [-1.84, -0.35] at 16K, prefill-window-gemma-gpu/)
    prefill_window: int | None = None
    # loopserve: the cut after a prefill waits for the first `defer_cut` generated tokens and
    # is scored by them as well as by the input's last `window` tokens (0: cut as soon as the
    # prefill ends, scored by the input alone). The output says best what the reply needs:
    # None (the default) is 64, so that in ordinary short-reply chat the cut comes at the end
    # of the reply, scored by all of it. On the benchmark's dev split (default model, 2K,
    # budget 1/8, head-wise) 12 against 4 kept +3.8 points of full's greedy tokens [+2.2,
    # +5.6], 32 against 12 +2.1 [+0.8, +3.6] (benchmarks/results/defer-dev/), 64 against 32
    # +0.64 [+0.17, +1.11] (window-dev/); on the test split (H200, 2K-8K, budgets 1/8 and 1/4)
    # 64 against 32 kept +0.15 to +0.46 points, beyond the interval in 5 of 6 and with less KL
    # in all 6 (d64-test-gpu/). Much of each gain is the short replies decoded before the cut:
    # over the turns after the first alone, 64 and 32 are level, as 32 and 4 were
    # (later-turns-cpu/). It may exceed `interval`: the cut waits for it, and the periodic cuts
    # start after it. Until then the dialogue holds the whole input, as its prefill did, and
    # decodes over it (should the context fill first, the cut comes there: Evictor.make_room).
    defer_cut: int | None = None
    # of the `defer_cut` generated tokens the deferred cut waits for, how many (the first) score
    # it; None: all of them. A scored decode step costs more than a plain one (on the H200 +0.6
    # ms at 2304 cells, 1B shape: benchmarks/results/scored-step.md) and in short-reply chats
    # nearly every step of a reply is one of these. On the dev split 4 kept full's greedy token
    # as often as all 32 (-0.15 points [-0.72, +0.42]), on the test split they lost 1.3 points
    # [0.6, 1.9] and 0.030 of mean KL (benchmarks/results/defer-scored-dev/): so all by default.
    defer_scored: int | None = None
    # With flash attention a scored decode step saves its query rows (each scored layer's Q,
    # beside the layer's K) instead of scoring the cache in its own graph, and the saved rows
    # are scored together when a cut reads the scores: the same sums (against the same cells),
    # without a per-step read-back of n_kv x heads floats and its synchronize. False: every
    # scored step scores as it runs (the earlier way; for comparison).
    saved_queries: bool = True
    # Positions after a cut. "auto": once the highest position passes half the model's trained
    # context, a cut gives the kept cells consecutive positions again (their keys re-rotated,
    # as StreamingLLM does), so that positions stay within the trained range however long a
    # dialogue grows (past it a model no longer attends well); below that, kept tokens keep
    # their positions (compacting at every cut costs some fidelity: the history then sits
    # nearer the new tokens than it did). "always": at every cut; "never": gaps stay. Gemma 3's
    # window-sized window cache (which llama.cpp does not shift; the runtime does, keeping the
    # window whole): "auto" only when the next tokens would pass the trained context. A model
    # whose positions cannot be shifted is refused eviction past its trained context.
    compact_positions: str = "auto"
    # What a cut keeps: "cell", one set of tokens for every layer and KV head (chosen by their
    # scores aggregated); "head", each KV head of each full-attention layer its own `budget`
    # tokens by its own scores (SnapKV/Ada-KV style), moved together into `budget` cells so the
    # rest is freed. "head" needs f16, q8_0 or q4_0 K/V and flash attention (V not transposed); the
    # sliding-window layers of a model that has them (Gemma 3) keep the cells at the moved cells'
    # positions. Policies without scores (streaming) cut alike either way.
    granularity: str = "cell"
    # How a head-wise cut shares its tokens among the heads (allocation.py): "uniform", every
    # KV head `budget`; "pyramid" (PyramidKV), per layer, falling linearly from the first scored
    # layer to the last; "ada" (Ada-KV), per head within each layer by score mass, every head
    # keeping at least a fifth of its share. The heads then keep `budget` tokens on average
    # (beside the sinks and the recent cells, which every head keeps), but a cell holds a row for
    # every head: the dialogue keeps as many cells as the head that keeps the most (`cells`,
    # about twice the budget), and each head's rows beyond its own share are hidden from its
    # attention (llama_loopserve_seq_hide; each KV head then attends apart). Head granularity only.
    allocation: str = "uniform"
    # Budgeted prefill (an input longer than the free cells goes in as chunks, each cut back to
    # the budget): after each chunk but the last, the input's own last `chunk_probe` tokens are
    # decoded after it and removed again, and the chunk's cut is scored by the last
    # `prefill_window` of them, as the cut after a whole input is. A chunk's own last tokens
    # have not seen the question an input ends with; these have. 0: scored by the chunk's own
    # last tokens. Off for sliding-window models (the window cache would drop cells the next
    # chunk still needs).
    # Chosen on the benchmark's dev split (default model, 2K, budget 1/8, n_ctx 2x budget):
    # +10.0 points [+6.6, +13.6] of full's greedy tokens over 0 (chunk-probe-dev/)
    chunk_probe: int = 32
    sink: int = 4           # first cells, always kept
    # recent 16 and pooling 3 were no better on the dev split (head-wise, default model, 2K,
    # budget 1/8; pooling 3: KL +0.010 [+0.002, +0.017]; benchmarks/results/recent-pooling-dev/)
    recent: int = 64        # last cells, always kept
    pooling: int = 7        # smoothing kernel over positions (1 = none)
    # Cells kept in whole spans of this many consecutive cells (ChunkKV): each span between the
    # sinks and the recent cells, counted from the first cell after the sinks, ranks by the sum
    # of its raw scores (no pooling), and a cut keeps the best spans whole (of the last one it
    # reaches, the latest cells), so that a kept fact keeps its neighbours: a name with its
    # value, a number with all its digits. After a head-wise cut a head's cells hold its spans
    # in order, so later cuts see them on the same grid. 1 (the default): cells one by one by
    # their pooled scores. On the benchmark's dev split (default model, 2K, budget 1/8,
    # head-wise, 48 dialogues) 32 kept +1.35 points of full's greedy tokens [+0.02, +2.79],
    # level in KL and task score; 16 +1.10 [-0.34, +2.69], 8 +0.65, 4 -0.77 [-1.38, -0.16] on
    # 24 (benchmarks/results/chunk-dev/); on the test split (48) 32 only +0.75 [-0.39, +2.02],
    # 16 -0.03, and at budget 1/4 32 -0.38 [-1.51, +0.81] (span-test-cpu/): level, so not the
    # default. Uniform allocation only.
    span: int = 1
    aggregate: str = "mean"  # over layers and KV heads: mean | max
    # Where a head-wise cut chooses its cells: "auto" (and "off") on the host, in the runtime's
    # C++ on several threads, which measured faster than the device at every size (eviction.py
    # says where); "on" on a CUDA device through cupy (the optional extra
    # `loopserve-edge[cuda]`) where it is installed and sees one. Both choose the same cells.
    cupy_select: str = "auto"

    def __post_init__(self) -> None:
        if self.policy is None:
            object.__setattr__(self, "policy", "full" if self.budget is None else "loopserve")
        if self.interval is None:
            object.__setattr__(self, "interval", default_interval(self.budget or 1024))
        if self.prefill_window is None:
            object.__setattr__(self, "prefill_window", self.window)
        if self.max_resident < 1:
            raise ValueError("max_resident must be >= 1")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}")
        if self.compact_positions not in COMPACTIONS:
            raise ValueError(f"compact_positions must be one of {', '.join(COMPACTIONS)}")
        if self.aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATIONS)}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}")
        if self.allocation != "uniform" and self.granularity != "head":
            raise ValueError(f"allocation={self.allocation!r} shares a head-wise cut's tokens among the heads: "
                             f"it needs granularity='head'")
        if self.span < 1:
            raise ValueError("span must be >= 1")
        if self.span > 1 and self.allocation != "uniform":
            raise ValueError(f"span={self.span} keeps whole spans in every head's share alike: "
                             f"it needs allocation='uniform'")
        if self.cupy_select not in CUPY_SELECT:
            raise ValueError(f"cupy_select must be one of {', '.join(CUPY_SELECT)}")
        if min(self.interval, self.window, self.prefill_window, self.pooling) < 1 or \
                min(self.sink, self.recent, self.chunk_probe) < 0:
            raise ValueError("interval, window, prefill_window and pooling must be >= 1; "
                             "sink, recent and chunk_probe >= 0")
        if self.defer_cut is None:
            object.__setattr__(self, "defer_cut", 64)
        if self.defer_cut < 0:
            raise ValueError("defer_cut must be >= 0")
        if self.defer_scored is not None and self.defer_scored < 0:
            raise ValueError("defer_scored must be >= 0 or None")
        if self.budget is not None and self.budget < self.sink + self.recent + 1:
            raise ValueError(f"budget {self.budget} leaves no room beside sink={self.sink} and "
                             f"recent={self.recent} cells")
        if self.policy != "full" and self.budget is None:
            raise ValueError(f"policy {self.policy!r} needs a budget")
        if self.policy == "full" and self.budget is not None:
            raise ValueError(f"policy 'full' keeps every token and takes no budget ({self.budget}); "
                             f"give a policy that evicts ({', '.join(POLICIES[1:])}) or none (then loopserve)")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        if self.last_q < 1 or self.sparse_min_tokens < 2 or self.prefill_reuse < 1:
            raise ValueError("last_q and prefill_reuse must be >= 1 and sparse_min_tokens >= 2")
        if self.prefill_block is not None and self.prefill_block < 1:
            raise ValueError("prefill_block must be >= 1 or None")
        if min(self.min_vertical, self.min_slash, self.prefill_sink, self.local_window) < 0:
            raise ValueError("min_vertical, min_slash, prefill_sink and local_window must be >= 0")
        for lo, hi, what in ((self.min_vertical, self.max_vertical, "vertical"),
                             (self.min_slash, self.max_slash, "slash")):
            if hi is not None and hi < max(lo, 1):
                raise ValueError(f"max_{what} must be >= max(min_{what}, 1) or None")

    @property
    def cells(self) -> int | None:
        """Cells a dialogue keeps after a cut (it holds up to `interval` more between cuts):
        the budget, or with a non-uniform allocation the most any head keeps (its sinks,
        recent cells and at most twice the rest of the budget, less PyramidKV's last layer's
        share)."""
        if self.budget is None or self.allocation == "uniform":
            return self.budget
        free = self.budget - self.sink - self.recent
        return self.sink + self.recent + 2 * free - free // PYRAMID_BETA

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopServeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
