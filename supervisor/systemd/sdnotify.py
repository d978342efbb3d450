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

`SdNotifyReporter` wraps the runner's Reporter (supervisor.runner): the runner calls
`progress(snapshot)` once per loop turn, and that is where READY, STATUS, WATCHDOG and
STOPPING go out, so the watchdog pings exactly as long as the main loop turns.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Callable, Mapping

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


def status_text(snap: Mapping[str, Any]) -> str:
    """One line for `systemctl status` from a runner snapshot (supervisor.json's fields)."""
    state = snap.get("state") or "starting"
    head = f"{state} (attempt {snap['attempt']})" if snap.get("attempt") else str(state)
    parts = [head]
    step, max_steps = snap.get("step"), snap.get("max_steps")
    if isinstance(step, int):
        parts.append(f"step {step}/{max_steps}" if max_steps else f"step {step}")
    loss = snap.get("loss")
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        parts.append(f"loss {loss:.4f}")
    ck = (snap.get("last_checkpoint") or {}).get("step")
    if ck is not None:
        parts.append(f"checkpoint {ck}")
    if snap.get("paused_by"):
        parts.append("paused by " + ", ".join(snap["paused_by"]))
    if state == "waiting" and snap.get("blocked_by"):
        parts.append(str(snap["blocked_by"]))
    return ", ".join(parts)


class SdNotifyReporter:
    """A runner Reporter that forwards everything to `inner` and tells systemd how the run goes.

    - READY=1 on the first loop turn: an attempt was started, or the run waits for a watcher
      (on battery, too hot); either way the service is up.
    - STATUS= whenever the line changes: at once on a state change, else at most every
      `status_every_s` (the step changes every few hundred ms).
    - WATCHDOG=1 at half of WatchdogSec, from the loop itself.
    - STOPPING=1 once `stop_requested()` is true (the supervisor got SIGTERM/SIGINT/...), with
      EXTEND_TIMEOUT_USEC=`stop_timeout_s`: the supervisor kills the ranks itself after its
      grace period, so systemd must not SIGKILL the run before that even when the unit's
      TimeoutStopSec is shorter than the job's [stop] timings.
    - `finished(code, reason)` after the runner returns: STOPPING=1 (if not sent) and the reason.
    """

    def __init__(
        self,
        inner: Any,
        notifier: SdNotifier,
        *,
        stop_requested: Callable[[], bool] = lambda: False,
        stop_timeout_s: float | None = None,
        status_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.notifier = notifier
        self.stop_requested = stop_requested
        self.stop_timeout_s = stop_timeout_s
        self.status_every_s = status_every_s
        self.clock = clock
        self.ready_sent = False
        self.stopping_sent = False
        self._last_text: str | None = None
        self._last_state: Any = None
        self._last_status_at = 0.0

    def __getattr__(self, name: str) -> Any:
        # Reporter hooks this class does not know (added later) reach the inner reporter as is.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def child_output(self, line: str) -> None:
        self.inner.child_output(line)

    def progress(self, snapshot: dict[str, Any]) -> None:
        self.inner.progress(snapshot)
        if not self.notifier.enabled:
            return
        now = self.clock()
        text = status_text(snapshot)
        state = snapshot.get("state")
        sent = True
        if not self.ready_sent:
            self.ready_sent = True
            self.notifier.ready(text)
        elif not self.stopping_sent and self.stop_requested():
            self.stopping_sent = True
            self.notifier.stopping(text)
            if self.stop_timeout_s:
                self.notifier.extend_timeout(self.stop_timeout_s)
        elif text != self._last_text and (state != self._last_state
                                          or now - self._last_status_at >= self.status_every_s):
            self.notifier.status(text)
        else:
            sent = False
        if sent:
            self._last_text, self._last_state, self._last_status_at = text, state, now
        self.notifier.maybe_watchdog(now)

    def finished(self, exit_code: int, reason: str) -> None:
        text = f"exited {exit_code}: {reason}" if reason else f"exited {exit_code}"
        if self.stopping_sent:
            self.notifier.status(text)
        else:
            self.stopping_sent = True
            self.notifier.stopping(text)
