"""logind over D-Bus (jeepney): save a checkpoint before the machine sleeps or shuts down.

How logind delay locks work: `Manager.Inhibit("sleep:shutdown", who, why,
"delay")` returns a file descriptor; while any process holds such an fd open,
logind announces a suspend/poweroff with `PrepareForSleep(true)` /
`PrepareForShutdown(true)` and then waits until every delay lock is closed or
`InhibitDelayMaxUSec` (logind.conf InhibitDelayMaxSec, default 5 s) has passed.
After resume it sends `PrepareForSleep(false)`; the lock must be taken again.

`LogindWatcher` (supervisor.watch.Watcher):
- takes the delay lock when it starts;
- PrepareForSleep(true)    -> Decision SAVE  (ranks commit at the next step, keep going)
- PrepareForShutdown(true) -> Decision STOP  (ranks save and exit 75)
- releases the lock (closes the fd) as soon as `on_checkpoint()` reports a
  commit other than the last one it knew of when the request came, or when the delay
  budget (InhibitDelayMaxUSec minus `release_margin_s`) runs out, whichever is
  first; until the system is back, `blocking_reason()` keeps new attempts from
  starting;
- PrepareForSleep(false) / PrepareForShutdown(false) (resume, or a cancelled
  shutdown) -> lock re-taken, a NOTE decision, `blocking_reason()` is None again
  (so a stopped run restarts).

All D-Bus I/O runs in one background thread; `poll()` only drains a queue.
`on_checkpoint()` closes the fd directly (a close is instant and it is the
latency that matters). Latency: the thread calls `wakeup` right after it queues
a decision, and, while a request waits for its checkpoint, it also watches
`checkpoint_dir` (one stat every `COMMIT_POLL_S`) and calls `wakeup` when the
directory changes, so a loop that sleeps between ticks sees the commit, and
reports it through `on_checkpoint()`, within milliseconds instead of a tick.
No system bus or no logind -> one warning, one NOTE decision, status
{"available": false, "reason": ...}, and the run continues.

jeepney trap (docs/platform.md, "logind"): signals carry the sender's UNIQUE name (":1.7"), so
both the bus match rule and the local filter use the owner of
org.freedesktop.login1 from GetNameOwner. That also ignores anyone else
emitting a look-alike PrepareForSleep.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import InitVar, asdict, dataclass
from typing import Any, Callable, Mapping

from supervisor.config import Section
from supervisor.watch import Action, Decision

log = logging.getLogger(__name__)

LOGIN1_NAME = "org.freedesktop.login1"
LOGIN1_PATH = "/org/freedesktop/login1"
LOGIN1_MANAGER = "org.freedesktop.login1.Manager"
DEFAULT_SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
DEFAULT_DELAY_MAX_S = 5.0  # logind's default InhibitDelayMaxSec, used if the property can't be read
COMMIT_POLL_S = 0.02  # checkpoint_dir stat interval while a request waits for its commit


def system_bus_address(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS


@dataclass(frozen=True)
class LogindConfig:
    """The `[logind]` section of job.toml (all optional)."""

    enabled: bool = True
    release_margin_s: float = 0.5  # release this long before logind stops waiting anyway
    what: str = "sleep:shutdown"
    where: InitVar[str] = "logind"

    def __post_init__(self, where: str) -> None:
        # Built directly or by dataclasses.replace: checked exactly as if read from job.toml.
        _read_logind_keys(Section(f"[{where}]", asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "logind") -> "LogindConfig":
        """Build from the parsed `[logind]` table; JobConfigError names `[logind] key` and the fix."""
        s = Section(f"[{where}]", d)
        values = _read_logind_keys(s)
        s.done()
        return cls(**values, where=where)


def _read_logind_keys(s: Section) -> dict[str, Any]:
    """Every [logind] key, checked; LogindConfig's defaults for those left out."""
    d = LogindConfig
    values = dict(
        enabled=s.bool("enabled", d.enabled),
        release_margin_s=s.float("release_margin_s", d.release_margin_s, low=0, hint=" (seconds)"),
        what=s.str("what", d.what),
    )
    if any(part not in ("sleep", "shutdown") for part in values["what"].split(":")):
        s.fail(f'must be "sleep", "shutdown" or "sleep:shutdown", got {values["what"]!r}', "what")
    return values


class LogindWatcher:
    """supervisor.watch.Watcher for logind sleep/shutdown. Starts its thread at once."""

    name = "logind"

    def __init__(
        self,
        config: LogindConfig | None = None,
        *,
        bus_address: str | None = None,
        why: str = "saving a training checkpoint first",
        clock: Callable[[], float] = time.monotonic,
        connect_timeout_s: float = 2.0,
        wakeup: Callable[[], None] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        start: bool = True,
    ) -> None:
        self.config = config or LogindConfig()
        self.bus_address = bus_address or system_bus_address()
        self.why = why
        self.clock = clock  # the thread keeps its own time: the budget must expire without poll()
        self.connect_timeout_s = connect_timeout_s
        # Called from the D-Bus thread after a decision is queued, so a loop that sleeps
        # between ticks can wake at once (e.g. threading.Event.set): every tick of delay
        # before the SAVE reaches the ranks comes out of logind's 5 s.
        self.wakeup = wakeup
        # Watched (mtime) only between a PrepareFor*(true) and the release; see the module doc.
        self.checkpoint_dir = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None
        self._decisions: "queue.SimpleQueue[Decision]" = queue.SimpleQueue()
        self._mu = threading.Lock()  # guards everything below (main thread vs. D-Bus thread)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available: bool | None = None  # None until the thread has tried
        self.unavailable_reason: str | None = None
        self.delay_max_s: float | None = None
        self._lock_fd: int | None = None
        self._lock_error: str | None = None
        self._pending: str | None = None  # "sleep" | "shutdown" while logind is waiting on us
        self._released = False  # lock given back for the current request
        self._request_at: float | None = None
        self._deadline: float | None = None
        self._step_at_request: int | None = None
        self._last_step: int | None = None
        self._retake = False  # the thread should call Inhibit again
        self.last_release: dict[str, Any] | None = None
        if not self.config.enabled:
            self.available = False
            self.unavailable_reason = "disabled in job.toml ([logind] enabled = false)"
            self._ready.set()
        elif start:
            self.start()

    # ------------------------------------------------------------------ Watcher API

    def start(self) -> None:
        if self._thread is None and self.config.enabled:
            self._thread = threading.Thread(target=self._run, name="trainsup-logind", daemon=True)
            self._thread.start()

    def wait_ready(self, timeout_s: float = 5.0) -> bool:
        """Block until the thread has connected (or given up). For tests and startup."""
        return self._ready.wait(timeout_s)

    def poll(self, now: float) -> list[Decision]:
        out = []
        while True:
            try:
                out.append(self._decisions.get_nowait())
            except queue.Empty:
                return out

    def blocking_reason(self, now: float) -> str | None:
        with self._mu:
            if self._pending == "sleep":
                return "the system is going to sleep (logind PrepareForSleep)"
            if self._pending == "shutdown":
                return "the system is shutting down (logind PrepareForShutdown)"
        return None

    def on_checkpoint(self, step: int, now: float) -> None:
        with self._mu:
            # The loop reports each commit once; a repeat of the step we already knew when the
            # request came is not the save we asked for. (Not "step > known": a run that
            # resumed from an older checkpoint commits lower steps.)
            new = step != self._step_at_request
            self._last_step = step
            if self._pending and not self._released and new:
                self._release_locked(f"checkpoint step {step} committed")

    def status(self) -> dict[str, Any]:
        with self._mu:
            if not self.available:
                return {"available": False,
                        "reason": self.unavailable_reason or "connecting to the system bus"}
            return {
                "available": True,
                "bus": self.bus_address,
                "lock_held": self._lock_fd is not None,
                "lock_error": self._lock_error,
                "delay_max_s": self.delay_max_s,
                "budget_s": self.budget_s,
                "pending": self._pending,
                "last_release": self.last_release,
            }

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with self._mu:
            self._close_fd_locked()

    # ------------------------------------------------------------------ state (hold self._mu)

    @property
    def budget_s(self) -> float:
        delay = self.delay_max_s if self.delay_max_s is not None else DEFAULT_DELAY_MAX_S
        return max(0.0, delay - self.config.release_margin_s)

    @property
    def lock_held(self) -> bool:
        with self._mu:
            return self._lock_fd is not None

    def _close_fd_locked(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    def _release_locked(self, why: str) -> None:
        now = self.clock()
        had = self._lock_fd is not None
        self._close_fd_locked()
        self._released = True
        latency = now - self._request_at if self._request_at is not None else None
        self.last_release = {"for": self._pending, "why": why, "latency_s": latency, "lock_was_held": had}
        if had:
            log.info("logind: released the %s inhibitor after %.3f s: %s", self._pending, latency or 0.0, why)

    def _on_prepare(self, kind: str, active: bool) -> None:
        now = self.clock()
        with self._mu:
            if active:
                if self._pending is not None:
                    return  # repeated announcement
                self._pending = kind
                self._released = False
                self._request_at = now
                self._deadline = now + self.budget_s
                self._step_at_request = self._last_step
                budget = self.budget_s
                if kind == "sleep":
                    d = Decision(Action.SAVE, "prepare_for_sleep",
                                 f"the system is going to sleep: saving a checkpoint, then releasing the "
                                 f"sleep inhibitor (at most {budget:.1f} s)", {"budget_s": budget})
                else:
                    d = Decision(Action.STOP, "prepare_for_shutdown",
                                 f"the system is shutting down: saving a checkpoint and stopping, then "
                                 f"releasing the shutdown inhibitor (at most {budget:.1f} s)", {"budget_s": budget})
                self._queue(d)
                log.info("logind: %s", d.reason)
                if budget <= 0:
                    self._release_locked("no delay budget (InhibitDelayMaxUSec <= release_margin_s)")
            else:
                if self._pending != kind:
                    return
                if not self._released:
                    self._release_locked(f"{kind} ended before a checkpoint")
                self._pending = None
                self._request_at = self._deadline = self._step_at_request = None
                self._retake = True
                event = "resumed_from_sleep" if kind == "sleep" else "shutdown_cancelled"
                what = "the system woke up" if kind == "sleep" else "the shutdown was cancelled"
                self._queue(Decision(Action.NOTE, event,
                                     f"{what}: inhibitor lock taken again; training may continue"))

    def _queue(self, d: Decision) -> None:
        self._decisions.put(d)

    def _kick(self) -> None:
        """Run the wakeup callback; never with self._mu held (it may call status())."""
        if self.wakeup is not None:
            try:
                self.wakeup()
            except Exception:  # noqa: BLE001 - a broken callback must not kill the D-Bus thread
                log.exception("logind: wakeup callback failed")

    def _check_deadline(self) -> None:
        with self._mu:
            if self._pending and not self._released and self._deadline is not None \
                    and self.clock() >= self._deadline:
                log.warning("logind: no checkpoint within %.1f s of %s; releasing the inhibitor so the "
                            "system can proceed", self.budget_s, self._pending)
                self._release_locked("delay budget ran out before a checkpoint was committed")

    def _set_unavailable(self, reason: str) -> None:
        with self._mu:
            first = self.available is not False
            self.available = False
            self.unavailable_reason = reason
            self._close_fd_locked()
            # Without the bus no PrepareFor*(false) will come: do not block restarts forever.
            self._pending = None
            self._deadline = None
        if first:  # one line on the console: the runner prints the note (and logs the event)
            self._queue(Decision(Action.NOTE, "logind_unavailable",
                                 f"{reason}: sleep/shutdown will not wait for a checkpoint"))
            self._kick()

    # ------------------------------------------------------------------ D-Bus thread

    def _run(self) -> None:
        try:
            from jeepney.io.blocking import open_dbus_connection
        except ImportError as e:  # pragma: no cover - jeepney is a dependency
            self._set_unavailable(f"jeepney is not installed ({e})")
            self._ready.set()
            return

        conn = None
        try:
            try:
                conn = open_dbus_connection(bus=self.bus_address, enable_fds=True,
                                            auth_timeout=self.connect_timeout_s)
            except Exception as e:  # noqa: BLE001 - any failure means "no bus"
                self._set_unavailable(f"no D-Bus system bus at {self.bus_address} ({type(e).__name__}: {e})")
                return
            self._watch_login1(conn)
        except (ConnectionError, OSError, TimeoutError) as e:
            if not self._stop.is_set():
                self._set_unavailable(f"lost the D-Bus system bus ({type(e).__name__}: {e})")
        except Exception as e:  # noqa: BLE001 - the run must go on whatever D-Bus does
            log.exception("logind: watcher thread failed")
            self._set_unavailable(f"logind watcher failed ({type(e).__name__}: {e})")
        finally:
            self._ready.set()
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass

    def _watch_login1(self, conn: Any) -> None:
        """Subscribe to login1's signals, take the delay lock, then serve until close()."""
        from jeepney import DBusAddress, MatchRule
        from jeepney.bus_messages import message_bus
        from jeepney.io.blocking import Proxy
        from jeepney.wrappers import DBusErrorResponse

        bus = Proxy(message_bus, conn, timeout=self.connect_timeout_s)
        try:
            (owner,) = bus.GetNameOwner(LOGIN1_NAME)
        except DBusErrorResponse as e:
            self._set_unavailable(f"logind ({LOGIN1_NAME}) is not on the system bus ({e.name})")
            return
        rule = MatchRule(type="signal", sender=owner, interface=LOGIN1_MANAGER, path=LOGIN1_PATH)
        bus.AddMatch(rule)
        signals: deque = deque()
        # Every message from login1, also those that arrive while we wait for a reply.
        with conn.filter(rule, queue=signals):
            manager = DBusAddress(LOGIN1_PATH, bus_name=LOGIN1_NAME, interface=LOGIN1_MANAGER)
            delay_s = self._read_delay_max(conn, manager)
            with self._mu:
                self.delay_max_s = delay_s
                self.available = True
            self._take_lock(conn, manager)
            log.info("logind: connected (login1 is %s); InhibitDelayMaxSec = %.1f s, budget %.1f s",
                     owner, delay_s, self.budget_s)
            self._ready.set()
            self._serve(conn, manager, signals)

    def _read_delay_max(self, conn: Any, manager: Any) -> float:
        """logind's InhibitDelayMaxUSec in seconds (DEFAULT_DELAY_MAX_S when it cannot be read)."""
        from jeepney import Properties
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg

        try:
            reply = conn.send_and_get_reply(Properties(manager).get("InhibitDelayMaxUSec"),
                                            timeout=self.connect_timeout_s)
            (_sig, usec), = unwrap_msg(reply)
            return int(usec) / 1e6
        except (DBusErrorResponse, ValueError, TypeError) as e:
            log.warning("logind: could not read InhibitDelayMaxUSec (%s); assuming %.0f s", e, DEFAULT_DELAY_MAX_S)
            return DEFAULT_DELAY_MAX_S

    def _take_lock(self, conn: Any, manager: Any) -> None:
        """Inhibit(what, "delay"): the fd replaces any lock held; a refusal is remembered in _lock_error."""
        from jeepney import new_method_call
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg

        msg = new_method_call(manager, "Inhibit", "ssss", (self.config.what, "trainsup", self.why, "delay"))
        try:
            (fd,) = unwrap_msg(conn.send_and_get_reply(msg, timeout=self.connect_timeout_s))
        except DBusErrorResponse as e:
            with self._mu:
                self._lock_error = f"{e.name}: {e.data}"
            log.warning("logind: could not take a %s delay lock (%s); a sleep or shutdown "
                        "will still ask for a checkpoint but will not wait for it", self.config.what, e.name)
            return
        raw = fd.to_raw_fd()
        with self._mu:
            self._close_fd_locked()
            self._lock_fd = raw
            self._lock_error = None
        log.debug("logind: %s delay lock taken (fd %d)", self.config.what, raw)

    def _serve(self, conn: Any, manager: Any, signals: deque) -> None:
        """The thread's loop until close(): take the lock again after a resume, wait for D-Bus
        (briefly, watching checkpoint_dir, while a request waits for its commit), handle
        login1's signals, release the lock when the delay budget runs out."""
        dir_stamp = None
        while not self._stop.is_set():
            with self._mu:
                deadline = self._deadline if (self._pending and not self._released) else None
                retake, self._retake = self._retake, False
            if retake:
                self._take_lock(conn, manager)
            wait, dir_stamp = self._next_wait(deadline, dir_stamp)
            try:
                conn.recv_messages(timeout=wait)
            except TimeoutError:
                pass
            self._dispatch(signals)
            self._check_deadline()

    def _next_wait(self, deadline: float | None, dir_stamp: Any) -> tuple[float, Any]:
        """-> (seconds to wait for D-Bus, checkpoint_dir stamp). While a request waits for its
        commit, one look at checkpoint_dir: a change since the last look runs `wakeup`."""
        if deadline is None:
            return 0.25, None
        wait = max(0.0, min(0.25, deadline - self.clock()))
        if self.checkpoint_dir is None:
            return wait, dir_stamp
        # A commit renames a dir into checkpoint_dir: its mtime changes.
        stamp = _dir_stamp(self.checkpoint_dir)
        if dir_stamp is not None and stamp != dir_stamp:
            self._kick()
        return min(wait, COMMIT_POLL_S), stamp

    def _dispatch(self, signals: deque) -> None:
        """PrepareForSleep / PrepareForShutdown from login1 (the filter let only its messages in)."""
        from jeepney import MessageType

        while signals:
            msg = signals.popleft()
            if msg.header.message_type is not MessageType.signal:
                continue
            member = _member(msg)
            if member in ("PrepareForSleep", "PrepareForShutdown") and msg.body:
                self._on_prepare("sleep" if member == "PrepareForSleep" else "shutdown", bool(msg.body[0]))
                self._kick()


def _dir_stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


def _member(msg: Any) -> str | None:
    from jeepney import HeaderFields

    return msg.header.fields.get(HeaderFields.member)
