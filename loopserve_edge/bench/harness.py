"""Runs methods on the same dialogues and records one JSON line per (dialogue, method).

Output folder:
  bench.json      what was asked (model, runtime, options); a folder holds one model's runs
  cases.jsonl     the dialogues (user turns, reference answers), one a line
  runs.jsonl      one line per (case, method label): replies, scores, fidelity, costs
  refs/ID.npz     full attention's next-token distributions along its replies (top-k)
  summary.md/csv  and plots/*.png, rewritten at the end (report.py)

Resumable: a (case, label) already in runs.jsonl for the same dialogue text is not run
again. `full` runs first on every dialogue; every other method is scored and
teacher-forced against it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .. import chat_template
from ..context import kv_type_kwargs
from ..errors import LoopServeError
from ..model_file import check_model_file
from . import data, fidelity
from .dialogues import POSITIONS, Case, Tokens
from .levels import levels_for, model_key
from .methods import METHODS, Run, expand
from .scoring import score
from .data import SPLITS
from .tasks import FORMATS, TASKS, generate_all


class BenchError(LoopServeError):
    """A benchmark request that cannot run (unknown task or method, another model's folder)."""


@dataclass
class BenchSpec:
    model: str
    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = ("full", "streaming", "snapkv", "h2o", "loopserve")
    ctxs: tuple[int, ...] = (1024,)
    turns: int = 2
    budgets: tuple[int, ...] = (256,)
    alphas: tuple[float, ...] = (0.95,)
    seed: int = 0
    cases_per_task: int = 2
    split: str = "dev"           # which half of the shared data and seeds (data.SPLITS)
    levels: str | None = None    # a difficulty file of calibrate.py (None: each family's defaults)
    prompt_format: str = "auto"  # chat | completion | auto (chat when the GGUF has a template)
    positions: tuple[str, ...] | None = None
    fidelity: bool = True
    top_k: int = 64
    n_gpu_layers: int = 0
    threads: int | None = None
    flash_attn: bool = False
    command: str = ""

    def check(self) -> None:
        """Every fault the user can fix, before anything is loaded."""
        for t in self.tasks:
            if t not in TASKS:
                raise BenchError(f"unknown task {t!r}; choose from {', '.join(TASKS)} (or all)")
        for m in self.methods:
            if m not in METHODS:
                raise BenchError(f"unknown method {m!r}; choose from {', '.join(METHODS)} (or all)")
        for p in self.positions or ():
            if p not in POSITIONS:
                raise BenchError(f"unknown question position {p!r}; choose from {', '.join(POSITIONS)}")
        if not self.tasks or not self.ctxs:
            raise BenchError("no tasks or no context lengths to run")
        if self.split not in SPLITS:
            raise BenchError(f"unknown split {self.split!r}; choose from {', '.join(SPLITS)}")
        if self.prompt_format not in ("auto",) + FORMATS:
            raise BenchError(f"unknown prompt format {self.prompt_format!r}; choose from auto, {', '.join(FORMATS)}")
        if self.turns < 1 or self.cases_per_task < 1:
            raise BenchError("--turns and --cases-per-task must be at least 1")
        if min(self.ctxs) < 256:
            raise BenchError("--ctx must be at least 256 tokens")
        for b in self.budgets:
            if not (b >= 1 or 0 < b < 1):
                raise BenchError(f"budget {b} must be a number of cells or a fraction of the context (1/8)")
        for a in self.alphas:
            if not 0.0 < a <= 1.0:
                raise BenchError(f"alpha {a} must be in (0, 1]")
        for r in (r for ctx in self.ctxs for r in self.runs(ctx)):
            try:
                r.config()
            except ValueError as e:
                if r.unavailable() != "sparse prefill not implemented":
                    raise BenchError(f"{r.label}: {e}") from None
        check_model_file(self.model)
        data.check_data()
        if self.levels is not None:
            read_levels(self.levels)

    def one_kernel(self) -> "BenchSpec":
        """This spec with flash attention on when a method needs it: then every run has it,
        `full` too, since each method's fidelity is measured against `full`'s tokens and the
        two kernels round apart (on the CPU, SmolLM2 at 2K, a head-wise method's first replies,
        decoded over the uncut input, kept 97.2% of the greedy tokens of a `full` without flash
        attention and 100% of one with it: the method was charged for nothing it cut)."""
        if self.flash_attn or not any(METHODS[m].needs_flash_attn for m in self.methods):
            return self
        return replace(self, flash_attn=True)

    def budgets_for(self, ctx: int) -> list[int]:
        """The budgets at a context length: cells as given, fractions (< 1) of `ctx`."""
        return list(dict.fromkeys(int(b) if b >= 1 else max(1, round(b * ctx)) for b in self.budgets))

    def runs(self, ctx: int) -> list[Run]:
        return expand(self.methods, self.budgets_for(ctx), self.alphas)

    def to_dict(self) -> dict:
        return asdict(self)


# -- memory ---------------------------------------------------------------------------

def reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS count (VmHWM), so a peak is per case."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError):
        return None


# -- one dialogue -----------------------------------------------------------------------

def _turn_record(stats, reply: str) -> dict:
    d = stats.to_dict()
    keep = ("prompt_tokens", "reused_tokens", "prefilled_tokens", "ttft_s", "decode_tokens",
            "decode_tps", "kv_cells", "kv_evicted", "evict_s", "finish_reason")
    out = {k: d[k] for k in keep}
    out["reply"] = reply
    return out


def run_dialogue(llm, case: Case, run: Run, *, full: dict | None = None,
                 refs: list | None = None, top_k: int = 64) -> tuple[dict, list | None]:
    """Play one dialogue greedily with `llm` (configured for `run`). Returns the record and,
    for `full`, its next-token distributions per turn (the reference for the others).
    `full`'s record scores open generation; `refs` (None: no fidelity) are forced along."""
    is_full = run.method.name == "full"
    fmt = case.meta.get("format", "chat")
    reset_peak_rss()
    t0 = time.perf_counter()
    dlg = llm.dialogue(system=case.system)
    turns, recorders = [], []
    try:
        for i, t in enumerate(case.turns):
            rec = fidelity.GreedyRecorder(top_k) if is_full or refs is not None else None
            reply = dlg.send(t.user, max_tokens=t.max_tokens, temperature=0, token_fn=rec,
                             reply_prefix=t.reply_prefix(fmt))
            tr = _turn_record(dlg.last_stats, reply)
            # share of the causal attention the prefill computed (1: dense, also for
            # prompts too short for the sparse path)
            density = getattr(dlg.last_stats, "prefill_density", None)
            tr["prefill_density"] = 1.0 if density is None else density
            tr["sparse_tokens"] = getattr(dlg.last_stats, "sparse_tokens", 0)
            recorders.append(rec)
            if t.scorer is not None:
                full_reply = reply if is_full else (full["turns"][i]["reply"] if full and "turns" in full else None)
                tr["score"] = (score(t.scorer, reply, t.answers, t.choices, full_reply)
                               if t.scorer != "rouge_full" or full_reply is not None else None)
            turns.append(tr)
        # what a save would write, counted without writing it (1 GB a dialogue at 32K)
        state_bytes = dlg.state_size()
    finally:
        dlg.close()
    record = {"turns": turns, "state_bytes": state_bytes, "peak_rss_mb": peak_rss_mb()}
    scored = [tr["score"] for tr in turns if tr.get("score") is not None]
    record["score"] = sum(scored) / len(scored) if scored else None
    if refs is not None and not is_full:
        same_run = [rec.forced_along(steps) for rec, steps in zip(recorders, refs)]
        if all(f is not None for f in same_run):  # replied as full did: no second pass
            record["fidelity"] = dict(fidelity.summary(same_run), second_pass=False)
        else:
            record["fidelity"] = dict(teacher_forced(llm, case, refs), second_pass=True)
    record["wall_s"] = time.perf_counter() - t0
    return record, ([rec.steps for rec in recorders] if is_full else None)


def teacher_forced(llm, case: Case, refs: list) -> dict:
    """Replay full attention's replies in a new dialogue and compare each step's
    distribution with full's."""
    dlg = llm.dialogue(system=case.system)
    forcers = []
    try:
        for t, steps in zip(case.turns, refs):
            f = fidelity.TeacherForcer(steps)
            dlg.send(t.user, max_tokens=len(steps), token_fn=f,
                     reply_prefix=t.reply_prefix(case.meta.get("format", "chat")))
            forcers.append(f)
    finally:
        dlg.close()
    return fidelity.summary(forcers)


# -- the folder -------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted run: that case reruns
    return out


def append_jsonl(path: Path, obj: dict) -> None:
    cut = False
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(obj) + "\n")  # after a line cut short
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Folder:
    root: Path
    records: dict = field(default_factory=dict)   # (case id, label) -> record

    def __post_init__(self):
        self.root = Path(self.root)
        self.refs_dir = self.root / "refs"
        for r in read_jsonl(self.root / "runs.jsonl"):
            self.records[(r["case"], r["method"])] = r

    def done(self, case: Case, label: str, need_refs: bool = False) -> dict | None:
        """The record of this run on this very dialogue, if any (for `full` with
        need_refs, only when its distributions are stored too)."""
        r = self.records.get((case.id, label))
        if r is None or r.get("digest") != case.digest():
            return None
        if need_refs and label == "full" and "error" not in r and not self.ref_path(case).exists():
            return None
        return r

    def ref_path(self, case: Case) -> Path:
        return self.refs_dir / f"{case.id}.npz"

    def add(self, record: dict) -> None:
        append_jsonl(self.root / "runs.jsonl", record)
        self.records[(record["case"], record["method"])] = record

    def write_cases(self, cases: list[Case]) -> None:
        known = {c["id"]: c for c in read_jsonl(self.root / "cases.jsonl")}
        known.update({c.id: c.to_dict() for c in cases})
        tmp = self.root / "cases.jsonl.tmp"
        with open(tmp, "w") as f:
            for c in known.values():
                f.write(json.dumps(c) + "\n")
        tmp.replace(self.root / "cases.jsonl")


def claim_folder(out: Path, spec: BenchSpec, fingerprint: str, runtime: dict, fmt: str) -> None:
    """Create the folder, or check that it holds runs of the same model, split and prompt
    format (a summary never mixes them)."""
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "bench.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("fingerprint") != fingerprint:
            raise BenchError(f"{out} holds runs of another model ({old.get('spec', {}).get('model')}); "
                             "use another --out")
        theirs = (old.get("spec", {}).get("split", "dev"), old.get("prompt_format", fmt))
        if theirs != (spec.split, fmt):
            raise BenchError(f"{out} holds runs of the {theirs[0]} split in the {theirs[1]} format; "
                             f"this run is {spec.split}/{fmt}: use another --out")
        their_fa = bool(old.get("spec", {}).get("flash_attn", False))
        if their_fa != spec.flash_attn:
            on = ("off", "on")
            raise BenchError(f"{out} holds runs with flash attention {on[their_fa]}, this run has it "
                             f"{on[spec.flash_attn]} (a head-wise or quantized-K/V method turns it on for every "
                             "run, full too): use another --out, or --flash-attn in every call")
    meta = {"spec": spec.to_dict(), "fingerprint": fingerprint, "runtime": runtime,
            "prompt_format": fmt, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")


def llama_kwargs(spec: BenchSpec, run: Run, n_ctx: int) -> dict:
    """Prompts go in batches of 2048 tokens, computed in ubatches of 512 (as the other
    benchmarks do), or of 2048 with sparse prefill: its path runs only on ubatches of at
    least `sparse_min_tokens` (Llama's own default with it on). Head-wise cuts need flash
    attention (V not transposed): their runs have it whatever the spec says, as do runs with
    quantized K/V (Method.kv_type); run_bench gives it to every run of such a call
    (BenchSpec.one_kernel). A budgeted-prefill
    method (Method.pool) gets a context of `pool` times its budget instead of the dialogue's.
    With `prefill_reuse` an input goes in one batch (its ubatches the same 2048), as a stored
    selection serves only the ubatches of one decode call. A method's own `ubatch` replaces the
    2048 (and the batch holds one)."""
    options = dict(run.method.options)
    if run.method.pool and run.budget:
        n_ctx = min(n_ctx, run.method.pool * run.budget)
    ubatch = (run.method.ubatch or 2048) if run.method.sparse_prefill else 512
    n_batch = max(2048, n_ctx) if options.get("prefill_reuse", 1) > 1 else max(2048, ubatch)
    kw = dict(n_ctx=n_ctx, n_gpu_layers=spec.n_gpu_layers, n_threads=spec.threads,
              flash_attn=spec.flash_attn or run.method.needs_flash_attn, n_batch=n_batch, n_ubatch=ubatch)
    if run.method.kv_type != "f16":
        kw.update(kv_type_kwargs(run.method.kv_type, flash_attn=True))
    return kw


def resolve_format(requested: str, metadata: dict) -> str:
    """`auto`: the chat format for a GGUF that carries a chat template (an instruction-tuned
    model), the completion format with worked examples for one that does not (a base model)."""
    return chat_template.resolve_format(requested, metadata.get("tokenizer.chat_template"))


def read_levels(path: str) -> dict:
    try:
        levels = json.loads(Path(path).read_text())
        levels["levels"], levels["model"]
    except OSError as e:
        raise BenchError(f"{path}: cannot read the levels file ({e.strerror})") from None
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"{path}: not a levels file of loopserve_edge.bench.calibrate") from None
    return levels


def make_cases(spec: BenchSpec) -> tuple[dict[int, list[Case]], str, str]:
    """The dialogues for every context length, the model's fingerprint and the prompt
    format they are written in."""
    from ..config import LoopServeConfig
    from ..llama import Llama

    with Llama(spec.model, loopserve=LoopServeConfig(max_resident=1), n_ctx=256,
               n_threads=spec.threads) as probe:
        fmt = resolve_format(spec.prompt_format, probe.metadata)
        key = model_key(probe.metadata)
    levels = read_levels(spec.levels) if spec.levels else None
    if levels and levels["model"] != key:
        raise BenchError(f"{spec.levels} was calibrated for {levels['model']}, not for this model ({key})")
    with Llama(spec.model, loopserve=LoopServeConfig(max_resident=1), n_ctx=256,
               n_threads=spec.threads, prompt_format=fmt) as llm:
        tokens = Tokens(llm)
        cases = {ctx: generate_all(spec.tasks, ctx=ctx, turns=spec.turns, seed=spec.seed,
                                   cases_per_task=spec.cases_per_task, tokens=tokens,
                                   positions=spec.positions, split=spec.split, fmt=fmt,
                                   levels=levels_for(levels, ctx))
                 for ctx in spec.ctxs}
        return cases, llm.fingerprint, fmt


def run_bench(spec: BenchSpec, out: Path, progress=None, log=print) -> Folder:
    """Run what is not done yet. progress(total) -> a context manager with update(n)
    (e.g. click.progressbar); log(line) tells what is not run and why."""
    from .. import runtime_info

    spec.check()
    one = spec.one_kernel()
    if one is not spec:
        log("flash attention on for every run: a method needs it, and full is the reference")
    spec = one
    out = Path(out)
    cases, fp, fmt = make_cases(spec)
    runs = {ctx: [] for ctx in spec.ctxs}
    for ctx in spec.ctxs:
        for r in spec.runs(ctx):
            why = r.unavailable()
            if why:
                log(f"{r.label}: n/a ({why})")
            else:
                runs[ctx].append(r)
    claim_folder(out, spec, fp, runtime_info(), fmt)
    folder = Folder(out)
    folder.refs_dir.mkdir(exist_ok=True)
    folder.write_cases([c for cs in cases.values() for c in cs])
    # full first on each context length: the others are compared with it
    pending = [(ctx, r, [c for c in cs if not folder.done(c, r.label, need_refs=spec.fidelity)])
               for ctx, cs in cases.items() for r in runs[ctx]]
    total = sum(len(runs[ctx]) * len(cs) for ctx, cs in cases.items())
    n_pending = sum(len(cs) for _, _, cs in pending)
    if n_pending < total:
        log(f"resuming: {total - n_pending} of {total} runs already done in {out}")
    with (progress(n_pending) if progress else _NoBar()) as bar:
        for ctx, r, cs in pending:
            if cs:
                _run_method(spec, folder, ctx, r, cs, bar, fmt)
    return folder


def _run_method(spec: BenchSpec, folder: Folder, ctx: int, run: Run, cases: list[Case], bar,
                fmt: str) -> None:
    from ..llama import Llama

    with Llama(spec.model, loopserve=run.config(), prompt_format=fmt, **llama_kwargs(spec, run, ctx)) as llm:
        warm = llm.dialogue()
        warm.send("Hello.", max_tokens=2, temperature=0)  # allocation, graph capture
        warm.close()
        for case in cases:
            full = folder.done(case, "full")
            refs = None
            if run.method.name != "full" and spec.fidelity and full and folder.ref_path(case).exists():
                refs = fidelity.load_refs(folder.ref_path(case))
            base = {"case": case.id, "digest": case.digest(), "task": case.task,
                    "position": case.position, "ctx": ctx, "method": run.label,
                    "method_name": run.method.name, "budget": run.budget, "alpha": run.alpha}
            try:
                record, my_refs = run_dialogue(llm, case, run, full=full, refs=refs, top_k=spec.top_k)
            except LoopServeError as e:
                record, my_refs = {"error": str(e), "score": None}, None
            if my_refs is not None:
                fidelity.save_refs(folder.ref_path(case), my_refs)
            folder.add(dict(base, **record))
            bar.update(1)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass
