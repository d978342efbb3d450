"""sd_notify(3) over $NOTIFY_SOCKET, without libsystemd.

systemd (Type=notify) gives the service a datagram socket in $NOTIFY_SOCKET: a
filesystem path, or '@name' for a Linux abstract socket. Each message is one
datagram of newline-separated KEY=VALUE lines. Outside systemd the variable is
unset and every call here is a cheap no-op, so the main loop calls it
unconditionally.

Watchdog: with WatchdogSec= set, systemd exports WATCHDOG_USEC (and
WATCHDOG_PID, the PID that must ping). We ping at half the interval, as
sd_watchdog_enabled(3) recommends.

The children must not inherit these variables (a rank could otherwise confuse
systemd with its own READY=1 under NotifyAccess=all); `child_env()` drops them.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger(__name__)

SD_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` without the systemd notify/watchdog variables."""
    return {k: v for k, v in env.items() if k not in SD_ENV_VARS}


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return " ".join(str(text).split())


class SdNotifier:
    """Sends sd_notify messages; all methods are no-ops without $NOTIFY_SOCKET."""

    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        env = os.environ if env is None else env
        self.address: str | None = env.get("NOTIFY_SOCKET") or None
        self._sock: socket.socket | None = None
        self._warned = False
        self.watchdog_interval_s: float | None = None
        self._last_watchdog: float | None = None
        usec = env.get("WATCHDOG_USEC")
        wd_pid = env.get("WATCHDOG_PID")
        if self.address and usec:
            try:
                interval = int(usec) / 1e6
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
                interval = 0.0
            # WATCHDOG_PID names the process systemd expects pings from.
            mine = str(os.getpid() if pid is None else pid)
            if interval > 0 and (not wd_pid or wd_pid == mine):
                self.watchdog_interval_s = interval

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _target(self) -> str:
        assert self.address is not None
        return "\0" + self.address[1:] if self.address.startswith("@") else self.address

    def notify(self, *lines: str) -> bool:
        """Send one datagram of KEY=VALUE lines; True if sent. Never raises."""
        if not self.address:
            return False
        data = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self._target())
            return True
        except OSError as e:
            # Notification must never take training down; warn once.
            if not self._warned:
                log.warning("sd_notify to %s failed: %s (further failures not logged)", self.address, e)
                self._warned = True
            return False

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"]
        if status:
            lines.append("STATUS=" + _one_line(status))
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        return self.notify("STATUS=" + _one_line(text))

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"]
        if status:
            lines.append("STATUS=" + _one_line(status))
        return self.notify(*lines)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask systemd for `seconds` more before it gives up on a start/stop
        (EXTEND_TIMEOUT_USEC); useful while a final checkpoint is being written."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def watchdog_due(self, now: float) -> bool:
        if self.watchdog_interval_s is None:
            return False
        return self._last_watchdog is None or now - self._last_watchdog >= self.watchdog_interval_s / 2

    def maybe_watchdog(self, now: float) -> bool:
        """Ping the watchdog if half the interval has passed; call every loop turn."""
        if not self.watchdog_due(now):
            return False
        self._last_watchdog = now
        return self.watchdog()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
