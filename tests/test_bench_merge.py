"""benchmarks/bench_merge.py: folders of the same cases, other methods, put back together."""
import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_merge", Path(__file__).parents[1] / "benchmarks" / "bench_merge.py")
bench_merge = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_merge)


def part(path, methods, replies="ok", cases=("c1", "c2"), split="test"):
    path.mkdir()
    meta = {"fingerprint": "f", "prompt_format": "chat",
            "spec": {"model": "m", "tasks": ["passkey"], "split": split, "methods": ["full", *methods],
                     "command": f"bench --methods full,{','.join(methods)}"}}
    (path / "bench.json").write_text(json.dumps(meta))
    (path / "cases.jsonl").write_text("".join(json.dumps({"id": c}) + "\n" for c in cases))
    runs = [{"case": c, "method": m, "turns": [{"reply": replies if m == "full" else "x"}]}
            for c in cases for m in ["full", *methods]]
    (path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    return path


def test_parts_merge_into_one_folder(tmp_path):
    a = part(tmp_path / "a", ["streaming@256"])
    b = part(tmp_path / "b", ["snapkv@256", "h2o@256"])
    assert bench_merge.merge(tmp_path / "all", [a, b]) == 2 * 4
    runs = bench_merge.lines(tmp_path / "all" / "runs.jsonl")
    assert sorted({r["method"] for r in runs}) == ["full", "h2o@256", "snapkv@256", "streaming@256"]
    assert sum(r["method"] == "full" for r in runs) == 2          # full once, from the first part
    meta = json.loads((tmp_path / "all" / "bench.json").read_text())
    assert meta["spec"]["methods"] == ["full", "streaming@256", "snapkv@256", "h2o@256"]
    assert [m["folder"] for m in meta["merged_from"]] == [str(a), str(b)]


@pytest.mark.parametrize("bad,why", [
    (dict(replies="other"), "full's replies differ"),
    (dict(cases=("c1", "c3")), "other cases"),
    (dict(split="dev"), "spec"),
])
def test_parts_that_do_not_share_one_reference_are_refused(tmp_path, bad, why):
    a = part(tmp_path / "a", ["streaming@256"])
    b = part(tmp_path / "b", ["snapkv@256"], **bad)
    with pytest.raises(SystemExit, match=why):
        bench_merge.merge(tmp_path / "all", [a, b])
    assert not (tmp_path / "all").exists()   # nothing half-merged


def test_a_method_in_two_parts_is_refused(tmp_path):
    a = part(tmp_path / "a", ["streaming@256"])
    b = part(tmp_path / "b", ["streaming@256"])
    with pytest.raises(SystemExit, match="also in another folder"):
        bench_merge.merge(tmp_path / "all", [a, b])
