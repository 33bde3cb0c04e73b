"""Several benchmark configurations side by side on one machine, each split into method
groups, with `full` run once per configuration.

    python benchmarks/bench_groups.py JOBS.json [--root /tmp] [--timeout 1500] [--threads 2] [--no-plots]
    python benchmarks/bench_groups.py JOBS.json --status      (runs written so far, per folder)

JOBS.json is a list of configurations:

    [{"name": "s2", "model": "/tmp/smollm2.gguf",
      "args": ["--ctx", "2K", "--cases-per-task", "20", "--budgets", "1/8,1/4", "--tasks", "all",
               "--split", "test", "--levels", "benchmarks/results/calibration/smollm2-135m.json",
               "--n-gpu-layers", "-1", "--flash-attn"],
      "groups": [["loopserve-d32-head", "snapkv-head"], ["streaming", "h2o-head"]],
      "full_shards": 3}]

Give a configuration with head-wise or quantized-K/V groups "--flash-attn" in its "args": `full`
runs alone, and a group's call refuses a seeded folder whose `full` ran with the other attention
kernel (the benchmark compares every method with `full` under one kernel).

A configuration's optional "script" runs instead of the bench CLI, with the same arguments: an
ablation's script (benchmarks/results/*/ablation.py) that registers its methods and then runs
the bench, so that an ablation runs in groups on the GPU box as the package's methods do.

Each configuration runs `full` alone into ROOT/bench-NAME-full: with "full_shards" N, as N
processes side by side, each on a share of the tasks (ROOT/bench-NAME-full.K), joined into
bench-NAME-full when all have ended (a 2K configuration's 240 `full` dialogues in one process
held its groups back for minutes of the lease). When that has ended, one
process per group runs into ROOT/bench-NAME-I, seeded with a copy of the full folder. So each
group resumes past `full` instead of running it again; on the GPU box every `full` run a group
repeats is GPU time the others do not get. When every process has ended, or at the timeout
(the processes are then stopped), each configuration's groups are merged into
ROOT/merged-NAME (bench_merge.py) and its summary is written (bench --report-only).

A folder that exists is resumed, never seeded again, so the same command on a later lease (the
folders carried back to ROOT) goes on where the last one stopped. Events go to stdout and
to ROOT/bench-groups.progress.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_merge  # noqa: E402

SEED = ("bench.json", "cases.jsonl", "runs.jsonl", "refs")


def read_jobs(path: str) -> list[dict]:
    try:
        jobs = json.loads(Path(path).read_text())
        for j in jobs:
            j["name"], j["model"], j["args"]
            j.setdefault("groups", [])
            j.setdefault("full_shards", 1)
            if not all(isinstance(g, list) and g for g in j["groups"]) or \
                    not (isinstance(j["full_shards"], int) and j["full_shards"] >= 1):
                raise ValueError
    except OSError as e:
        sys.exit(f"{path}: cannot read the jobs file ({e.strerror})")
    except (ValueError, KeyError, TypeError):
        sys.exit(f"{path}: not a jobs file (a list of {{name, model, args, groups: [[method, ...], ...], "
                 "full_shards: N}})")
    names = [j["name"] for j in jobs]
    if len(set(names)) != len(names):
        sys.exit(f"{path}: two configurations share a name")
    return jobs


def bench_entry(job: dict) -> list[str]:
    """What the interpreter runs for a configuration's bench: its ablation script, else the CLI."""
    return [job["script"]] if job.get("script") else ["-m", "loopserve_edge.cli", "bench"]


def runs_in(folder: Path) -> int:
    p = folder / "runs.jsonl"
    return sum(1 for line in p.read_text().splitlines() if line.strip()) if p.exists() else 0


class Runner:
    def __init__(self, root: Path, threads: int | None, plots: bool = True):
        self.root, self.threads = root, threads
        # every process's report, and the merged one: the GPU box's matplotlib crashed after the
        # summaries were written (SIGSEGV), so there the plots are drawn later, elsewhere
        self.report = [] if plots else ["--no-plots"]
        self.procs: dict[str, subprocess.Popen] = {}
        self.told: set[str] = set()   # the processes whose end is logged
        self.progress = root / "bench-groups.progress"

    def log(self, line: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {line}"
        print(line, flush=True)
        with open(self.progress, "a") as f:
            f.write(line + "\n")

    def start(self, label: str, job: dict, methods: list[str], out: Path, args: list[str] | None = None) -> None:
        cmd = [sys.executable, *bench_entry(job), job["model"], *(args or job["args"]),
               "--methods", ",".join(["full", *methods]), "--out", str(out)]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        cmd += self.report
        log = open(self.root / f"bench-{label}.log", "a")
        # a session of its own: stopping it at the timeout stops whatever it started
        self.procs[label] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.log(f"{label} started ({runs_in(out)} runs already in {out.name})")

    def ended(self, label: str) -> int | None:
        p = self.procs.get(label)
        return None if p is None else p.poll()

    def stop_all(self) -> None:
        for label, p in self.procs.items():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                self.log(f"{label} stopped at the timeout")


def seed(full: Path, group: Path) -> None:
    """A group's folder from the configuration's full folder. A group folder that exists keeps
    its runs; it only gets the dialogues and full's reference distributions where it lacks
    them (a folder carried back without them would otherwise run `full` again)."""
    if group.exists():
        for name in ("cases.jsonl", "refs"):
            src = full / name
            if not (group / name).exists() and src.exists():
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, group / name)
        return
    tmp = group.with_name(group.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in SEED:
        src = full / name
        if src.is_dir():
            shutil.copytree(src, tmp / name)
        elif src.exists():
            shutil.copy2(src, tmp / name)
    tmp.replace(group)


def shard_args(job: dict) -> list[list[str]]:
    """The job's arguments once per `full` shard, each with its share of the tasks (every
    n-th, so that long and short families spread). Cases are made task by task, so a shard's
    dialogues are the very ones the whole configuration makes."""
    from loopserve_edge.bench.tasks import TASKS

    args = list(job["args"])
    i = args.index("--tasks") if "--tasks" in args else None
    names = TASKS if i is None or args[i + 1] == "all" else args[i + 1].split(",")
    n = min(job["full_shards"], len(names))
    if i is None:
        args += ["--tasks", ""]
        i = len(args) - 2
    return [args[:i + 1] + [",".join(names[k::n])] + args[i + 2:] for k in range(n)]


def join_shards(shards: list[Path], full: Path) -> int:
    """bench-NAME-full from its shards: their dialogues, runs and distributions side by side
    (a group resumes by case id, whichever shard ran it)."""
    done = [s for s in shards if (s / "bench.json").exists()]
    if not done:   # none got as far as its first run: the groups run full themselves
        return 0
    tmp = full.with_name(full.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "refs").mkdir(parents=True)
    shutil.copy2(done[0] / "bench.json", tmp / "bench.json")
    for name in ("cases.jsonl", "runs.jsonl"):
        (tmp / name).write_text("".join((s / name).read_text() for s in done if (s / name).exists()))
    for s in done:
        for f in (s / "refs").glob("*.npz") if (s / "refs").is_dir() else []:
            shutil.copy2(f, tmp / "refs" / f.name)
    tmp.replace(full)
    return runs_in(full)


def merge(runner: Runner, job: dict) -> None:
    root, name = runner.root, job["name"]
    parts = [root / f"bench-{name}-{i}" for i in range(len(job["groups"]))]
    parts = [p for p in parts if (p / "runs.jsonl").exists()]
    if not parts:
        return
    out = root / f"merged-{name}"
    shutil.rmtree(out, ignore_errors=True)
    try:
        n = bench_merge.merge(out, parts)
    except SystemExit as e:  # a refusal: say why, merge the other configurations
        runner.log(f"{name}: not merged: {e}")
        return
    shutil.rmtree(out / "refs", ignore_errors=True)  # the parts keep them (a resume needs them)
    r = subprocess.run([sys.executable, *bench_entry(job), "--report-only", "--out", str(out),
                        *runner.report],
                       capture_output=True, text=True)
    runner.log(f"{name}: {n} runs merged into {out.name}" + ("" if r.returncode == 0 else
                                                              f"; the report failed ({r.returncode})"))


def run(jobs: list[dict], root: Path, timeout: float, threads: int | None, poll: float = 2.0,
        plots: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    runner = Runner(root, threads, plots)
    deadline = time.monotonic() + timeout
    shards: dict[str, list[str]] = {}   # configuration -> its full processes' labels
    for j in jobs:
        name, full = j["name"], root / f"bench-{j['name']}-full"
        if j.get("full_shards", 1) > 1 and not full.exists():
            shards[name] = []
            for k, args in enumerate(shard_args(j)):
                runner.start(f"{name}-full.{k}", j, [], root / f"bench-{name}-full.{k}", args)
                shards[name].append(f"{name}-full.{k}")
        else:
            runner.start(f"{name}-full", j, [], full)
            shards[name] = [f"{name}-full"]
    waiting = {j["name"]: j for j in jobs}
    while time.monotonic() < deadline:
        for name, j in list(waiting.items()):
            ends = [runner.ended(label) for label in shards[name]]
            if any(rc is None for rc in ends):
                continue
            rc = next((x for x in ends if x != 0), 0)
            del waiting[name]
            if shards[name] != [f"{name}-full"]:
                n = join_shards([root / f"bench-{label}" for label in shards[name]], root / f"bench-{name}-full")
                runner.log(f"{name}: {len(shards[name])} full shards joined ({n} runs)")
            # a crash after its runs were written (the box's report did) must not cost the
            # groups their turn; whatever full left undone, each group runs itself
            runner.log(f"{name}-full ended" + ("" if rc == 0 else f" with status {rc} after "
                       f"{runs_in(root / f'bench-{name}-full')} runs; the groups run what it lacks"))
            for i, methods in enumerate(j["groups"]):
                folder = root / f"bench-{name}-{i}"
                seed(root / f"bench-{name}-full", folder)
                runner.start(f"{name}-{i}", j, methods, folder)
        for label in list(runner.procs):
            rc = runner.ended(label)
            if rc is not None and "-full" not in label and label not in runner.told:
                runner.told.add(label)
                runner.log(f"{label} ended with status {rc}")
        if not waiting and all(p.poll() is not None for p in runner.procs.values()):
            break
        time.sleep(poll)
    runner.stop_all()
    for name in waiting:   # shards stopped at the timeout: joined, so that a later lease resumes them
        if shards[name] != [f"{name}-full"]:
            join_shards([root / f"bench-{label}" for label in shards[name]], root / f"bench-{name}-full")
    for j in jobs:
        merge(runner, j)
    runner.log("all done")


def status(jobs: list[dict], root: Path) -> None:
    for j in jobs:
        shards = [f"full.{k}" for k in range(j["full_shards"])] if j["full_shards"] > 1 else []
        for suffix in [*shards, "full", *map(str, range(len(j["groups"])))]:
            folder = root / f"bench-{j['name']}-{suffix}"
            if folder.exists():
                print(f"{folder.name}: {runs_in(folder)} runs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jobs")
    ap.add_argument("--root", default="/tmp")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds until every process is stopped")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per process (bench --threads)")
    ap.add_argument("--no-plots", action="store_true", help="summaries without plots (bench --no-plots)")
    ap.add_argument("--status", action="store_true", help="only count the runs written so far")
    a = ap.parse_args()
    jobs = read_jobs(a.jobs)
    if a.status:
        status(jobs, Path(a.root))
    else:
        run(jobs, Path(a.root), a.timeout, a.threads, plots=not a.no_plots)


if __name__ == "__main__":
    main()
