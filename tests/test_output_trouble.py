"""Output trouble never costs a save (issue 12).

`trainsup run job.toml | head -3`, a terminal that hangs up, a closed stdout: the console
notes once (in RUN_DIR/logs/supervisor.log) that the terminal is gone and goes quiet, the run
goes on, and the exit code is the run's own (not 1, not Python's 120). Every supervisor line
is also in logs/supervisor.log. SIGHUP after a Ctrl-C still saves; only Ctrl-C twice skips
the save. An internal error of the loop asks the ranks to save before anything is killed.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import re
import select
import shlex
import signal
import stat
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from supervisor.cli import main
from supervisor.cli.console import Console, SupervisorLog
from supervisor.config import load_job
from supervisor.errors import UserError
from supervisor.runner import Runner, State
from supervisor_helpers import (
    CLI,
    REPO,
    env,
    events,
    finish,
    heartbeat_step,
    read_json,
    run_processes,
    start_supervisor,
    wait_for,
    write_job,
)
from train_core.store import CheckpointStore

TOY = REPO / "tests" / "scripts" / "toy_train.py"
GONE = "the terminal is gone ("
STAMPED = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[trainsup\] ")


def sup_log(run_dir: Path) -> str:
    return (run_dir / "logs" / "supervisor.log").read_text()


def assert_complete(run_dir: Path) -> str:
    """supervisor.log holds every state transition of events.jsonl, and no rank output."""
    text = sup_log(run_dir)
    for e in events(run_dir, "state"):
        line = f"{e.get('from') or 'init'} -> {e['to']}: {e['cause']}"
        assert line in text, f"{line!r} not in supervisor.log:\n{text}"
    for e in events(run_dir, "attempt_exit"):
        assert f"attempt {e['attempt']} ended: {e['kind']}" in text
    assert "[rank0]:" not in text  # the ranks' output is in logs/attempt-N.log only
    for line in text.splitlines():  # a timestamp, then the console's text
        assert STAMPED.match(line), line
    mode = stat.S_IMODE(os.stat(run_dir / "logs" / "supervisor.log").st_mode)
    assert mode == 0o600, oct(mode)
    return text


def read_lines(fd: int, n: int, timeout: float) -> bytes:
    """At least n lines from the pipe `fd` (what `head -n` reads before it exits)."""
    got = b""
    deadline = time.monotonic() + timeout
    while got.count(b"\n") < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {got!r} within {timeout} s"
        if select.select([fd], [], [], left)[0]:
            data = os.read(fd, 4096)
            assert data, f"EOF after {got!r}"
            got += data
    return got


def no_python_noise(text: str) -> None:
    for bad in ("Exception ignored", "Traceback", "BrokenPipeError", "Logging error"):
        assert bad not in text, text[-3000:]


# --------------------------------------------------------------------------- the console, in-process


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_console_goes_quiet_once_when_the_pipe_breaks(capsys):
    r, w = os.pipe()
    stream = os.fdopen(w, "w")
    c = Console(stream, tty=False)
    c.child_output("[rank0]:first")
    assert os.read(r, 100) == b"[rank0]:first\n"
    os.close(r)  # the reader (`head`) exits
    seen = Records()
    note = logging.getLogger("supervisor.console")
    note.addHandler(seen)
    log = logging.getLogger("supervisor.test")
    log.addHandler(c)
    try:
        c.child_output("[rank0]:nobody reads this")  # EPIPE: no exception
        assert c.gone is not None and c.gone.startswith("BrokenPipeError")
        log.warning("a supervisor line")  # neither raises nor reports a logging error
        c.progress({"state": "running", "attempt": 1, "step": 3})
        c.close_line()
        c.child_output("more")
    finally:
        log.removeHandler(c)
        note.removeHandler(seen)
    assert "Logging error" not in capsys.readouterr().err
    notes = [rec for rec in seen.records if rec.getMessage().startswith(GONE)]
    assert len(notes) == 1 and notes[0].name == "supervisor.console" and notes[0].levelno == logging.WARNING
    # The broken fd now writes to /dev/null: the final flush of what is still buffered succeeds.
    assert os.fstat(w).st_rdev == os.stat(os.devnull).st_rdev
    stream.write("left in the buffer")
    stream.close()


def test_console_closed_file_and_hung_up_terminal():
    closed = io.StringIO()
    closed.close()
    c = Console(closed, tty=False)
    c.child_output("x")  # ValueError: I/O operation on closed file
    assert c.gone.startswith("ValueError")

    class HungUp(io.StringIO):
        def isatty(self):
            return True

        def write(self, s):
            raise OSError(errno.EIO, "Input/output error")

    c = Console(HungUp())
    assert c.tty
    c.progress({"state": "running", "attempt": 1, "step": 1})
    assert c.gone.startswith("OSError: [Errno 5]")
    c.child_output("y")
    c.close_line()
    assert Console(None).gone == "no stdout"  # `trainsup run >&-`: Python's sys.stdout is None
    Console(None).child_output("z")


def test_console_does_not_swallow_other_errors(capsys):
    class Full(io.StringIO):
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    c = Console(Full(), tty=False)
    with pytest.raises(OSError, match="No space left"):
        c.child_output("x")
    assert c.gone is None
    log = logging.getLogger("supervisor.test2")
    log.propagate = False
    log.addHandler(c)
    try:
        log.warning("a line")
    finally:
        log.removeHandler(c)
    assert "--- Logging error ---" in capsys.readouterr().err and c.gone is None


def test_supervisor_log_file(tmp_path):
    logs = tmp_path / "run" / "logs"
    h = SupervisorLog(logs)
    log = logging.getLogger("supervisor.test3")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(h)
    try:
        log.info("one")
        log.warning("two")
    finally:
        log.removeHandler(h)
        h.close()
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700 & ~_umask()
    assert stat.S_IMODE((logs / "supervisor.log").stat().st_mode) == 0o600
    h = SupervisorLog(logs)  # appends
    h.close()
    lines = (logs / "supervisor.log").read_text().splitlines()
    assert [ln.split(" ", 2)[2] for ln in lines] == ["[trainsup] one", "[trainsup] warning: two"]
    (logs / "supervisor.log").unlink()
    target = tmp_path / "elsewhere"
    target.write_text("keep\n")
    (logs / "supervisor.log").symlink_to(target)
    with pytest.raises(UserError, match="is a symlink; trainsup never follows symlinks"):
        SupervisorLog(logs)
    job = write_job(tmp_path, ["--steps", "5"])
    r = CliRunner().invoke(main, ["run", str(job)])
    assert r.exit_code == 2 and "supervisor.log is a symlink" in r.output
    assert target.read_text() == "keep\n" and not (tmp_path / "run" / "events.jsonl").exists()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# --------------------------------------------------------------------------- the loop dies: still a save


class Boom:
    """A reporter that fails inside the loop once the ranks train (an internal error)."""

    def __init__(self, run_dir: Path, exc: type[BaseException]) -> None:
        self.status, self.exc = run_dir / "status.json", exc

    def child_output(self, line):
        pass

    def progress(self, snap):
        if snap["state"] == "running" and (read_json(self.status) or {}).get("step", -1) >= 5:
            raise self.exc("simulated supervisor bug")


def fake_job(tmp_path, args, **sections):
    sections.setdefault("launch", {})["launcher"] = "python"
    return load_job(write_job(tmp_path, args, **sections))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_internal_error_asks_the_ranks_to_save_first(tmp_path, exc):
    job = fake_job(tmp_path, ["--steps", "2000", "--step-time", "0.02"])
    runner = Runner(job, reporter=Boom(job.run_dir, exc), install_signals=False)
    with pytest.raises(exc, match="simulated supervisor bug"):
        runner.run()
    assert runner.state not in (State.EXITED, State.FATAL)  # the loop died; no transition killed anything
    latest = CheckpointStore(job.run_dir / "checkpoints").latest_valid(full=True)
    assert latest is not None and latest.reason == "preempt" and 5 <= latest.step < 2000
    assert read_json(job.run_dir / "ranks" / "exit-0.json")["kind"] == "saved"
    assert events(job.run_dir, "escalate") == []
    [ex] = events(job.run_dir, "supervisor_exit")
    assert ex["exit_code"] == 1 and f"checkpoint step {latest.step} committed" in ex["reason"]
    assert run_processes(job.run_dir) == []


@pytest.mark.slow  # seconds of real processes: out of the fast lane
def test_internal_error_escalates_when_the_ranks_do_not_stop(tmp_path):
    job = fake_job(tmp_path, ["--steps", "5000", "--step-time", "0.02", "--ignore-stop"],
                   stop={"grace_s": 1.0, "kill_after_s": 1.0})
    runner = Runner(job, reporter=Boom(job.run_dir, RuntimeError), install_signals=False)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        runner.run()
    assert time.monotonic() - t0 >= 2.0  # the grace, then kill_after_s
    assert [e["signal"] for e in events(job.run_dir, "escalate")] == ["SIGTERM", "SIGKILL"]
    assert run_processes(job.run_dir) == []


# --------------------------------------------------------------------------- real pipes, real terminals

@pytest.mark.slow
def test_piped_into_head_trains_to_the_final_checkpoint(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    job = write_job(tmp_path, ["--steps", "24", "--sleep-s", "0.04"], script=TOY)
    cmd = (f"{shlex.join([*CLI, 'run', str(job)])} 2>{shlex.quote(str(tmp_path / 'err.txt'))} | head -3 "
           f">{shlex.quote(str(tmp_path / 'head.txt'))}; echo ${{PIPESTATUS[0]}} >{shlex.quote(str(tmp_path / 'rc'))}")
    r = subprocess.run(["bash", "-c", cmd], env=env(), cwd=REPO, timeout=180, start_new_session=True)
    assert r.returncode == 0
    err = (tmp_path / "err.txt").read_text()
    assert (tmp_path / "rc").read_text().strip() == "0", err[-3000:] + sup_log(run_dir)[-3000:]
    assert len((tmp_path / "head.txt").read_text().splitlines()) == 3
    no_python_noise(err)
    final = CheckpointStore(run_dir / "checkpoints").latest_valid(full=True)
    assert final is not None and final.step == 24 and final.reason == "final"
    assert read_json(run_dir / "final_hash.json")["step"] == 24
    text = assert_complete(run_dir)
    assert "] warning: " + GONE + "BrokenPipeError" in text
    assert text.count(GONE) == 1
    assert "training finished at step 24" in text and "checkpoint committed: step 24 (final)" in text
    assert events(run_dir, "supervisor_exit")[-1]["exit_code"] == 0
    assert run_processes(run_dir) == []


@pytest.mark.slow
def test_piped_and_closed_then_sigterm_saves_and_exits_75(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    job = write_job(tmp_path, ["--steps", "400", "--sleep-s", "0.04"], script=TOY)
    with open(tmp_path / "err.txt", "wb") as err:
        sup = subprocess.Popen([*CLI, "run", str(job)], env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                               start_new_session=True)
    cleanup[1].append(sup)
    read_lines(sup.stdout.fileno(), 3, 60)
    sup.stdout.close()  # what `| head -3` does
    wait_for(lambda: heartbeat_step(run_dir) >= 5, 90, "step 5")
    assert sup.poll() is None
    os.kill(sup.pid, signal.SIGTERM)
    assert finish(sup, 120) == 75, sup_log(run_dir)[-3000:]
    no_python_noise((tmp_path / "err.txt").read_text())
    latest = CheckpointStore(run_dir / "checkpoints").latest_valid(full=True)
    assert latest is not None and latest.reason == "preempt" and 5 <= latest.step < 400
    text = assert_complete(run_dir)
    assert GONE + "BrokenPipeError" in text and text.count(GONE) == 1
    assert "received SIGTERM: asking the ranks to save and stop" in text
    assert f"stopped on SIGTERM: checkpoint step {latest.step} committed" in text
    assert run_processes(run_dir) == []


def _own_terminal() -> None:  # in the child, after setsid: the pty becomes its controlling terminal
    fcntl.ioctl(1, termios.TIOCSCTTY, 0)


@pytest.mark.slow
def test_terminal_hangup_saves_and_exits_75(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    job = write_job(tmp_path, ["--steps", "400", "--sleep-s", "0.04"], script=TOY)
    master, slave = os.openpty()
    sup = subprocess.Popen([*CLI, "run", str(job)], env=env(), cwd=REPO, stdin=subprocess.DEVNULL,
                           stdout=slave, stderr=slave, start_new_session=True, preexec_fn=_own_terminal)
    os.close(slave)
    cleanup[1].append(sup)
    seen = bytearray()
    stop = threading.Event()

    def drain():  # a terminal reads what is written to it (else the pty buffer fills up)
        while not stop.is_set():
            if select.select([master], [], [], 0.1)[0]:
                try:
                    seen.extend(os.read(master, 65536))
                except OSError:
                    return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        wait_for(lambda: heartbeat_step(run_dir) >= 5, 90, "step 5")
        wait_for(lambda: b"\r\x1b[Krunning attempt 1" in seen, 30, "the progress line drawn on the terminal")
    finally:
        stop.set()
        reader.join()
    assert sup.poll() is None
    os.close(master)  # the terminal goes away: writes to it fail with EIO, the kernel sends SIGHUP
    os.kill(sup.pid, signal.SIGHUP)
    assert finish(sup, 120) == 75, sup_log(run_dir)[-3000:]
    latest = CheckpointStore(run_dir / "checkpoints").latest_valid(full=True)
    assert latest is not None and latest.reason == "preempt" and 5 <= latest.step < 400
    text = assert_complete(run_dir)
    assert GONE + "OSError: [Errno 5] Input/output error)" in text and text.count(GONE) == 1
    assert "received SIGHUP: asking the ranks to save and stop" in text
    assert f"stopped on SIGHUP: checkpoint step {latest.step} committed" in text
    assert events(run_dir, "stop_requested")[0]["signal"] == "SIGHUP" and events(run_dir, "stop_now") == []
    assert events(run_dir, "escalate") == []
    assert run_processes(run_dir) == []


@pytest.mark.slow
def test_ctrl_c_then_sighup_still_saves(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    # slow micro-batches: the save comes at the next step boundary, up to ~1 s after the Ctrl-C
    job = write_job(tmp_path, ["--steps", "400", "--sleep-s", "0.3"], script=TOY)
    log = tmp_path / "sup.log"
    sup = start_supervisor(job, log=log)
    cleanup[1].append(sup)
    wait_for(lambda: heartbeat_step(run_dir) >= 2, 90, "step 2")
    os.kill(sup.pid, signal.SIGINT)
    wait_for(lambda: "Ctrl-C again to stop at once without saving" in log.read_text(), 10, "the Ctrl-C hint")
    os.kill(sup.pid, signal.SIGHUP)  # the terminal closes right after the Ctrl-C
    assert finish(sup, 120) == 75, log.read_text()[-3000:]
    [ignored] = events(run_dir, "signal_ignored")  # it came while the ranks were saving
    assert ignored["signal"] == "SIGHUP" and ignored["stop_signal"] == "SIGINT"
    assert events(run_dir, "stop_now") == [] and events(run_dir, "escalate") == []
    latest = CheckpointStore(run_dir / "checkpoints").latest_valid(full=True)
    assert latest is not None and latest.reason == "preempt"
    text = assert_complete(run_dir)
    assert "received SIGHUP while stopping on SIGINT: ignored, the save goes on" in text
    # the same lines as on the console (less its progress lines), each with a timestamp
    console = [ln for ln in log.read_text().splitlines() if ln.startswith("[trainsup]") and " | step " not in ln]
    assert [STAMPED.sub("[trainsup] ", ln) for ln in text.splitlines()] == console
    assert run_processes(run_dir) == []


@pytest.mark.slow
@pytest.mark.parametrize("first", [[], [signal.SIGTERM, signal.SIGHUP]], ids=["ctrl-c", "after-sigterm-sighup"])
def test_ctrl_c_twice_stops_at_once(tmp_path, cleanup, first):
    """Only a second Ctrl-C skips the save; SIGTERM/SIGHUP before it are ignored while the stop runs."""
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    job = write_job(tmp_path, ["--steps", "5000", "--step-time", "0.02", "--ignore-stop"], stop={"grace_s": 60.0})
    log = tmp_path / "sup.log"
    sup = start_supervisor(job, log=log)
    cleanup[1].append(sup)
    wait_for(lambda: heartbeat_step(run_dir) >= 5, 60, "step 5")
    for n, sig in enumerate(first, 1):
        os.kill(sup.pid, sig)
        wait_for(lambda: len(events(run_dir, "stop_requested") + events(run_dir, "signal_ignored")) == n, 10,
                 f"{sig.name} handled")
    os.kill(sup.pid, signal.SIGINT)  # the first Ctrl-C announces the second
    wait_for(lambda: "Ctrl-C again to stop at once without saving" in log.read_text(), 10, "the Ctrl-C hint")
    time.sleep(0.5)
    assert sup.poll() is None  # the ranks ignore the stop: still waiting for their save
    t0 = time.monotonic()
    os.kill(sup.pid, signal.SIGINT)
    stop_sig = (first or [signal.SIGINT])[0]
    assert finish(sup, 30) == 128 + stop_sig, log.read_text()[-3000:]
    assert time.monotonic() - t0 < 15  # far below grace_s=60
    assert [e["signal"] for e in events(run_dir, "stop_requested")] == [stop_sig.name]
    assert [e["signal"] for e in events(run_dir, "signal_ignored")] == (["SIGHUP", "SIGINT"] if first else [])
    assert [e["signal"] for e in events(run_dir, "stop_now")] == ["SIGINT"]
    assert events(run_dir, "escalate")[0]["signal"] == "SIGKILL"
    assert run_processes(run_dir) == []
