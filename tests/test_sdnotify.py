"""sd_notify messages arrive on a real unix datagram socket, in order (path and abstract)."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from supervisor.systemd.sdnotify import SdNotifier, SdNotifyReporter, child_env, status_text


def _path_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    return s, path


def _abstract_socket() -> tuple[socket.socket, str]:
    name = f"trainsup-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    return s, "@" + name


def _drain(s: socket.socket) -> list[str]:
    s.settimeout(0.0)
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_lifecycle_messages_in_order(tmp_path: Path, kind: str) -> None:
    sock, address = _path_socket(tmp_path) if kind == "path" else _abstract_socket()
    with sock:
        n = SdNotifier({"NOTIFY_SOCKET": address})
        assert n.enabled
        assert n.ready("attempt 1 started")
        assert n.status("step 120 loss 2.31\nsecond line")
        assert n.extend_timeout(30)
        assert n.stopping("saving checkpoint")
        n.close()
        assert _drain(sock) == [
            "READY=1\nSTATUS=attempt 1 started",
            "STATUS=step 120 loss 2.31 second line",  # newline would inject a new assignment
            "EXTEND_TIMEOUT_USEC=30000000",
            "STOPPING=1\nSTATUS=saving checkpoint",
        ]


def test_watchdog_cadence_is_half_the_interval(tmp_path: Path) -> None:
    sock, address = _path_socket(tmp_path)
    with sock:
        n = SdNotifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())})
        assert n.watchdog_interval_s == 10.0
        sent = [t for t in (0.0, 1.0, 4.9, 5.0, 6.0, 9.9, 10.0, 10.1) if n.maybe_watchdog(t)]
        assert sent == [0.0, 5.0, 10.0]
        assert _drain(sock) == ["WATCHDOG=1"] * 3


def test_watchdog_for_another_pid_is_ignored(tmp_path: Path) -> None:
    sock, address = _path_socket(tmp_path)
    with sock:
        n = SdNotifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
        assert n.watchdog_interval_s is None
        assert not n.maybe_watchdog(0.0)
        # without WATCHDOG_PID it is ours
        assert SdNotifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"}).watchdog_interval_s == 2.0
        assert _drain(sock) == []


def test_no_socket_is_a_noop() -> None:
    n = SdNotifier({})
    assert not n.enabled
    assert not n.ready("x") and not n.status("y") and not n.stopping() and not n.maybe_watchdog(0.0)


def test_unreachable_socket_warns_once_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = SdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not n.ready()
    assert not n.status("x")
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1


def test_child_env_drops_notify_variables() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2", "PATH": "/bin"}
    assert child_env(env) == {"PATH": "/bin"}


class Inner:
    """The console the reporter wraps: records what reaches it."""

    def __init__(self) -> None:
        self.calls: list = []

    def child_output(self, line: str) -> None:
        self.calls.append(("out", line))

    def progress(self, snap: dict) -> None:
        self.calls.append(("progress", snap["state"]))

    def watcher_readings(self, x: int) -> int:  # a hook added to the console later
        return x + 1


def snap(state: str, step: int | None = None, **kw) -> dict:
    return {"state": state, "attempt": 1, "step": step, "max_steps": 100, "loss": None if step is None else 2.5,
            "last_checkpoint": None, "paused_by": [], "blocked_by": None, **kw}


def test_status_text_says_state_step_loss_checkpoint_and_why_it_waits() -> None:
    assert status_text(snap("starting")) == "starting (attempt 1)"
    assert status_text(snap("running", 12, last_checkpoint={"step": 10})) == \
        "running (attempt 1), step 12/100, loss 2.5000, checkpoint 10"
    assert status_text(snap("running", 12, paused_by=["power"])) == \
        "running (attempt 1), step 12/100, loss 2.5000, paused by power"
    assert status_text(snap("waiting", blocked_by="power: on battery")) == "waiting (attempt 1), power: on battery"


def test_reporter_lifecycle_in_order_with_status_rate_limit_and_watchdog(tmp_path: Path) -> None:
    sock, address = _path_socket(tmp_path)
    with sock:
        clock = [100.0]
        stop = [False]
        inner = Inner()
        r = SdNotifyReporter(inner, SdNotifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000"}),
                             stop_requested=lambda: stop[0], stop_timeout_s=90, clock=lambda: clock[0])
        r.progress(snap("starting"))  # first turn of the loop: READY (+ the first watchdog ping)
        r.progress(snap("starting"))  # nothing new
        clock[0] += 0.5
        r.progress(snap("running", 1))  # state change: at once
        clock[0] += 0.2
        r.progress(snap("running", 2))  # 0.2 s later: held back
        clock[0] += 1.0
        r.progress(snap("running", 9))  # 1.2 s after the last STATUS
        clock[0] += 1.0  # 2.7 s after the first ping: half of WatchdogSec has passed
        r.progress(snap("running", 9))
        stop[0] = True
        r.progress(snap("stopping", 9))
        r.finished(75, "stopped on SIGTERM: checkpoint step 9 committed (saved)")
        r.child_output("[rank0]: hello")
        assert _drain(sock) == [
            "READY=1\nSTATUS=starting (attempt 1)",
            "WATCHDOG=1",
            "STATUS=running (attempt 1), step 1/100, loss 2.5000",
            "STATUS=running (attempt 1), step 9/100, loss 2.5000",
            "WATCHDOG=1",
            "STOPPING=1\nSTATUS=stopping (attempt 1), step 9/100, loss 2.5000",
            "EXTEND_TIMEOUT_USEC=90000000",
            "STATUS=exited 75: stopped on SIGTERM: checkpoint step 9 committed (saved)",
        ]
    # the console still gets everything, and hooks it has that the wrapper does not know
    assert [c for c in inner.calls if c[0] == "progress"] == [("progress", s) for s in
                                                             ["starting"] * 2 + ["running"] * 4 + ["stopping"]]
    assert inner.calls[-1] == ("out", "[rank0]: hello")
    assert r.watcher_readings(1) == 2


def test_reporter_finish_without_a_stop_request_sends_stopping(tmp_path: Path) -> None:
    sock, address = _path_socket(tmp_path)
    with sock:
        r = SdNotifyReporter(Inner(), SdNotifier({"NOTIFY_SOCKET": address}))
        r.progress(snap("waiting", blocked_by="power: on battery"))
        r.finished(0, "training finished at step 100")
        assert _drain(sock) == ["READY=1\nSTATUS=waiting (attempt 1), power: on battery",
                                "STOPPING=1\nSTATUS=exited 0: training finished at step 100"]


def test_reporter_without_systemd_only_forwards() -> None:
    inner = Inner()
    r = SdNotifyReporter(inner, SdNotifier({}))
    r.progress(snap("running", 3))
    r.finished(0, "done")
    assert inner.calls == [("progress", "running")] and not r.ready_sent
