"""Standby ranks (supervisor/runner/procs.py, train_core/standby.py): a process that imported
torch and accelerate takes the next attempt, as `python script args` would run it."""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
from pathlib import Path

import pytest

from supervisor.runner.launch import LaunchPlan
from supervisor.runner.procs import OsProcesses
from train_core.runfiles import RunPaths


def priorities(pid: int | str) -> dict:
    """The nice value of each thread of `pid` (/proc/PID/task/T/stat field 19) and of its
    autogroup (None without autogroups), as PROBE reports its own."""
    threads = [int(Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[16])
               for t in os.listdir(f"/proc/{pid}/task")]
    try:
        group = int(Path(f"/proc/{pid}/autogroup").read_text().rsplit("nice", 1)[1])
    except OSError:
        group = None
    return {"threads": threads, "autogroup": group}


PROBE = "import json, os, sys\nfrom pathlib import Path\n" + inspect.getsource(priorities) + """
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "name": __name__, "path0": sys.path[0],
                  "attempt": os.environ.get("TRAINSUP_ATTEMPT"), "pid": os.getpid(),
                  "torch_loaded": "torch" in sys.modules, "priorities": priorities("self")}))
sys.exit(int(os.environ.get("TRAINSUP_TEST_EXIT", "0")))
"""


def plan(script: Path, env: dict[str, str], *args: str) -> LaunchPlan:
    return LaunchPlan((sys.executable, str(script), *args), env, 1, death_signal=False, launcher_is_rank=True,
                      script_argv=(str(script), *args))


def wait_ready(paths: RunPaths, timeout_s: float = 120) -> None:
    log = paths.logs / "standby.log"
    deadline = time.monotonic() + timeout_s
    while not (log.exists() and "ready" in log.read_text()):
        assert time.monotonic() < deadline, "the standby never got ready"
        time.sleep(0.05)


def wait_exit(child, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while child.popen.poll() is None:
        assert time.monotonic() < deadline, "the rank did not exit"
        time.sleep(0.02)
    return child.popen.returncode


@pytest.fixture
def setup(tmp_path):
    script = tmp_path / "scripts" / "probe.py"
    script.parent.mkdir()
    script.write_text(PROBE)
    paths = RunPaths(tmp_path / "run")
    paths.logs.mkdir(parents=True)
    paths.ranks.mkdir(parents=True)
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    procs = OsProcesses()
    yield procs, script, paths, base
    procs.discard_standby()


@pytest.mark.parametrize("idle", [False, True])
@pytest.mark.slow  # seconds of real processes: out of the fast lane
def test_standby_takes_the_attempt_like_a_plain_start(setup, tmp_path, idle):
    procs, script, paths, base = setup
    procs.prepare(plan(script, {**base, "TRAINSUP_ATTEMPT": "1"}), cwd=tmp_path, paths=paths, idle=idle)
    standby_pid = procs.standby[0].pid
    assert standby_pid not in procs.descendants()  # an idle standby is no part of any attempt
    if idle:  # it imports on CPU time the training leaves: nice 19, every thread and the autogroup
        wait_ready(paths)
        seen = priorities(standby_pid)
        assert set(seen["threads"]) == {19} and seen["autogroup"] in (19, None)
    log = paths.logs / "attempt-2.log"
    child = procs.spawn(plan(script, {**base, "TRAINSUP_ATTEMPT": "2", "TRAINSUP_TEST_EXIT": "75"}, "--x", "1"), log,
                        cwd=tmp_path, paths=paths)
    assert child.from_standby and child.pid == standby_pid and procs.standby is None
    assert wait_exit(child) == 75  # the script's exit code is the process's
    seen = json.loads(log.read_text().splitlines()[-1])
    assert seen["argv"] == [str(script), "--x", "1"] and seen["name"] == "__main__"
    assert seen["cwd"] == str(tmp_path) and seen["path0"] == str(script.parent)
    assert seen["attempt"] == "2" and seen["torch_loaded"]  # its own attempt's env; torch was imported before
    # an idle standby gets its priority back, on every thread (torch's imports start some) and
    # its autogroup (a new session's starts at 0)
    assert len(seen["priorities"]["threads"]) > 1
    assert set(seen["priorities"]["threads"]) == {os.getpriority(os.PRIO_PROCESS, 0)}
    assert seen["priorities"]["autogroup"] in (0, None)
    assert "ready" in (paths.logs / "standby.log").read_text()


def test_a_different_environment_starts_cold(setup, tmp_path):
    """The interpreter and torch read the environment at start: only TRAINSUP_* may differ."""
    procs, script, paths, base = setup
    procs.prepare(plan(script, {**base, "OMP_NUM_THREADS": "2"}), cwd=tmp_path, paths=paths)
    standby = procs.standby[0]
    log = paths.logs / "attempt-1.log"
    child = procs.spawn(plan(script, {**base, "OMP_NUM_THREADS": "1"}), log, cwd=tmp_path, paths=paths)
    assert not child.from_standby and child.pid != standby.pid and procs.standby is None
    assert wait_exit(child) == 0 and not json.loads(log.read_text().splitlines()[-1])["torch_loaded"]
    assert standby.popen.poll() is not None  # discarded, not left behind


def test_discarded_standby_is_gone(setup, tmp_path):
    procs, script, paths, base = setup
    procs.prepare(plan(script, base), cwd=tmp_path, paths=paths)
    standby = procs.standby[0]
    procs.discard_standby()
    assert standby.popen.poll() is not None and procs.standby is None
