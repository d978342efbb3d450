"""The supervisor's main loop: one run dir, a sequence of attempts, an explicit state machine.

    STARTING --first heartbeat--> RUNNING
    STARTING/RUNNING --stop request / hang / orphaned ranks--> STOPPING
    STARTING/RUNNING/STOPPING --attempt over--> BACKOFF | WAITING | EXITED | FATAL
    BACKOFF --delay over--> STARTING | WAITING (a watcher blocks the start)
    WAITING --no watcher blocks--> STARTING
    BACKOFF/WAITING --stop request--> EXITED

Each transition is one log line and one events.jsonl record with its cause.

Signal handlers only enqueue (and wake the loop through signal.set_wakeup_fd); the loop
drains the queue, polls the children, the heartbeat, the checkpoints and the watchers,
and acts. Nothing here sleeps except the loop's own select().
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import random
import re
import select
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import filelock

from supervisor import rundir
from supervisor.watch import registry as extensions
from supervisor.runner import launch as L
from supervisor.config import JobConfig, save_signal_of
from supervisor.errors import LockedError
from train_core.contract import EXIT_GAVE_UP, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, outlast_stop_s
from supervisor.events import EventLog, read_events
from supervisor.runner.states import ALLOWED, State, TransitionError
from supervisor.watch.thermal import GpuConfig, next_batch_shape, oom_give_up_reason
from train_core.contract import ExitKind
from supervisor.runner.policy import (
    AttemptResult,
    LauncherStatus,
    RestartState,
    Verdict,
    after_exit,
    choose_resume,
    classify_exit,
    exit_code_for_stop,
)
from supervisor.watch import Action, Watcher
from train_core import runfiles, safeload
from train_core.retention import Entry, plan_retention
from train_core.store import Checkpoint, CheckpointStore, StoreError

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
LOCK_PID_SUFFIX = ".pid"


class Reporter(Protocol):
    """Where the CLI shows what happens (logging covers transitions; this covers the rest)."""

    def child_output(self, line: str) -> None: ...

    def progress(self, snapshot: dict[str, Any]) -> None: ...


class NullReporter:
    def child_output(self, line: str) -> None:
        pass

    def progress(self, snapshot: dict[str, Any]) -> None:
        pass


# --------------------------------------------------------------------------- watchers

# One factory per watcher kind: factory(job) -> Watcher, or None when the job does not want
# it. The built-in ones ([gpu], [power], [logind]) come from supervisor.watch.registry.
WATCHER_FACTORIES: list[Callable[[JobConfig], Watcher | None]] = list(extensions.WATCHERS)


def build_watchers(job: JobConfig) -> list[Watcher]:
    out = []
    for factory in WATCHER_FACTORIES:
        w = factory(job)
        if w is not None:
            out.append(w)
    return out


# --------------------------------------------------------------------------- lock


def acquire_run_lock(run_dir: Path, *, group_shared: bool = False) -> filelock.BaseFileLock:
    """One supervisor per run dir; LockedError (exit 4) names the PID holding it.

    First the run dir is made private, or refused when someone else could have written it
    (rundir.secure_run_dir, exit 2). The lock and pid files are never followed as symlinks."""
    for note in rundir.secure_run_dir(run_dir, group_shared=group_shared):
        log.info("%s", note)
    paths = runfiles.RunPaths(run_dir)
    os.close(rundir.open_nofollow(paths.lock, os.O_RDONLY | os.O_CREAT))  # filelock would follow a link
    lock = filelock.FileLock(str(paths.lock), timeout=0)
    pid_file = Path(str(paths.lock) + LOCK_PID_SUFFIX)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        holder = "unknown pid"
        try:
            holder = f"pid {int(pid_file.read_text().strip())}"
        except (OSError, ValueError):
            pass
        raise LockedError(f"run dir {run_dir} is locked by another supervisor ({holder}); "
                          "stop it first (trainsup status shows it) or use another --run-dir") from None
    rundir.write_pid_file(pid_file, os.getpid())
    return lock


# --------------------------------------------------------------------------- attempt


@dataclass
class Attempt:
    number: int
    child: L.Child
    plan: L.LaunchPlan
    started_at: float
    resume: Checkpoint | None
    newest_at_start: int  # newest valid step when it started (-1: none)
    heartbeat_seen_at: float | None = None
    heartbeat_stamp: Any = None
    heartbeat: dict[str, Any] | None = None
    max_step: int = -1
    stop_requested_at: float | None = None
    stop_cause: str = ""
    newest_at_stop: int = -1
    grace_deadline: float | None = None
    term_sent_at: float | None = None
    kill_sent_at: float | None = None
    hung: bool = False
    signalled: set[int] = field(default_factory=set)
    rank_pids: dict[int, int] = field(default_factory=dict)  # verified descendants only
    pid_started: dict[int, float] = field(default_factory=dict)  # pid -> start time when first verified
    refused_pids: set[int] = field(default_factory=set)  # named in a rank file, not of this run
    log_offset: int = 0
    log_partial: bytes = b""
    launcher_exit_logged: bool = False


# --------------------------------------------------------------------------- runner


class Runner:
    def __init__(
        self,
        job: JobConfig,
        *,
        watchers: Sequence[Watcher] = (),
        reporter: Reporter | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        subreaper: bool = False,
        install_signals: bool = True,
    ) -> None:
        self.job = job
        self.save_signal = save_signal_of(job)  # exit 2 now for a bad TRAINSUP_SAVE_SIGNAL
        self.paths = runfiles.RunPaths(job.run_dir)
        self.store = CheckpointStore(self.paths.checkpoints, trust_pickle=safeload.trust_pickle_from_env(
            {**os.environ, **job.train.env}))
        self.watchers = list(watchers)
        self.reporter = reporter or NullReporter()
        # Timers (hang, startup, backoff, grace, intervals) run on `clock`: CLOCK_MONOTONIC stops
        # while the machine sleeps, so a laptop asleep for longer than hang_timeout_s wakes to a
        # running job, not a "hang" kill. Events and supervisor.json keep wall-clock times.
        self.clock = clock
        self.wall_clock = wall_clock
        self.rand = rand
        self.subreaper = subreaper
        self.install_signals = install_signals

        self.state: State | None = None
        self.attempt: Attempt | None = None
        self.attempts = 0  # attempt number of the latest attempt in this run dir
        self._first_attempt = 0  # attempts before this supervisor started
        self.restart_state = RestartState()
        self.excluded_steps: set[int] = set()  # checkpoints that failed to load
        self.exit_code: int | None = None
        self.exit_reason = ""
        self.user_stop: int | None = None  # the signal of the user's stop request
        self.stop_now = False
        self._sigint_seen = False  # a first Ctrl-C came: a second one stops at once
        self.watcher_stop: str | None = None
        self.paused_by: set[str] = set()
        self.control = runfiles.Control()
        self.backoff_until = 0.0
        # Extra env for the next attempts (e.g. an OOM back-off sets TRAINSUP_MICRO_BATCH/GRAD_ACCUM here).
        self.launch_env: dict[str, str] = {}
        self._watched_pids: list[int] | None = None  # rank PIDs last given to watchers' on_attempt
        self.blocked_reason: str | None = None
        self.checkpoints: list[Checkpoint] = []
        self.newest_step = -1
        self._ckpt_stamp: Any = None
        self._last_save_request = 0.0
        self._last_supervisor_json = 0.0
        self._pending: collections.deque[int] = collections.deque()
        self._wake_r = self._wake_w = -1
        self._old_handlers: dict[int, Any] = {}
        self.events: EventLog | None = None
        self.started_at = wall_clock()

    # -- public ---------------------------------------------------------------
    def enqueue_signal(self, signum: int) -> None:
        """What a signal handler does (and what tests call): enqueue, nothing else."""
        self._pending.append(signum)

    def run(self) -> int:
        lock = acquire_run_lock(self.job.run_dir, group_shared=self.job.group_shared)
        try:
            self._setup()
            try:
                now = self.clock()
                self._event("supervisor_start", pid=os.getpid(), job=str(self.job.job_file or ""),
                                   run_dir=str(self.job.run_dir))
                self._refresh_checkpoints(now, force=True)
                self._next_attempt(now)
                while not self.state.terminal:
                    self._tick(self.clock())
                    if not self.state.terminal:
                        self._wait(self.job.watch.poll_interval_s)
            except BaseException as e:
                log.exception("supervisor failed: %s", e)
                if self.exit_code is None:
                    self.exit_code = EXIT_INTERNAL
                    self.exit_reason = f"internal error: {type(e).__name__}: {e}"
                raise
            finally:
                self._teardown()
            return self.exit_code if self.exit_code is not None else EXIT_INTERNAL
        finally:
            lock.release()

    # -- setup / teardown -----------------------------------------------------
    def _setup(self) -> None:
        for d in (self.paths.logs, self.paths.ranks, self.paths.checkpoints):
            d.mkdir(parents=True, exist_ok=True, mode=0o770 if self.job.group_shared else 0o700)
        self.events = EventLog(self.paths.events)
        # Ranks of an earlier supervisor (SIGKILLed) may still be saving: never two sets at once.
        waited_s = rundir.wait_for_old_ranks(self.paths, outlast_stop_s(self.job.stop.grace_s,
                                                                            self.job.stop.kill_after_s))
        if waited_s:
            log.info("the earlier run's ranks are gone after %.1f s; starting", waited_s)
        for p in self.store.remove_stale_tmp():
            log.info("removed stale uncommitted save %s", p.name)
        # Attempt numbers are unique in a run dir, across supervisors: a heartbeat or exit report
        # left by an earlier run is never mistaken for this one's, and no log is reused.
        self.attempts = self._first_attempt = max(
            (int(m.group(1)) for p in self.paths.logs.glob("attempt-*.log")
             if (m := re.fullmatch(r"attempt-(\d+)\.log", p.name))), default=0)
        if self.install_signals:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
            for sig in STOP_SIGNALS:
                self._old_handlers[sig] = signal.signal(sig, lambda s, f: self._pending.append(s))
            # SIGCHLD only wakes the loop (the default disposition is "ignore" without waking)
            self._old_handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda s, f: None)
            for w in self.watchers:  # a watcher with a thread of its own (logind) wakes the loop
                if getattr(w, "wakeup", False) is None:
                    w.wakeup = self.wake

    def _teardown(self) -> None:
        a = self.attempt
        if (self.state is None or not self.state.terminal) and a is not None and L.descendants():
            # The loop died (an internal error; a KeyboardInterrupt, which SIGINT's handler should
            # rule out, alike): only the state machine kills ranks, so they are asked to save as
            # on a normal stop, and escalated to SIGTERM, then SIGKILL, only if they do not exit.
            grace, before = (0.0 if a.hung else self.job.stop.grace_s), self.newest_step
            log.warning("asking the ranks to save and stop before the supervisor exits (up to %g s, then "
                        "SIGTERM, SIGKILL after %g s; Ctrl-C twice stops at once)", grace, self.job.stop.kill_after_s)
            try:
                self._set_control(stop=True, reason=f"supervisor error: {self.exit_reason or 'internal error'}")
                self._signal_ranks(a)
            except Exception:  # noqa: BLE001
                log.exception("could not ask the ranks to save")
            t0, term_at = time.monotonic(), None
            while L.descendants():
                L.reap(self._children(), subreaper=self.subreaper)
                kill_now = False
                while self._pending:  # the loop is gone: only Ctrl-C twice is heard here
                    if self._pending.popleft() == signal.SIGINT:
                        kill_now = kill_now or self._sigint_seen
                        self._sigint_seen = True
                t = time.monotonic()
                try:
                    self._signal_ranks(a)  # ranks that registered since
                    if kill_now or (term_at is not None and t - term_at >= self.job.stop.kill_after_s):
                        self._escalate(self.clock(), signal.SIGKILL)
                        break
                    if term_at is None and t - t0 >= grace:
                        self._escalate(self.clock(), signal.SIGTERM)
                        term_at = t
                except Exception:  # noqa: BLE001
                    log.exception("could not stop the ranks")
                    break
                time.sleep(0.05)
            L.reap(self._children(), subreaper=self.subreaper)
            try:
                self._refresh_checkpoints(self.clock())
                if self.newest_step > before:
                    self.exit_reason = (f"{self.exit_reason}; the ranks saved: checkpoint step "
                                        f"{self.newest_step} committed").lstrip("; ")
            except Exception:  # noqa: BLE001
                log.exception("could not read the checkpoints")
        now = self.clock()
        left = L.descendants()
        if left:
            # Whatever happened above, no process of the run outlives the supervisor.
            log.warning("killing %d leftover process(es) of the run", len(left))
            for p in left:
                try:
                    p.kill()
                except Exception:  # noqa: BLE001
                    pass
            deadline = time.monotonic() + 5
            while L.descendants() and time.monotonic() < deadline:
                L.reap(self._children(), subreaper=self.subreaper)
                time.sleep(0.05)
        L.reap(self._children(), subreaper=self.subreaper)
        for w in self.watchers:
            try:
                w.close()
            except Exception:  # noqa: BLE001
                log.exception("watcher %s failed to close", getattr(w, "name", w))
        if self.events is not None:
            self._event("supervisor_exit", exit_code=self.exit_code, reason=self.exit_reason)
        self._write_supervisor_json(now, force=True)
        if self.events is not None:
            self.events.close()
        if self.install_signals:
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _children(self) -> dict[int, L.Child]:
        return {self.attempt.child.pid: self.attempt.child} if self.attempt else {}

    def wake(self) -> None:
        """Make the loop tick now; safe from any thread (a write to the self-pipe)."""
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"w")
            except OSError:  # pipe full: the loop is waking anyway
                pass

    def _wait(self, timeout_s: float) -> None:
        if self._pending:
            return
        if self._wake_r < 0:
            time.sleep(timeout_s)
            return
        ready, _, _ = select.select([self._wake_r], [], [], timeout_s)
        if ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def _event(self, name: str, **fields: Any) -> dict[str, Any]:
        return self.events.append(name, self.wall_clock(), **fields)

    # -- transitions ----------------------------------------------------------
    def _transition(self, new: State, now: float, cause: str, **fields: Any) -> None:
        old = self.state
        if new not in ALLOWED[old]:
            raise TransitionError(f"illegal transition {old} -> {new} ({cause})")
        self.state = new
        attempt = self.attempt.number if self.attempt else None
        log.info("%s -> %s: %s", old.value if old else "init", new.value, cause)
        self._event("state", **{"from": old.value if old else None}, to=new.value, cause=cause,
                           attempt=attempt, **fields)
        self._write_supervisor_json(now, force=True)

    def _finish(self, now: float, state: State, code: int, reason: str) -> None:
        self.exit_code = code
        self.exit_reason = reason
        self._transition(state, now, reason, exit_code=code)

    # -- the loop ---------------------------------------------------------------
    def _tick(self, now: float) -> None:
        self._handle_signals(now)
        if self.state.terminal:
            return
        L.reap(self._children(), subreaper=self.subreaper)
        self._read_heartbeat(now)
        self._refresh_checkpoints(now)
        self._poll_watchers(now)
        self._echo_output()
        handler = {
            State.STARTING: self._tick_active,
            State.RUNNING: self._tick_active,
            State.STOPPING: self._tick_stopping,
            State.BACKOFF: self._tick_backoff,
            State.WAITING: self._tick_waiting,
        }[self.state]
        handler(now)
        if not self.state.terminal:
            self._write_supervisor_json(now)
            self.reporter.progress(self.snapshot(now))

    def _handle_signals(self, now: float) -> None:
        while self._pending:
            sig = self._pending.popleft()
            if sig not in STOP_SIGNALS:
                continue
            name = signal.Signals(sig).name
            active = self.state in (State.STARTING, State.RUNNING, State.STOPPING)
            # Only Ctrl-C twice skips the save. Any other signal during a stop (a scheduler's
            # SIGTERM, the SIGHUP of a terminal closed after a Ctrl-C) lets the save go on.
            second_ctrl_c = sig == signal.SIGINT and self._sigint_seen
            if sig == signal.SIGINT:
                self._sigint_seen = True
            if self.user_stop is None:
                self.user_stop = sig
                self._event("stop_requested", signal=name)
                log.info("received %s: asking the ranks to save and stop", name)
                if self.state in (State.STARTING, State.RUNNING):
                    self._request_stop(now, f"{name} received: save and stop")
                elif self.state == State.STOPPING:
                    self.attempt.stop_cause = f"{name} received while stopping"
                elif self.state in (State.BACKOFF, State.WAITING):
                    has = self.newest_step >= 0
                    self._finish(now, State.EXITED, exit_code_for_stop(has, sig),
                                 f"{name} received with no attempt running"
                                 + (f"; newest checkpoint step {self.newest_step}" if has else ""))
                    return
                if sig == signal.SIGINT:
                    log.info("Ctrl-C again to stop at once without saving")
            elif second_ctrl_c and not self.stop_now and active:
                self.stop_now = True
                self._event("stop_now", signal=name)
                log.warning("second %s: killing the run now", name)
                if self.state != State.STOPPING:
                    self._request_stop(now, f"second {name}: stop now")
                self._escalate(now, signal.SIGKILL)
            else:
                first = signal.Signals(self.user_stop).name
                why = "already stopping at once" if self.stop_now else "the save goes on"
                self._event("signal_ignored", signal=name, stop_signal=first, reason=why)
                log.info("received %s while stopping on %s: ignored, %s", name, first, why)
                if sig == signal.SIGINT and not self.stop_now and active:
                    log.info("Ctrl-C again to stop at once without saving")

    # -- heartbeat, checkpoints, watchers ----------------------------------------
    def _read_heartbeat(self, now: float) -> None:
        a = self.attempt
        if a is None or self.state not in (State.STARTING, State.RUNNING, State.STOPPING):
            return
        st = runfiles.read_json(self.paths.status)
        if not st or st.get("attempt") != a.number:
            return
        stamp = (st.get("updated_at"), st.get("step"), st.get("state"))
        if stamp != a.heartbeat_stamp:
            a.heartbeat_stamp = stamp
            a.heartbeat_seen_at = now
            a.heartbeat = st
            step = st.get("step")
            if isinstance(step, int):
                a.max_step = max(a.max_step, step)
        if self.state == State.STARTING:
            # a rank's first beat comes before it has loaded the checkpoint: no step to tell yet
            what = "loading/setting up" if st.get("state") == "starting" else f"step {st.get('step')}"
            self._transition(State.RUNNING, now, f"first heartbeat ({what})")

    def _refresh_checkpoints(self, now: float, force: bool = False) -> None:
        try:
            st = os.stat(self.paths.checkpoints)
            stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if not force and stamp == self._ckpt_stamp:
            return
        self._ckpt_stamp = stamp
        try:
            self.checkpoints = self.store.scan()
        except Exception as e:  # noqa: BLE001 - the run dir is untrusted input: never die of a scan
            log.error("cannot read checkpoints: %s", e)
            return
        newest = max((c.step for c in self.checkpoints if c.valid), default=-1)
        if newest > self.newest_step and not force:
            ck = next(c for c in self.checkpoints if c.step == newest)
            self._event("checkpoint", step=newest, reason=ck.reason, path=str(ck.path),
                               attempt=self.attempt.number if self.attempt else None)
            log.info("checkpoint committed: step %d (%s)", newest, ck.reason)
            self._last_save_request = now
            if self.attempt is not None:
                self.attempt.max_step = max(self.attempt.max_step, newest)
            for w in self.watchers:
                try:
                    w.on_checkpoint(newest, now)
                except Exception:  # noqa: BLE001
                    log.exception("watcher %s failed in on_checkpoint", w.name)
            self.newest_step = newest
            self._prune(now)
        self.newest_step = newest

    def _prune(self, now: float) -> None:
        protected = set()
        if self.attempt is not None and self.attempt.resume is not None:
            protected.add(self.attempt.resume.step)
        entries = [Entry(c.step, c.valid, c.metrics, c.reason or "") for c in self.checkpoints]
        plan = plan_retention(self.job.retention, entries, protected=protected)
        if not plan.delete:
            return
        by_step = {c.step: c for c in self.checkpoints}
        deleted = []
        for step in plan.delete:
            try:
                self.store.remove(by_step[step])
                deleted.append(step)
            except (StoreError, OSError) as e:
                log.warning("could not prune step %d: %s", step, e)
        if deleted:
            self._event("prune", deleted=deleted, kept=sorted(plan.keep))
            log.info("retention: removed step(s) %s", ", ".join(map(str, deleted)))
            self.checkpoints = [c for c in self.checkpoints if c.step not in deleted]
            # Rescan on the next tick rather than take the directory's stamp now: a rank may
            # have committed since the scan, and that commit must not go unseen.
            self._ckpt_stamp = None

    def _poll_watchers(self, now: float) -> None:
        for w in self.watchers:
            try:
                decisions = w.poll(now)
            except Exception as e:  # noqa: BLE001
                log.exception("watcher %s failed", w.name)
                self._event("watcher_error", watcher=w.name, error=f"{type(e).__name__}: {e}")
                continue
            for d in decisions:
                self._act(w.name, d, now)

    def _act(self, name: str, d: Any, now: float) -> None:
        self._event(d.event, watcher=name, action=d.action.value, reason=d.reason,
                           details=dict(d.details) or None)
        log.info("%s: %s (%s)", name, d.reason, d.action.value)
        active = self.state in (State.STARTING, State.RUNNING)
        if d.action is Action.PAUSE:
            self.paused_by.add(name)
            self._set_control(pause=True, reason=d.reason)
        elif d.action is Action.RESUME:
            self.paused_by.discard(name)
            if not self.paused_by:
                self._set_control(pause=False, reason=d.reason)
                if self.attempt is not None:
                    self.attempt.heartbeat_seen_at = now  # the hang clock restarts after a pause
        elif d.action is Action.SAVE:
            self._set_control(save_seq=self.control.save_seq + 1, reason=d.reason)
        elif d.action is Action.STOP:
            if active:
                self.watcher_stop = f"{name}: {d.reason}"
                self._request_stop(now, f"{name}: {d.reason}")

    def _set_control(self, **changes: Any) -> None:
        self.control = replace(self.control, **changes)
        try:
            runfiles.write_control(self.paths.control, self.control)
        except OSError as e:  # e.g. a full disk: a stop still reaches the ranks by signal
            log.warning("cannot write %s: %s", self.paths.control, e)

    def _blocking(self, now: float) -> str | None:
        for w in self.watchers:
            try:
                reason = w.blocking_reason(now)
            except Exception:  # noqa: BLE001
                log.exception("watcher %s failed in blocking_reason", w.name)
                continue
            if reason:
                return f"{w.name}: {reason}"
        return None

    # -- attempts ---------------------------------------------------------------
    def _next_attempt(self, now: float) -> None:
        reason = self._blocking(now)
        if reason is not None:
            if self.state != State.WAITING:
                self.blocked_reason = reason
                self._transition(State.WAITING, now, f"not starting: {reason}")
            elif reason != self.blocked_reason:
                self.blocked_reason = reason
                self._event("waiting", reason=reason)
            return
        self.blocked_reason = None
        self._start_attempt(now)

    def _start_attempt(self, now: float) -> None:
        for p in self.store.remove_stale_tmp():  # a save killed in the previous attempt
            log.info("removed uncommitted save %s", p.name)
        self._refresh_checkpoints(now, force=True)
        step = choose_resume(((c.step, c.valid) for c in self.checkpoints), self.excluded_steps)
        resume = next((c for c in self.checkpoints if c.step == step), None) if step is not None else None
        refused = [c for c in self.checkpoints if not c.valid and c.step > (step if step is not None else -1)]
        if refused:  # said once per attempt: what is not resumed from, and that it stays
            log.warning("not resuming from %d newer checkpoint(s) (%s: %s); they stay on disk, `trainsup checkpoints "
                        "list` shows why", len(refused), refused[-1].path.name, refused[-1].problem)
        for p in self.paths.ranks.glob("*.json"):
            p.unlink(missing_ok=True)
        self.watcher_stop = None
        self._set_control(stop=False, pause=bool(self.paused_by), reason="attempt start")
        if self.attempts == self._first_attempt:
            self._restore_oom_backoff(now, resume)
        self.attempts += 1
        number = self.attempts
        plan = L.build_launch(self.job, attempt=number, resume_from=resume.path if resume else None,
                              supervisor_pid=os.getpid(), base_env=os.environ, attempt_env=self.launch_env,
                              port=L.free_port() if self._multi() else None)
        log_path = self.paths.logs / f"attempt-{number}.log"
        child = L.spawn(plan, log_path, cwd=self.job.job_file.parent if self.job.job_file else None, paths=self.paths)
        self.attempt = Attempt(number=number, child=child, plan=plan, started_at=now, resume=resume,
                               newest_at_start=self.newest_step, log_offset=_size(log_path))
        self._transition(State.STARTING, now,
                         f"attempt {number}: " + (f"resuming from {resume.path.name}" if resume else "fresh start"),
                         pid=child.pid, resume_from=str(resume.path) if resume else None,
                         log=str(log_path), argv=list(plan.argv))

    def _multi(self) -> bool:
        lc = self.job.launch
        return lc.launcher == "accelerate" and ((lc.num_processes or 1) > 1 or lc.num_machines > 1)

    def _rank_files(self, a: Attempt) -> dict[int, int]:
        """Rank -> pid from ranks/rank-R.json of this attempt, for pids that are our descendants
        (their start time recorded: a later signal checks it, so a reused pid is never hit)."""
        for p in self.paths.ranks.glob("rank-*.json"):
            info = runfiles.read_json(p)
            if not (info and info.get("attempt") == a.number and isinstance(info.get("pid"), int)
                    and isinstance(info.get("rank", -1), int)):
                continue
            pid = info["pid"]
            if pid in a.pid_started or pid in a.refused_pids:
                continue
            # the accelerate launcher is ours but no rank: the save signal would kill it
            launcher = pid == a.child.pid and self.job.launch.launcher != "python"
            started = None if launcher else L.descendant_start_time(pid)
            if started is None:
                a.refused_pids.add(pid)
                log.warning("%s names pid %d, which is not a process of this run: ignored", p.name, pid)
                continue
            a.pid_started[pid] = started
            a.rank_pids[int(info.get("rank", -1))] = pid
        return a.rank_pids

    def _exit_reports(self, a: Attempt) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self.paths.ranks.glob("exit-*.json")):
            info = runfiles.read_json(p)
            if info and info.get("attempt") == a.number:
                out.append(info)
        return out

    def _signal_ranks(self, a: Attempt) -> None:
        for rank, pid in sorted(self._rank_files(a).items()):
            if pid in a.signalled:
                continue
            a.signalled.add(pid)
            if L.send_verified(pid, a.pid_started[pid], self.save_signal):
                log.info("sent %s to rank %d (pid %d)", signal.Signals(self.save_signal).name, rank, pid)

    def _request_stop(self, now: float, cause: str, *, hung: bool = False) -> None:
        a = self.attempt
        a.stop_requested_at = now
        a.stop_cause = cause
        a.newest_at_stop = self.newest_step
        a.hung = a.hung or hung
        a.grace_deadline = now if hung else now + self.job.stop.grace_s
        self._set_control(stop=True, reason=cause)
        self._signal_ranks(a)
        if self.state != State.STOPPING:
            self._transition(State.STOPPING, now, cause, grace_s=0 if hung else self.job.stop.grace_s)

    def _escalate(self, now: float, sig: int) -> None:
        a = self.attempt
        if a is None:
            return
        groups = sorted(L.descendant_groups())  # the launcher's and each rank's, nothing else
        for g in groups:
            L.send_group(g, sig)
        if sig == signal.SIGKILL:
            for p in L.descendants():
                try:
                    p.kill()
                except Exception:  # noqa: BLE001
                    pass
            a.kill_sent_at = now
        else:
            a.term_sent_at = now
        self._event("escalate", signal=signal.Signals(sig).name, groups=groups, attempt=a.number)
        log.warning("sent %s to process group(s) %s", signal.Signals(sig).name, groups)

    def _attempt_over(self, a: Attempt) -> bool:
        return a.child.exited and not L.descendants()

    def _tick_active(self, now: float) -> None:
        a = self.attempt
        if a.child.exited:
            if self._attempt_over(a):
                self._conclude(now)
                return
            # 1-process launcher died, its rank still runs (orphaned, adopted by us): stop it cleanly.
            status = LauncherStatus.from_wait_status(a.child.status)
            self._request_stop(now, f"launcher {status.describe()} while ranks still run: asking them to save")
            return
        self._rank_files(a)
        self._tell_watchers_pids(a)
        paused = self.control.pause or (a.heartbeat or {}).get("state") == "paused"
        if self.state == State.STARTING:
            if now - a.started_at > self.job.watch.startup_timeout_s:
                self._event("hung", attempt=a.number,
                                   reason=f"no heartbeat within startup_timeout_s={self.job.watch.startup_timeout_s:g}")
                self._request_stop(now, f"no heartbeat {self.job.watch.startup_timeout_s:g} s after launch: hung",
                                   hung=True)
            return
        silent_s = now - (a.heartbeat_seen_at or a.started_at)
        if not paused and silent_s > self.job.watch.hang_timeout_s:
            self._event("hung", attempt=a.number, step=a.max_step,
                               reason=f"no heartbeat for {silent_s:.1f} s (hang_timeout_s={self.job.watch.hang_timeout_s:g})")
            self._request_stop(now, f"no heartbeat for {silent_s:.0f} s at step {a.max_step}: hung", hung=True)
            return
        iv = self.job.checkpoint.interval_s
        if iv and self.state == State.RUNNING and now - max(self._last_save_request, a.started_at) >= iv:
            self._last_save_request = now
            self._set_control(save_seq=self.control.save_seq + 1, reason=f"interval_s={iv:g}")
            self._event("save_requested", cause=f"interval_s={iv:g}", save_seq=self.control.save_seq)

    def _tick_stopping(self, now: float) -> None:
        a = self.attempt
        if self._attempt_over(a):
            self._conclude(now)
            return
        self._signal_ranks(a)  # ranks that registered after the request
        if a.kill_sent_at is not None:
            if now - a.kill_sent_at > 1.0:
                self._escalate(now, signal.SIGKILL)  # a rank that forked since; keep going
            return
        if a.term_sent_at is None and now >= a.grace_deadline:
            self._escalate(now, signal.SIGTERM)
        elif a.term_sent_at is not None and now - a.term_sent_at >= self.job.stop.kill_after_s:
            self._escalate(now, signal.SIGKILL)

    def _conclude(self, now: float) -> None:
        a = self.attempt
        self._refresh_checkpoints(now)
        self._echo_output(final=True)
        status = LauncherStatus.from_wait_status(a.child.status)
        reports = self._exit_reports(a)
        for r in reports:  # the exit report knows the last step even between heartbeats
            if isinstance(r.get("step"), int):
                a.max_step = max(a.max_step, r["step"])
        killed = a.term_sent_at is not None or a.kill_sent_at is not None
        c = classify_exit(reports, status, expected_ranks=a.plan.world_size_local, hung=a.hung,
                          killed_by_supervisor=killed)
        new_ckpt = self.newest_step > a.newest_at_start
        self._event("attempt_exit", attempt=a.number, kind=c.kind.value, detail=c.detail,
                           launcher=status.describe(), step=a.max_step, newest_checkpoint=self.newest_step,
                           ranks_reported=len(reports), duration_s=round(now - a.started_at, 3))
        log.info("attempt %d ended: %s (%s)", a.number, c.kind.value, c.detail)
        if c.kind is ExitKind.RESUME_FAILED and a.resume is not None:
            if c.transient:  # out of memory / I/O / timeout, retried by the ranks: nothing wrong with it
                self._skip_checkpoint(a.resume, now, c.detail)
            else:
                self._quarantine(a.resume, now, c.detail)
        if self.user_stop is not None:
            saved = self.newest_step > a.newest_at_stop or (c.kind is ExitKind.SAVED and self.newest_step >= 0)
            name = signal.Signals(self.user_stop).name
            how = f"checkpoint step {self.newest_step} committed" if saved else "no new checkpoint"
            self._finish(now, State.EXITED, exit_code_for_stop(saved, self.user_stop),
                         f"stopped on {name}: {how} ({c.kind.value})")
            return
        if c.kind is ExitKind.OOM:
            give_up = self._oom_backoff(now, a, reports)
            if give_up is not None:
                self._finish(now, State.FATAL, EXIT_GAVE_UP, f"gave up: {give_up}")
                return
        result = AttemptResult(c.kind, c.detail, new_ckpt, a.max_step)
        self.restart_state, decision = after_exit(self.job.restart, self.restart_state, result, now, self.rand())
        if decision.verdict is Verdict.DONE:
            self._finish(now, State.EXITED, EXIT_OK, f"training finished at step {a.max_step}")
        elif decision.verdict is Verdict.GIVE_UP:
            self._finish(now, State.FATAL, EXIT_GAVE_UP, f"gave up: {decision.reason}")
        elif decision.verdict is Verdict.BAD_INPUT:
            self._finish(now, State.FATAL, EXIT_USAGE, f"not restarting: {decision.reason}")
        else:
            self.backoff_until = now + decision.delay_s
            blocked = self._blocking(now)
            if blocked is not None:
                self.blocked_reason = blocked
                self._transition(State.WAITING, now, f"not restarting after {decision.reason}: {blocked}",
                                 kind=c.kind.value)
                return
            self._transition(State.BACKOFF, now, f"restart in {decision.delay_s:.1f} s after {decision.reason}",
                             delay_s=round(decision.delay_s, 3), kind=c.kind.value,
                             restarts=len(self.restart_state.restart_times))

    def _quarantine(self, ckpt: Checkpoint, now: float, detail: str) -> None:
        """A checkpoint the ranks could not load (a deterministic fault): never resume from it
        again, and move it out of the way so training can commit that step anew."""
        self.excluded_steps.add(ckpt.step)
        try:
            target: Path | None = self.store.quarantine(ckpt, self.wall_clock())
        except (OSError, StoreError) as e:
            log.warning("could not move aside %s: %s", ckpt.path.name, e)
            target = None
        self._refresh_checkpoints(now, force=True)
        self._event("resume_fallback", failed=str(ckpt.path), moved_to=str(target) if target else None,
                           quarantined=target is not None,
                           reason=f"falling back to an older checkpoint: {detail}")
        log.warning("checkpoint %s could not be loaded; moved to %s; falling back to an older one",
                    ckpt.path.name, target.name if target else "(not moved)")

    def _skip_checkpoint(self, ckpt: Checkpoint, now: float, detail: str) -> None:
        """Fall back to an older checkpoint without moving this one: it failed to load for a
        reason outside it (memory, I/O), and a later supervisor may load it fine."""
        self.excluded_steps.add(ckpt.step)
        self._event("resume_fallback", failed=str(ckpt.path), moved_to=None, quarantined=False,
                           reason=f"falling back to an older checkpoint (kept: a transient error): {detail}")
        log.warning("checkpoint %s could not be loaded (%s); kept, falling back to an older one",
                    ckpt.path.name, detail)

    def _tick_backoff(self, now: float) -> None:
        if now >= self.backoff_until:
            self._next_attempt(now)

    def _tick_waiting(self, now: float) -> None:
        if now >= self.backoff_until:
            self._next_attempt(now)

    # -- watchers' view of the attempt, OOM back-off ----------------------------------
    def _tell_watchers_pids(self, a: Attempt) -> None:
        """Watchers with an `on_attempt(pids)` hook (the GPU watch: whose GPU processes are
        the job's) learn the ranks' PIDs whenever that set changes."""
        pids = sorted(a.rank_pids.values())
        if pids == self._watched_pids:
            return
        self._watched_pids = pids
        for w in self.watchers:
            hook = getattr(w, "on_attempt", None)
            if hook is None:
                continue
            try:
                hook(pids)
            except Exception:  # noqa: BLE001
                log.exception("watcher %s failed in on_attempt", w.name)

    def _oom_backoff(self, now: float, a: Attempt, reports: list[dict[str, Any]]) -> str | None:
        """After an out-of-memory exit: the next attempts run a smaller micro-batch with more
        gradient accumulation (the same effective batch), via TRAINSUP_MICRO_BATCH/GRAD_ACCUM;
        they resume from the newest checkpoint as after any failure. Returns the reason to give
        up when no smaller micro-batch >= [gpu] oom_min_micro_batch keeps the effective batch."""
        cfg = self.job.sections.get("gpu") or GpuConfig()
        if not cfg.oom_recovery:
            return None
        shape = _batch_shape([r for r in reports if r.get("kind") == "oom"] + reports + [a.heartbeat or {}])
        if shape is None:
            why = ("the ranks did not report their micro-batch (build the TrainSession with micro_batch=...): "
                   "restarting with the same batch")
            self._event("oom_backoff", attempt=a.number, changed=False, reason=why)
            log.warning("out of memory, but %s", why)
            return None
        micro, accum = shape
        smaller = next_batch_shape(micro, accum, cfg.oom_min_micro_batch)
        if smaller is None:
            reason = oom_give_up_reason(micro, accum, cfg.oom_min_micro_batch)
            self._event("oom_give_up", attempt=a.number, micro_batch=micro, grad_accum=accum,
                               reason=reason)
            return reason
        new_micro, new_accum = smaller
        self.launch_env[runfiles.ENV_MICRO_BATCH] = str(new_micro)
        self.launch_env[runfiles.ENV_GRAD_ACCUM] = str(new_accum)
        reason = (f"out of memory at micro-batch {micro} x {accum} accumulation: next attempts run "
                  f"{new_micro} x {new_accum} (effective batch per rank {micro * accum}, unchanged)")
        self._event("oom_backoff", attempt=a.number, changed=True, reason=reason,
                           old={"micro_batch": micro, "grad_accum": accum},
                           new={"micro_batch": new_micro, "grad_accum": new_accum},
                           effective_batch_per_rank=micro * accum)
        log.warning("%s", reason)
        # A new batch shape is a new try, not a repeat of the failure: no growing backoff, and
        # the no-progress count starts over (the floor bounds the chain of shrinks).
        self.restart_state = replace(self.restart_state, failures_in_a_row=0, no_progress_in_a_row=0)
        return None

    def _restore_oom_backoff(self, now: float, resume: Checkpoint | None) -> None:
        """An earlier supervisor of this run dir shrank the batch and the checkpoint we resume
        from was written with that shape: keep it (else the first attempt runs out of memory
        again). Anything else (a fresh start, another shape) starts from the script's values."""
        if resume is None or runfiles.ENV_MICRO_BATCH in self.launch_env:
            return
        last = None
        for e in read_events(self.paths.events):
            if e.get("event") == "oom_backoff" and isinstance(e.get("new"), dict):
                last = e["new"]
        shape = _batch_shape([last or {}])
        m = resume.manifest or {}
        if shape is None or (m.get("micro_batch"), m.get("grad_accum")) != shape:
            return
        self.launch_env[runfiles.ENV_MICRO_BATCH] = str(shape[0])
        self.launch_env[runfiles.ENV_GRAD_ACCUM] = str(shape[1])
        self._event("oom_backoff_restored", new={"micro_batch": shape[0], "grad_accum": shape[1]},
                           checkpoint=str(resume.path))
        log.info("keeping the OOM back-off of an earlier run: micro-batch %d x %d accumulation (%s was saved so)",
                 shape[0], shape[1], resume.path.name)

    # -- output -----------------------------------------------------------------
    def _echo_output(self, final: bool = False) -> None:
        a = self.attempt
        if a is None:
            return
        try:
            with open(a.child.log_path, "rb") as f:
                f.seek(a.log_offset)
                data = f.read(1 << 20)
        except FileNotFoundError:
            return
        if not data and not (final and a.log_partial):
            return
        a.log_offset += len(data)
        data = a.log_partial + data
        lines = data.split(b"\n")
        a.log_partial = lines.pop()
        if final and a.log_partial:
            lines.append(a.log_partial)
            a.log_partial = b""
        prefix = "[rank0]:" if a.plan.world_size_local == 1 else ""
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            self.reporter.child_output(line if line.startswith("[rank") else prefix + line)

    # -- state for humans and `trainsup status` ------------------------------------
    def snapshot(self, now: float) -> dict[str, Any]:
        a = self.attempt
        hb = (a.heartbeat if a else None) or {}
        newest = next((c for c in reversed(self.checkpoints) if c.valid), None)
        return {
            "state": self.state.value if self.state else None,
            "pid": os.getpid(),
            "attempt": self.attempts,
            "restarts": max(0, self.attempts - self._first_attempt - 1),
            "started_at": self.started_at,
            "updated_at": self.wall_clock(),
            "job_file": str(self.job.job_file) if self.job.job_file else None,
            "run_dir": str(self.job.run_dir),
            "child_pid": a.child.pid if a and not a.child.exited else None,
            "rank_pids": {str(k): v for k, v in a.rank_pids.items()} if a else {},
            "resume_from": str(a.resume.path) if a and a.resume else None,
            "step": hb.get("step"),
            "max_steps": hb.get("max_steps"),
            "loss": hb.get("loss"),
            "tokens_per_s": hb.get("tokens_per_s"),
            "rank_state": hb.get("state"),
            "heartbeat_age_s": round(now - a.heartbeat_seen_at, 1) if a and a.heartbeat_seen_at else None,
            "last_checkpoint": {"step": newest.step, "path": str(newest.path), "reason": newest.reason}
            if newest else None,
            # wall-clock time (the timer itself is monotonic)
            "backoff_until": self.wall_clock() + self.backoff_until - now if self.state == State.BACKOFF else None,
            "blocked_by": self.blocked_reason if self.state == State.WAITING else None,
            "paused_by": sorted(self.paused_by),
            "exit_code": self.exit_code,
            "exit_reason": self.exit_reason or None,
            "last_event": self.events.last if self.events else None,
            "watchers": {w.name: _safe_status(w) for w in self.watchers},
            "launch_env": dict(self.launch_env) or None,  # e.g. the OOM back-off's batch shape
        }

    def _write_supervisor_json(self, now: float, force: bool = False) -> None:
        if not force and now - self._last_supervisor_json < 1.0:
            return
        self._last_supervisor_json = now
        try:
            runfiles.write_json_atomic(self.paths.supervisor, self.snapshot(now), durable=False)
        except (OSError, ValueError) as e:
            log.warning("cannot write supervisor.json: %s", e)


def _batch_shape(sources: Iterable[Any]) -> tuple[int, int] | None:
    """The first (micro_batch, grad_accum) of positive ints among dicts (exit reports, heartbeat)."""
    for src in sources:
        if not isinstance(src, dict):
            continue
        micro, accum = src.get("micro_batch"), src.get("grad_accum")
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (micro, accum)):
            return micro, accum
    return None


def _safe_status(w: Watcher) -> dict[str, Any]:
    try:
        return dict(w.status())
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
