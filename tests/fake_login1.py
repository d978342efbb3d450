"""A private dbus-daemon and a small fake org.freedesktop.login1 on it (jeepney).

Real protocol, fake policy: the supervisor's LogindWatcher talks to a real
dbus-daemon exactly as it would to the system bus; this fake answers
`Manager.Inhibit` with a real fd (the write end of a pipe, so the fake sees
the moment the client closes it as EOF on the read end, like logind does),
serves the `InhibitDelayMaxUSec` property, and lets the test emit
`PrepareForSleep(b)` / `PrepareForShutdown(b)`.

Used by tests/test_logind.py and bench/bench_sleep_lock.py.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from jeepney import DBusAddress, HeaderFields, MessageType, new_error, new_method_return, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import Proxy, open_dbus_connection

LOGIN1 = "org.freedesktop.login1"
PATH = "/org/freedesktop/login1"
MANAGER = "org.freedesktop.login1.Manager"
PROPS = "org.freedesktop.DBus.Properties"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def dbus_daemon_available() -> bool:
    return shutil.which("dbus-daemon") is not None


class PrivateBus:
    """`dbus-daemon --nofork --print-address` with a temp config; stop() kills exactly it."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket_path = workdir / "bus.sock"
        config = workdir / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.socket_path))
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address=1", "--nopidfile"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 10.0)
        line = self.proc.stdout.readline().strip() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError(f"dbus-daemon did not print its address: {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.address = line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


@dataclass
class Lock:
    what: str
    who: str
    why: str
    mode: str
    read_fd: int
    taken_at: float
    released_at: float | None = None  # time.monotonic() when logind saw the fd close
    released_wall: float | None = None  # time.time() of the same moment (compare with manifests)
    seen_at_release: object = None  # what on_release returned for this lock

    @property
    def held(self) -> bool:
        return self.released_at is None


class FakeLogind:
    """org.freedesktop.login1 on `bus_address`, served from a thread."""

    def __init__(self, bus_address: str, delay_max_usec: int = 5_000_000, deny_inhibit: bool = False,
                 on_release=None) -> None:
        """`on_release(lock)`, if given, runs in the serving thread the moment a lock's fd reaches
        EOF, before the lock counts as released; its result is kept in `lock.seen_at_release`
        (a test looks at the checkpoints dir there: was the commit already on disk?)."""
        self.delay_max_usec = delay_max_usec
        self.deny_inhibit = deny_inhibit
        self.on_release = on_release
        self.conn = open_dbus_connection(bus=bus_address, enable_fds=True)
        reply = Proxy(message_bus, self.conn, timeout=5).RequestName(LOGIN1, 0)
        assert reply == (1,), f"could not own {LOGIN1}: {reply}"  # 1 = primary owner
        self.unique_name = self.conn.unique_name
        self.locks: list[Lock] = []
        self._send_mu = threading.Lock()
        self._mu = threading.Lock()
        self._changed = threading.Condition(self._mu)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="fake-login1", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- test API

    def emit(self, member: str, active: bool) -> float:
        """Emit PrepareForSleep/PrepareForShutdown(active); returns time.monotonic() at send."""
        sig = new_signal(DBusAddress(PATH, interface=MANAGER), member, "b", (active,))
        with self._send_mu:
            t = time.monotonic()
            self.conn.send(sig)
        return t

    def prepare_for_sleep(self, active: bool) -> float:
        return self.emit("PrepareForSleep", active)

    def prepare_for_shutdown(self, active: bool) -> float:
        return self.emit("PrepareForShutdown", active)

    def held_locks(self) -> list[Lock]:
        with self._mu:
            return [lk for lk in self.locks if lk.held]

    def wait_for(self, predicate, timeout_s: float = 5.0) -> bool:
        """Wait until predicate(self) is true; re-checked whenever a lock is taken or released."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                self._mu.release()
                try:
                    ok = predicate(self)
                finally:
                    self._mu.acquire()
                if ok:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.05))

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        self.conn.close()
        with self._mu:
            for lk in self.locks:
                if lk.read_fd >= 0:
                    os.close(lk.read_fd)
                    lk.read_fd = -1
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---------------------------------------------------------------- server

    def _serve(self) -> None:
        sock = self.conn.sock
        while not self._stop.is_set():
            with self._mu:
                watched = {lk.read_fd: lk for lk in self.locks if lk.held and lk.read_fd >= 0}
            try:
                readable, _, _ = select.select([sock, self._wake_r, *watched], [], [], 1.0)
            except (OSError, ValueError):
                return
            now, wall = time.monotonic(), time.time()
            for fd in readable:
                if fd in watched and not os.read(fd, 1):  # EOF: every copy of the write end closed
                    seen = self.on_release(watched[fd]) if self.on_release is not None else None
                    with self._changed:
                        lk = watched[fd]
                        lk.released_at, lk.released_wall, lk.seen_at_release = now, wall, seen
                        os.close(fd)
                        lk.read_fd = -1
                        self._changed.notify_all()
            if sock in readable:
                while True:
                    try:
                        msg = self.conn.receive(timeout=0)
                    except TimeoutError:
                        break
                    except (ConnectionError, OSError):
                        return
                    self._handle(msg)

    def _reply(self, msg) -> None:
        with self._send_mu:
            self.conn.send(msg)

    def _handle(self, msg) -> None:
        if msg.header.message_type is not MessageType.method_call:
            return
        f = msg.header.fields
        iface, member = f.get(HeaderFields.interface), f.get(HeaderFields.member)
        if (iface, member) == (MANAGER, "Inhibit"):
            what, who, why, mode = msg.body
            if self.deny_inhibit:
                self._reply(new_error(msg, "org.freedesktop.DBus.Error.AccessDenied", "s",
                                      ("Permission denied",)))
                return
            r, w = os.pipe()
            with self._changed:
                self.locks.append(Lock(what, who, why, mode, r, time.monotonic()))
                self._changed.notify_all()
            try:
                self._reply(new_method_return(msg, "h", (w,)))
            finally:
                os.close(w)  # the client now holds the only write end
        elif (iface, member) == (PROPS, "Get"):
            interface, name = msg.body
            if (interface, name) == (MANAGER, "InhibitDelayMaxUSec"):
                self._reply(new_method_return(msg, "v", (("t", self.delay_max_usec),)))
            else:
                self._reply(new_error(msg, "org.freedesktop.DBus.Error.UnknownProperty", "s", (name,)))
        else:
            self._reply(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (str(member),)))
