"""The benchmark summary's statistics: bootstrap intervals over cases (bench/stats.py), and
the paired comparisons and marks of the summary (bench/report.py), on records made here
(no model)."""
from __future__ import annotations

import csv
import json

import loopserve_edge  # noqa: F401  (before numpy: see conftest.py)
import numpy as np
import pytest

from loopserve_edge.bench import stats
from loopserve_edge.bench.harness import BenchSpec
from loopserve_edge.bench.methods import METHODS
from loopserve_edge.bench.report import ALL, COLUMNS, CaseRef, markdown, summarise, write_report

# -- intervals ---------------------------------------------------------------------------


def test_no_values_one_value_and_no_spread():
    assert stats.mean_ci([]) is None and stats.mean_ci([None, None]) is None
    assert stats.mean_ci([0.7]) == (0.7, 0.7, 0.7)
    assert stats.mean_ci([None, 0.25, None]) == (0.25, 0.25, 0.25)
    m, lo, hi = stats.mean_ci([0.4] * 7)          # every resample is the sample itself
    assert m == pytest.approx(0.4) and lo == m == hi


def test_zero_one_sample():
    values = [1] * 7 + [0] * 3
    m, lo, hi = stats.mean_ci(values)
    assert m == pytest.approx(0.7)
    assert 0 <= lo < m < hi <= 1
    # standard error sqrt(0.7 * 0.3 / 10) = 0.145: a 95% interval about 4 of them wide
    assert 0.4 < hi - lo < 0.7
    assert stats.mean_ci(values) == (m, lo, hi)                  # seeded: the same again
    assert stats.mean_ci(values, seed=1) != (m, lo, hi)
    narrow = stats.mean_ci(values, level=0.5)
    assert lo < narrow[1] < m < narrow[2] < hi


@pytest.mark.parametrize("level", [0.95, 0.5])
def test_coverage_of_the_true_mean(level):
    """Over many samples of 40 from uniform(0, 1), the interval holds 0.5 about `level` of
    the time (a percentile bootstrap is a little short at small n)."""
    rng = np.random.default_rng(123)
    reps = 1000
    hits = sum(lo <= 0.5 <= hi for _, lo, hi in
               (stats.mean_ci(rng.uniform(size=40), n_boot=1000, seed=k, level=level)
                for k in range(reps)))
    assert abs(hits / reps - level) < 0.05, hits / reps


def test_paired_difference():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=20)
    assert stats.paired_diff_ci(a, a.copy()) == (0.0, 0.0, 0.0)
    # b is a, 0.1 lower: the cases differ far more between them than the methods do, so
    # separate intervals overlap while the paired one excludes 0
    b = a - 0.1 + rng.normal(0, 0.02, size=20)
    d, lo, hi = stats.paired_diff_ci(a, b)
    assert d == pytest.approx(0.1, abs=0.02) and 0 < lo < d < hi
    assert stats.direction((d, lo, hi)) == 1 and stats.direction(stats.paired_diff_ci(b, a)) == -1
    _, _, a_hi = stats.mean_ci(a)
    _, b_lo, _ = stats.mean_ci(b)
    assert b_lo < a_hi   # overlap
    # only the cases both have; n = 1 is the point
    assert stats.paired_diff_ci({"x": 1.0, "y": 0.0, "z": 1.0}, {"x": 0.0, "y": 0.0, "w": 5.0})[0] == 0.5
    assert stats.paired_diff_ci([0.5, None], [0.25, 1.0]) == (0.25, 0.25, 0.25)
    assert stats.paired_diff_ci([], []) is None


def test_direction():
    assert stats.direction((0.1, 0.05, 0.2)) == 1
    assert stats.direction((-0.1, -0.2, -0.01)) == -1
    assert stats.direction((0.1, -0.01, 0.2)) == 0
    assert stats.direction((0.0, 0.0, 0.0)) == 0 and stats.direction(None) == 0


def test_stratified_mean_is_the_mean_of_group_means():
    x = [1, 1, 1, 1, 0, 0, 0, 0]        # mean 0.5
    y = [1, 1]                          # mean 1, no spread
    m, lo, hi = stats.stratified_ci({"x": x, "y": y})
    assert m == pytest.approx(0.75)     # not the pooled 0.6: each group weighs the same
    # y never moves, so the interval is x's (same seed, drawn first), halfway to 1
    _, x_lo, x_hi = stats.mean_ci(x)
    assert (lo, hi) == pytest.approx(((x_lo + 1) / 2, (x_hi + 1) / 2))
    assert stats.stratified_ci({"x": [], "y": [None]}) is None
    assert stats.stratified_ci({"x": x, "y": []}) == stats.mean_ci(x)
    # paired, within strata: the strata's mean differences averaged
    d = stats.paired_diff_ci([1, 1, 0, 1], [0, 0, 0, 1], strata=["p", "p", "q", "q"])
    assert d[0] == pytest.approx((1 + 0) / 2) and d[1] <= d[0] <= d[2]


# -- the summary's marks -----------------------------------------------------------------

TASKS = ("passkey", "kv_retrieval")
N = 12


def _spec(**kw) -> BenchSpec:
    return BenchSpec(**{**dict(model="fake.gguf", tasks=TASKS, ctxs=(1024,), budgets=(128,), cases_per_task=N,
                               methods=("full", "streaming", "snapkv", "loopserve", "loopserve-defer")), **kw})


def _record(case: CaseRef, method: str, score: float | None, same_greedy: float | None = None) -> dict:
    r = {"case": case.id, "digest": "d", "task": case.task, "ctx": case.ctx, "method": method,
         "turns": [{"ttft_s": 0.5, "decode_tps": 20.0, "decode_tokens": 8, "kv_cells": 900,
                    "prefill_density": 1.0}] * 2,
         "state_bytes": 10**6, "peak_rss_mb": 300.0, "score": score}
    if same_greedy is not None:
        r["fidelity"] = {"same_greedy": same_greedy, "mean_kl": 1 - same_greedy, "steps": 20}
    return r


def _bench():
    """full scores 0.5-1 per case; snapkv (the best baseline) and loopserve score as full
    does, streaming and loopserve-defer clearly lower; loopserve's same-greedy share is
    clearly above snapkv's; loopserve-defer failed on one case."""
    rng = np.random.default_rng(7)
    cases = [CaseRef(f"{t}-{i}", 1024, t) for t in TASKS for i in range(N)]
    records = []
    for k, c in enumerate(cases):
        full = float(rng.uniform(0.5, 1.0))
        snap = float(rng.uniform(0.6, 0.85))
        records += [_record(c, "full", full),
                    _record(c, "streaming@128", full - 0.4, 0.3),
                    _record(c, "snapkv@128", full, snap),
                    _record(c, "loopserve@128", full, snap + 0.1)]
        records.append({"case": c.id, "digest": "d", "task": c.task, "ctx": 1024, "method": "loopserve-defer@128",
                        "error": "failed", "score": None} if k == 0 else
                       _record(c, "loopserve-defer@128", full - 0.3, snap))
    return cases, records


def _rows():
    cases, records = _bench()
    return {(r.task, r.method): r for r in summarise(_spec(), cases, records)}


def test_baselines_are_the_prior_methods():
    assert {m for m, x in METHODS.items() if x.baseline} == {"streaming", "snapkv", "h2o", "snapkv-head", "h2o-head",
                                                            "streaming-chunked", "snapkv-chunked",
                                                            "snapkv-head-chunked", "pyramidkv", "ada-snapkv"}


def test_summary_marks_differences_beyond_the_interval():
    rows = _rows()
    for task in TASKS + (ALL,):
        full, stream, snap = rows[(task, "full")], rows[(task, "streaming@128")], rows[(task, "snapkv@128")]
        loop, defer = rows[(task, "loopserve@128")], rows[(task, "loopserve-defer@128")]
        assert full.score_lo < full.score < full.score_hi and full.score_marks == ""
        assert stream.score_marks == "↓" and stream.score_minus_full == pytest.approx(-0.4)
        assert stream.score_baseline is None                     # a baseline itself
        assert snap.score_marks == "" and snap.score_minus_full_lo == snap.score_minus_full_hi == 0
        assert loop.score_baseline == "snapkv@128" and loop.score_marks == ""
        assert loop.same_greedy_baseline == "snapkv@128" and loop.same_greedy_marks == "+"
        assert loop.same_greedy_minus_baseline == pytest.approx(0.1)
        assert defer.score_marks == "↓−" and defer.same_greedy_marks == ""
        assert defer.score_minus_baseline_hi < 0
    # the failed case: out of loopserve-defer's cells, and the rest still paired
    defer = rows[(TASKS[0], "loopserve-defer@128")]
    assert (defer.cases, defer.errors, defer.score_n, defer.fidelity_n) == (N, 1, N - 1, N - 1)
    total = rows[(ALL, "loopserve-defer@128")]
    assert total.score_n == 2 * N - 1
    # 'all tasks': the mean of the task means (the tasks have 11 and 12 cases)
    assert total.score == pytest.approx(np.mean([rows[(t, "loopserve-defer@128")].score for t in TASKS]))


def _table(md: str, heading: str) -> dict[str, dict[str, str]]:
    """task -> column -> cell of the first table after a line starting with `heading`."""
    lines = md.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(heading))
    head = next(i for i in range(start, len(lines)) if lines[i].startswith("| task |"))
    cols = [x.strip() for x in lines[head].strip("|").split("|")]
    out = {}
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = [x.strip() for x in line.strip("|").split("|")]
        out[cells[0].strip("*")] = dict(zip(cols, cells))
    return out


def test_markdown_shows_intervals_marks_and_cases():
    cases, records = _bench()
    md = markdown(_spec(), {}, summarise(_spec(), cases, records))
    assert "↓/↑ below/above `full`" in md and "`streaming`, `snapkv`" in md
    score = _table(md, "Task score")
    row = score["passkey"]
    assert row["cases"] == str(N) and score[ALL]["cases"] == str(2 * N)
    assert row["streaming@128"].endswith("↓") and "[" in row["streaming@128"]
    assert not any(m in row["snapkv@128"] for m in "↓↑+−") and row["snapkv@128"].endswith("(100%)")
    assert not any(m in row["loopserve@128"] for m in "↓↑+−")
    assert row["loopserve-defer@128"].endswith("↓− n=11")
    assert score[ALL]["loopserve-defer@128"].endswith("↓− n=23")
    lo_hi = row["full"].split("[")[1].rstrip("]").split(", ")
    assert float(lo_hi[0]) < float(row["full"].split()[0]) < float(lo_hi[1])
    fid = _table(md, "Fidelity")
    assert "full" not in fid["passkey"] and fid["passkey"]["loopserve@128"].endswith("+")
    assert fid["passkey"]["snapkv@128"].count("[") == 2                # share and KL intervals
    assert not any(m in fid["passkey"]["loopserve-defer@128"].split(" n=")[0] for m in "+−")
    assert "| method | TTFT turn 1 ms |" in md                          # the cost table stays


def test_a_folder_filled_by_several_calls_shows_the_budgets_each_method_ran():
    """Two calls into one folder, `snapkv` at 128 and `loopserve` at 256: the folder's spec lists
    both methods at both budgets, and the tables show only what ran (a method with no runs at
    all keeps its column)."""
    cases, records = _bench()
    records = [r for r in records if r["method"] in ("full", "snapkv@128")]
    records += [dict(r, method="loopserve@256") for r in records if r["method"] == "snapkv@128"]
    spec = _spec(budgets=(128, 256))
    labels = {r.method for r in summarise(spec, cases, records)}
    assert labels == {"full", "snapkv@128", "loopserve@256", "streaming@128", "streaming@256",
                      "loopserve-defer@128", "loopserve-defer@256"}
    assert set(_table(markdown(spec, {}, summarise(spec, cases, records)), "Task score")["passkey"]) == \
        {"task", "cases"} | labels


def test_write_report_appends_the_new_csv_columns(tmp_path):
    cases, records = _bench()
    (tmp_path / "bench.json").write_text(json.dumps({"spec": _spec().to_dict(), "runtime": {}}))
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_report(tmp_path, log=lambda m: None)
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert ",".join(rows[0]).startswith("ctx,task,method") and tuple(rows[0]) == COLUMNS
    assert COLUMNS.index("score_lo") > COLUMNS.index("prefill_density")   # appended at the end
    assert len(rows) == 1 + 5 * 3
    by = {(r[1], r[2]): dict(zip(COLUMNS, r)) for r in rows[1:]}
    assert by[("passkey", "streaming@128")]["score_marks"] == "↓"
    assert by[("passkey", "loopserve@128")]["same_greedy_marks"] == "+"
    r = by[(ALL, "loopserve-defer@128")]
    assert float(r["score_lo"]) <= float(r["score"]) <= float(r["score_hi"])
    assert float(r["score_minus_full_hi"]) < 0 and r["score_baseline"] == "snapkv@128"
    assert (tmp_path / "plots" / "score_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
