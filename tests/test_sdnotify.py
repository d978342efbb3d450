"""sd_notify messages arrive on a real unix datagram socket, in order (path and abstract)."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from supervisor.sdnotify import SdNotifier, child_env


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
