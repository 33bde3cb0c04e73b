"""benchmarks/bench_groups.py: configurations side by side, `full` once per configuration,
groups seeded with it, merged at the end, resumed by the same command."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_groups.py"
ARGS = ["--ctx", "1024", "--turns", "2", "--cases-per-task", "1", "--tasks", "passkey", "--budgets", "128"]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def groups(jobs, root, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), str(jobs), "--root", str(root), "--threads", "2", *extra],
                          capture_output=True, text=True, timeout=900)


def test_full_runs_once_and_the_groups_merge(default_model, tmp_path):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"name": "c", "model": str(default_model), "args": ARGS,
                                 "groups": [["streaming"], ["snapkv"]]}]))
    r = groups(jobs, tmp_path, "--no-plots")
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob("*/plots"))      # every process's report and the merged one
    full = lines(tmp_path / "bench-c-full" / "runs.jsonl")
    assert [x["method"] for x in full] == ["full"]
    for i, method in enumerate(["streaming@128", "snapkv@128"]):
        mine = lines(tmp_path / f"bench-c-{i}" / "runs.jsonl")
        assert mine[0] == full[0]                   # seeded, not run again
        assert [x["method"] for x in mine[1:]] == [method]
        assert "resuming: 1 of 2 runs already done" in (tmp_path / f"bench-c-{i}.log").read_text()
    merged = lines(tmp_path / "merged-c" / "runs.jsonl")
    assert sorted(x["method"] for x in merged) == ["full", "snapkv@128", "streaming@128"]
    assert "| passkey |" in (tmp_path / "merged-c" / "summary.md").read_text()
    assert "c: 3 runs merged into merged-c" in r.stdout

    # the same command again (a later lease): every folder resumed, nothing run twice; a group
    # folder brought back without the dialogues and full's distributions gets them from full's
    shutil.rmtree(tmp_path / "bench-c-1" / "refs")
    (tmp_path / "bench-c-1" / "cases.jsonl").unlink()
    again = groups(jobs, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "c-full started (1 runs already in bench-c-full)" in again.stdout
    assert len(lines(tmp_path / "merged-c" / "runs.jsonl")) == 3
    assert len(lines(tmp_path / "bench-c-1" / "runs.jsonl")) == 2 and (tmp_path / "bench-c-1" / "refs").is_dir()
    if importlib.util.find_spec("matplotlib"):      # with plots this time
        assert list((tmp_path / "merged-c" / "plots").glob("*.png"))
    status = groups(jobs, tmp_path, "--status")
    assert status.stdout.split("\n")[:3] == ["bench-c-full: 1 runs", "bench-c-0: 2 runs", "bench-c-1: 2 runs"]


def test_full_in_shards_is_joined_and_the_groups_resume_past_it(default_model, tmp_path):
    args = [*ARGS[:ARGS.index("--tasks")], "--tasks", "passkey,variable_tracking", "--budgets", "128"]
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"name": "c", "model": str(default_model), "args": args,
                                 "groups": [["streaming"]], "full_shards": 2}]))
    r = groups(jobs, tmp_path, "--no-plots")
    assert r.returncode == 0, r.stderr
    assert "c: 2 full shards joined (2 runs)" in r.stdout
    for k, task in enumerate(["passkey", "variable_tracking"]):   # each shard its share of the tasks
        mine = lines(tmp_path / f"bench-c-full.{k}" / "runs.jsonl")
        assert [x["task"] for x in mine] == [task] and [x["method"] for x in mine] == ["full"]
    full = tmp_path / "bench-c-full"
    assert len(lines(full / "runs.jsonl")) == 2 and len(lines(full / "cases.jsonl")) == 2
    assert len(list((full / "refs").glob("*.npz"))) == 2
    assert "resuming: 2 of 4 runs already done" in (tmp_path / "bench-c-0.log").read_text()
    merged = lines(tmp_path / "merged-c" / "runs.jsonl")
    assert sorted(x["method"] for x in merged) == ["full", "full", "streaming@128", "streaming@128"]
    status = groups(jobs, tmp_path, "--status")
    assert status.stdout.split("\n")[:4] == ["bench-c-full.0: 1 runs", "bench-c-full.1: 1 runs",
                                             "bench-c-full: 2 runs", "bench-c-0: 4 runs"]


@pytest.mark.parametrize("text,why", [
    ("{", "not a jobs file"),
    ('[{"name": "a", "model": "m", "args": [], "groups": [[]]}]', "not a jobs file"),
    ('[{"name": "a", "model": "m", "args": []}, {"name": "a", "model": "m", "args": []}]', "share a name"),
    ('[{"name": "a", "model": "m", "args": [], "full_shards": 0}]', "not a jobs file"),
])
def test_a_bad_jobs_file_is_one_line(tmp_path, text, why):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(text)
    r = groups(jobs, tmp_path)
    assert r.returncode != 0 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("bench-*"))


def test_the_timeout_stops_every_process_and_keeps_what_they_wrote(default_model, tmp_path):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"name": "c", "model": str(default_model), "args": ARGS, "groups": [["streaming"]]}]))
    r = groups(jobs, tmp_path, "--timeout", "1")
    assert r.returncode == 0, r.stderr
    assert "c-full stopped at the timeout" in r.stdout and r.stdout.rstrip().endswith("all done")
    assert not (tmp_path / "bench-c-0").exists() and not (tmp_path / "merged-c").exists()
    progress = (tmp_path / "bench-groups.progress").read_text()
    assert "c-full started" in progress and "all done" in progress


def test_the_groups_run_when_full_crashed_after_its_runs(tmp_path, monkeypatch):
    """The box's report crashed `full` (SIGSEGV) after its runs were written; its groups ran
    nothing that session. Now they run, and run what full lacks themselves."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_groups

    started = []

    def start(self, label, job, methods, out):
        started.append(label)
        out.mkdir(parents=True, exist_ok=True)
        if label.endswith("-full"):   # its runs, then a crash
            (out / "runs.jsonl").write_text('{"method": "full"}\n')
            code = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
        else:
            code = "pass"
        self.procs[label] = subprocess.Popen([sys.executable, "-c", code])

    monkeypatch.setattr(bench_groups.Runner, "start", start)
    monkeypatch.setattr(bench_groups, "merge", lambda runner, job: None)
    jobs = [{"name": "c", "model": "m", "args": [], "groups": [["streaming"], ["snapkv"]]}]
    bench_groups.run(jobs, tmp_path, timeout=60, threads=None, poll=0.05)
    assert started == ["c-full", "c-0", "c-1"]
    progress = (tmp_path / "bench-groups.progress").read_text()
    assert "c-full ended with status -11 after 1 runs; the groups run what it lacks" in progress
    assert (tmp_path / "bench-c-0" / "runs.jsonl").read_text() == '{"method": "full"}\n'   # seeded


def test_a_configuration_with_a_script_runs_it_with_the_bench_arguments(tmp_path):
    """An ablation registers its methods and then runs the bench: its script runs instead of
    the bench CLI, with the same arguments."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_groups

    seen = tmp_path / "argv.json"
    script = tmp_path / "ablation.py"
    script.write_text(f"import json, sys\nopen({str(seen)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    runner = bench_groups.Runner(tmp_path, threads=2, plots=False)
    job = {"name": "c", "model": "m.gguf", "args": ["--ctx", "2K"], "script": str(script)}
    runner.start("c-0", job, ["streaming"], tmp_path / "bench-c-0")
    assert runner.procs["c-0"].wait(60) == 0
    assert json.loads(seen.read_text()) == ["m.gguf", "--ctx", "2K", "--methods", "full,streaming", "--out",
                                            str(tmp_path / "bench-c-0"), "--threads", "2", "--no-plots"]
