"""benchmarks/device_run.sh's background lease: `bg` runs steps one after the other and
records each one's exit status, `bg-wait` waits for them and brings their output back (the
GPU box itself is not needed for these steps: they never load the runtime)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_run.sh"


def run(*args, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.skipif(Path("/tmp/bg").exists() and any(Path("/tmp/bg").iterdir()),
                    reason="/tmp/bg holds another lease's background steps")
def test_bg_runs_steps_and_bg_wait_brings_their_output_back(tmp_path, monkeypatch):
    env = dict(os.environ, OUT=str(tmp_path))
    # a step that fails (unknown, or no GPU here) must not stop the next one, and its status shows
    r = run("bg", "wait-parts=0", "no-such-step", "wait-parts=0", env=env)
    assert r.returncode == 0 and "in the background" in r.stdout
    try:
        r = run("bg-wait=30", env=env)
        assert r.returncode == 0
        lines = r.stdout.strip().splitlines()
        steps = [x.split(" ", 1)[1] for x in lines]
        assert steps[:3] == ["start wait-parts=0", "rc=0 wait-parts=0", "start no-such-step"]
        assert steps[3].startswith("rc=") and steps[3] != "rc=0 no-such-step"
        assert steps[4:] == ["start wait-parts=0", "rc=0 wait-parts=0", "done"]
        # each step's output came back under its name
        assert (tmp_path / "1-wait-parts_0.log").read_text().strip() != ""
        assert (tmp_path / "3-wait-parts_0.log").exists()
    finally:
        subprocess.run(["rm", "-rf", "/tmp/bg"])


@pytest.mark.skipif(Path("/tmp/bg").exists() and any(Path("/tmp/bg").iterdir()),
                    reason="/tmp/bg holds another lease's background steps")
def test_bg_steps_run_in_a_copy_of_the_tree_that_later_changes_do_not_reach(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    probe = ROOT / "bg-probe.tmp"   # untracked, made for this test
    probe.write_text("as at the start\n")
    try:
        r = run("bg", "wait-parts=0", env=env)
        assert r.returncode == 0
        probe.write_text("changed by a later call\n")  # as the device tool's next copy of the tree would
        r = run("bg-wait=30", env=env)
        assert r.returncode == 0 and r.stdout.strip().endswith("done")
        tree = Path("/tmp/bg/tree")
        assert (tree / "bg-probe.tmp").read_text() == "as at the start\n"
        assert (tree / "benchmarks" / "device_run.sh").read_bytes() == SCRIPT.read_bytes()
        assert not (tree / ".git").exists() and not (tree / "build").exists() and not (tree / ".venv").exists()
    finally:
        probe.unlink(missing_ok=True)
        subprocess.run(["rm", "-rf", "/tmp/bg"])


def test_bg_wait_on_a_fresh_machine_says_so(tmp_path):
    if Path("/tmp/bg").exists():
        pytest.skip("/tmp/bg exists here")
    # at once, not after the limit: a device call waiting on a machine that has nothing to wait
    # for holds it for the whole limit (session 16 lost 9.5 device minutes so)
    r = run("bg-wait=540", env=dict(os.environ, OUT=str(tmp_path)), timeout=20)
    assert r.returncode == 3 and "a fresh one" in r.stdout


@pytest.mark.skipif(Path("/tmp/bg").exists(), reason="/tmp/bg holds another lease's background steps")
def test_bg_wait_is_not_fooled_by_a_step_that_ends_in_done(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    # a step's text may end in "done" (cmd:for ...; do ...; done): its start line must not read
    # as the closing line, or bg-wait returns while the steps still run
    steps = Path("/tmp/bg/steps")
    (steps.parent / "out").mkdir(parents=True)
    try:
        steps.write_text("12:00:00 start cmd:for i in 1 2; do sleep 1; done\n")
        t = time.monotonic()
        r = run("bg-wait=5", env=env)
        assert r.returncode == 0 and time.monotonic() - t >= 5
        with steps.open("a") as f:
            f.write("12:00:02 rc=0 cmd:for i in 1 2; do sleep 1; done\n12:00:02 done\n")
        t = time.monotonic()
        r = run("bg-wait=30", env=env)
        assert r.returncode == 0 and time.monotonic() - t < 5
        assert r.stdout.strip().splitlines()[-1] == "12:00:02 done"
    finally:
        subprocess.run(["rm", "-rf", "/tmp/bg"])
