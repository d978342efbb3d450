"""A rank's background thread: polls control.json and the supervisor PID, writes status.json.

Nothing here touches torch or the model: the thread only sets flags that the training loop
reads at the next optimizer-step boundary, and (on rank 0) writes a snapshot the loop keeps
current. All decisions that need every rank to agree happen in the loop, by collective.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

from train_core.contract import pid_alive
from train_core.runfiles import RunPaths, read_control, read_json, write_json_atomic
from train_core.signals import StopFlag

log = logging.getLogger(__name__)

CONTROL_POLL_S = 0.25
SUPERVISOR_POLL_S = 1.0
HEARTBEAT_S = 1.0  # contract: status.json at least every ~2 s


class ControlState:
    """What the rank has seen of control.json (written by the watcher thread only)."""

    def __init__(self, initial_save_seq: int) -> None:
        self.pause = False
        self.save_seq = initial_save_seq
        self.stop_budget_s = 0.0  # a stop's own budget (logind's delay), when control.json gives one


class RankWatcher:
    """Daemon thread; `stop()` joins it. `status_fn` returns rank 0's status dict (or None)."""

    def __init__(
        self,
        paths: RunPaths,
        flag: StopFlag,
        *,
        status_fn: Callable[[], dict[str, Any]] | None,
        supervisor_pid: int | None,
        control_poll_s: float = CONTROL_POLL_S,
        heartbeat_s: float = HEARTBEAT_S,
        supervisor_poll_s: float = SUPERVISOR_POLL_S,
        orphan_deadline_s: float | None = None,
    ) -> None:
        self.paths = paths
        self.flag = flag
        self.status_fn = status_fn
        self.supervisor_pid = supervisor_pid
        self.control_poll_s = control_poll_s
        self.heartbeat_s = heartbeat_s
        self.supervisor_poll_s = supervisor_poll_s
        # Once the supervisor is gone, nobody would escalate: after this long (its grace +
        # kill window, TRAINSUP_STOP_WINDOW_S) the rank ends itself, saved or not.
        self.orphan_deadline_s = orphan_deadline_s
        self._orphaned_at: float | None = None
        # A save_seq already there at startup is an old request: never replay it.
        self.control = ControlState(read_control(paths.control).save_seq)
        self._write_lock = threading.Lock()
        self._control_lock = threading.Lock()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainsup-watcher", daemon=True)
        self._control_mtime_ns: int | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def poll_control(self) -> None:
        """Read control.json when it changed (one stat when it did not). The thread calls it, and
        the training loop at every step boundary, so a request is seen at the next step, not up
        to control_poll_s later (logind gives a sleep only ~5 s)."""
        with self._control_lock:
            self._poll_control()

    def _poll_control(self) -> None:
        try:
            mtime = os.stat(self.paths.control).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._control_mtime_ns:
            return
        self._control_mtime_ns = mtime
        if read_json(self.paths.control) is None:
            return
        ctl = read_control(self.paths.control)
        if ctl.stop:
            self.control.stop_budget_s = ctl.budget_s
            if not self.flag.is_set():
                self.flag.set(f"control.json stop ({ctl.reason or 'no reason given'})")
        self.control.pause = ctl.pause
        if ctl.save_seq > self.control.save_seq:
            self.control.save_seq = ctl.save_seq

    def write_status(self) -> None:
        if self.status_fn is None:
            return
        with self._write_lock:
            status = self.status_fn()
            if status is None:
                return
            status["updated_at"] = time.time()
            try:
                write_json_atomic(self.paths.status, status, durable=False)
            except OSError as e:  # a full disk must not kill training; the save will report it
                log.warning("could not write %s: %s", self.paths.status, e)

    def _run(self) -> None:
        next_beat = next_sup = 0.0
        while not self._halt.is_set():
            now = time.monotonic()
            try:
                self.poll_control()
            except Exception as e:  # noqa: BLE001 - a watcher must never die
                log.warning("could not read %s: %s", self.paths.control, e)
            if self.supervisor_pid is not None and now >= next_sup:
                next_sup = now + self.supervisor_poll_s
                if self._orphaned_at is None and not pid_alive(self.supervisor_pid):
                    self._orphaned_at = now
                    if not self.flag.is_set():
                        log.warning("supervisor (pid %d) is gone: saving and stopping", self.supervisor_pid)
                        self.flag.set(f"supervisor pid {self.supervisor_pid} is gone")
            if (self._orphaned_at is not None and self.orphan_deadline_s is not None
                    and now - self._orphaned_at > self.orphan_deadline_s):
                log.error("supervisor gone %.0f s ago and this rank has not exited: ending it (no process of "
                          "a run outlives its stop window)", now - self._orphaned_at)
                os._exit(1)
            if self.status_fn is not None and now >= next_beat:
                next_beat = now + self.heartbeat_s
                try:
                    self.write_status()
                except Exception as e:  # noqa: BLE001
                    log.warning("heartbeat failed: %s", e)
            self._halt.wait(self.control_poll_s)
