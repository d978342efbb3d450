"""Shared helpers of the supervisor tests: job files for the fake rank, process scans, waits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

from train_core.runfiles import read_json  # noqa: F401 - re-exported for the tests

REPO = Path(__file__).resolve().parents[1]
FAKE_RANK = REPO / "tests" / "scripts" / "sup_fake_rank.py"
CLI = [sys.executable, "-m", "supervisor"]  # what the `trainsup` command runs: supervisor/entry.py

# .ci/run sets it: a test whose prerequisite (Slurm, dbus-daemon, a tmpfs mount, systemd-analyze)
# is missing fails there instead of being skipped
REQUIRE_ALL = os.environ.get("TRAINSUP_TEST_REQUIRE_ALL") == "1"


def missing(why: str) -> None:
    """A prerequisite of this test is missing: skip it, or fail under TRAINSUP_TEST_REQUIRE_ALL."""
    if REQUIRE_ALL:
        pytest.fail(f"{why} (TRAINSUP_TEST_REQUIRE_ALL=1: CI must have it)")
    pytest.skip(why)


def prerequisite(ok: bool, why: str) -> pytest.MarkDecorator:
    """skipif(not ok), except under TRAINSUP_TEST_REQUIRE_ALL, where the test runs and fails."""
    return pytest.mark.skipif(not ok and not REQUIRE_ALL, reason=why)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_job(tmp: Path, args: list[str], *, script: Path = FAKE_RANK, run_dir: Path | None = None,
              **sections: dict[str, Any]) -> Path:
    """A job.toml for `script`; `sections` are {name: {key: value}} merged over test defaults."""
    defaults: dict[str, dict[str, Any]] = {
        "launch": {"cpu": True, "num_processes": 1},
        "restart": {"max_restarts": 3, "backoff_initial_s": 0.2, "backoff_max_s": 2.0, "jitter": 0.0},
        "stop": {"grace_s": 20.0, "kill_after_s": 2.0},
        "watch": {"hang_timeout_s": 30.0, "startup_timeout_s": 60.0, "poll_interval_s": 0.1},
    }
    for name, body in sections.items():
        defaults.setdefault(name, {}).update(body)
    lines = [f"run_dir = {toml_value(str(run_dir or tmp / 'run'))}", "[train]",
             f"script = {toml_value(str(script))}", f"args = {toml_value([str(a) for a in args])}"]
    for name, body in defaults.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    job = tmp / "job.toml"
    job.write_text("\n".join(lines) + "\n")
    return job


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def start_supervisor(job: Path, *extra: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL
    # own session: the test's signals go to the supervisor only, as from a scheduler
    return subprocess.Popen([*CLI, "run", str(job), *extra], env=env(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=REPO)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def final_hash(run_dir: Path) -> str:
    """The weights hash the test scripts write when they finish (final_hash.json)."""
    return json.loads((run_dir / "final_hash.json").read_text())["hash"]


def heartbeat_step(run_dir: Path) -> int:
    st = read_json(run_dir / "status.json") or {}
    return int(st.get("step", -1)) if st.get("state") == "training" else -1


def events(run_dir: Path, event: str | None = None) -> list[dict]:
    """The records of the run's events.jsonl; only those named `event` when given."""
    try:
        lines = (run_dir / "events.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    records = [json.loads(line) for line in lines if line.strip()]
    return [e for e in records if e["event"] == event] if event else records


def run_processes(run_dir: Path) -> list[psutil.Process]:
    """Every live process whose environment says it belongs to `run_dir` (launcher, ranks, workers)."""
    found = []
    needle = str(run_dir)
    for p in psutil.process_iter():
        try:
            if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get("TRAINSUP_RUN_DIR") == needle:
                found.append(p)
        except psutil.Error:
            continue
    return found


def kill_run(run_dir: Path) -> None:
    for p in run_processes(run_dir):
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def final_weights(run_dir: Path, rank: int = 0) -> list[float]:
    return json.loads((run_dir / f"final-weights-{rank}.json").read_text())


def finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    """The exit code of a supervisor process; killed (and the test failed) if it takes longer."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


class QuietWatcher:
    """A test double of supervisor.watch.Watcher that decides nothing: subclasses override poll."""

    name = "quiet"

    def poll(self, now):
        return []

    def blocking_reason(self, now):
        return None

    def on_checkpoint(self, step, now):
        pass

    def status(self):
        return {}

    def close(self):
        pass
