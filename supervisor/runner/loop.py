"""The supervisor's main loop: one run dir, a sequence of attempts, the state machine of
supervisor.runner.states. Each transition is one log line and one events.jsonl record.

Every tick drains the signal inbox, reaps, reads the heartbeat, rescans the checkpoints when
they changed, polls the watchers and runs the current state's handler. The runner touches
the OS only through its ProcessTable (supervisor.runner.procs).

Clocks: every timer (startup, hang, backoff, grace, kill, save interval) runs on `clock`,
CLOCK_MONOTONIC by default, which stops while the machine sleeps: a laptop asleep for longer
than hang_timeout_s wakes to a running job, not a "hang" kill. `wall_clock` is only for what
is shown or written as a time of day (events, supervisor.json, quarantine names).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from supervisor import precision, rundir
from supervisor.config import JobConfig, save_signal_of
from supervisor.events import EventLog
from supervisor.runner import history, launch, nodes, oom, report
from supervisor.runner.attempt import Attempt
from supervisor.runner.checkpoints import RunCheckpoints
from supervisor.runner.inbox import STOP_SIGNALS, SignalInbox
from supervisor.runner.policy import (
    AttemptResult,
    LauncherStatus,
    RestartState,
    Verdict,
    after_exit,
    classify_exit,
    exit_code_for_stop,
)
from supervisor.runner.procs import OsProcesses, ProcessTable, can_restore_priority
from supervisor.runner.states import ALLOWED, ACTIVE, State, TransitionError
from supervisor.runner.budget import CostWatch
from supervisor.runner.stopping import Stopping
from supervisor.runner.watchers import WatcherSet
from supervisor.watch import Action, Decision, Watcher
from supervisor.watch.thermal import GpuConfig
from train_core import runfiles, safeload
from train_core.contract import EXIT_GAVE_UP, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, ExitKind, outlast_stop_s
from train_core.store import Checkpoint, CheckpointStore

log = logging.getLogger(__name__)


# A standby while an attempt trains only after this long: its imports take CPU time that an
# attempt preempted every 20 s would lose each time (bench/goodput.py), even at nice 19.
IDLE_STANDBY_AFTER_S = 60.0


class Runner(Stopping, CostWatch):
    def __init__(
        self,
        job: JobConfig,
        *,
        watchers: Sequence[Watcher] = (),
        reporter: report.Reporter | None = None,
        procs: ProcessTable | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        subreaper: bool = False,
        install_signals: bool = True,
        probe: precision.Probe | None = None,
    ) -> None:
        self.job = job
        self.probe = probe or precision.Probe()  # where [launch] mixed_precision "auto" reads the hardware
        self.save_signal = save_signal_of(job)  # exit 2 now for a bad TRAINSUP_SAVE_SIGNAL
        self.paths = job.paths
        self.ckpts = RunCheckpoints(CheckpointStore(self.paths.checkpoints, trust_pickle=safeload.trust_pickle_from_env(
            {**os.environ, **job.train.env})))
        self.watchers = WatcherSet(watchers, self._watcher_failed)
        self.reporter = reporter or report.NullReporter()
        self.procs = procs or OsProcesses(subreaper=subreaper)
        self.clock, self.wall_clock, self.sleep, self.rand = clock, wall_clock, sleep, rand
        self.started_wall = wall_clock()  # several machines: what a node's files of this start are newer than
        self.inbox = SignalInbox(sleep)
        self.install_signals = install_signals
        # a standby while an attempt trains only where it can get its CPU priority back after
        self.idle_standby = can_restore_priority()

        self.state: State | None = None
        self.attempt: Attempt | None = None
        self.attempts = 0  # attempt number of the latest attempt in this run dir
        self._first_attempt = 0  # attempts before this supervisor started
        self.restart_state = RestartState()
        self.exit_code: int | None = None
        self.exit_reason = ""
        self.user_stop: int | None = None  # the signal of the user's stop request
        self.stop_now = False
        self._sigint_seen = False  # a first Ctrl-C came: a second one stops at once
        self.paused_by: set[str] = set()
        self.control = runfiles.Control()
        self.backoff_until = 0.0
        self.batch = oom.BatchBackoff(job.sections.get("gpu") or GpuConfig(), self._event)
        self.blocked_reason: str | None = None
        self._last_save_request = 0.0
        self._last_supervisor_json = 0.0
        self.costs_seen: float | None = None  # costs.json's updated_at when last checked
        self.interval_seen: int | None = None  # the "auto" interval last reported
        self.budget_reported: float | None = None  # the save cost a short budget was reported with
        self.budget_state: dict[str, Any] | None = None
        self.history = history.History()
        self.events: EventLog | None = None
        self.started_at = wall_clock()

    # -- public ---------------------------------------------------------------
    def enqueue_signal(self, signum: int) -> None:
        """What a signal handler does (and what tests call): enqueue, nothing else."""
        self.inbox.pending.append(signum)

    def wake(self) -> None:
        self.inbox.wake()

    @property
    def newest_step(self) -> int:
        return self.ckpts.newest_step

    def run(self) -> int:
        lock = rundir.acquire_run_lock(self.job.run_dir, node=self.job.node, group_shared=self.job.group_shared)
        try:
            self._setup()
            try:
                self._event("supervisor_start", pid=os.getpid(), job=str(self.job.job_file or ""),
                            run_dir=str(self.job.run_dir), machine_rank=self.job.node)
                if self.job.node is not None and not self._join_nodes():
                    return self.exit_code
                now = self.clock()
                self.ckpts.refresh(force=True)
                self._resolve_precision()
                self._next_attempt(now)
                while not self.state.terminal:
                    self._tick(self.clock())
                    if not self.state.terminal:
                        self.inbox.wait(self.job.watch.poll_interval_s)
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
        for p in self.ckpts.remove_stale_tmp():
            log.info("removed stale uncommitted save %s", p.name)
        self._check_costs()  # with the costs an earlier attempt measured
        self.history = history.recover(self.paths)
        # Attempt numbers are unique in a run dir, across supervisors: a heartbeat or exit report
        # left by an earlier run is never mistaken for this one's, and no log is reused.
        self.attempts = self._first_attempt = max(
            (int(m.group(1)) for p in self.paths.logs.glob("attempt-*.log")
             if (m := re.fullmatch(r"attempt-(\d+)\.log", p.name))), default=0)
        if self.install_signals:
            self.inbox.install()
            self.watchers.set_wakeup(self.wake)

    def _resolve_precision(self) -> None:
        """[launch] mixed_precision "auto" -> what this run trains in, once per supervisor: the
        precision of the checkpoint it resumes from, else the hardware's (supervisor/precision.py).
        Said at start, with the one warning an explicit bf16 on a CPU without native bf16 gets."""
        resume, _ = self.ckpts.choose_resume()
        r = precision.resolve(self.job, resume, self.probe)
        if r.value is not None:
            self.job = replace(self.job, launch=replace(self.job.launch, mixed_precision=r.value))
            self._event("mixed_precision", requested=precision.AUTO, chosen=r.value, source=r.source,
                        checkpoint=resume.path.name if resume is not None and r.source == "checkpoint" else None,
                        reason=r.line)
        if r.line:
            log.info("%s", r.line)
        if r.warning:
            log.warning("%s", r.warning)

    def _teardown(self) -> None:
        if (self.state is None or not self.state.terminal) and self.attempt is not None and self.procs.descendants():
            self._emergency_stop()
        self.procs.discard_standby()
        self._kill_leftovers()
        self.watchers.close()
        if self.events is not None:
            self._event("supervisor_exit", exit_code=self.exit_code, reason=self.exit_reason)
        self._write_supervisor_json(self.clock(), force=True)
        if self.events is not None:
            self.events.close()
        self.inbox.restore()

    def _children(self) -> dict[int, Any]:
        return {self.attempt.child.pid: self.attempt.child} if self.attempt else {}

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

    def _join_nodes(self) -> bool:
        """Several machines: announce this node, wait for the others (nodes.py). False when the
        run must end before its first attempt (exit_code says how)."""
        nodes.announce(self.job, self.started_wall, os.getpid())
        log.info("machine rank %d of %d: waiting for the other nodes in %s", self.job.launch.machine_rank,
                 self.job.launch.num_machines, nodes.nodes_dir(self.job))

        def wait(timeout_s: float) -> bool:
            self.inbox.wait(timeout_s)
            return any(s in STOP_SIGNALS for s in self.inbox.pending)

        code, why = nodes.wait_for_nodes(self.job, self.started_wall, clock=self.clock, wait=wait)
        if code == 0:
            self._event("nodes_joined", num_machines=self.job.launch.num_machines)
            return True
        if code < 0:
            code, why = exit_code_for_stop(False, self.inbox.pending[0]), "stopped while waiting for the other nodes"
        log.error("%s", why)
        self.exit_code, self.exit_reason = code, why
        self._event("nodes_not_joined", reason=why, exit_code=code)
        return False

    def _follow_other_nodes(self, now: float) -> None:
        """Several machines: a stop asked of another node is asked of this one too (the ranks
        already agree on the step; this makes every supervisor exit 75 rather than restart)."""
        if self.job.node is None or self.user_stop is not None:
            return
        cause = nodes.stop_from_other_node(self.job, self.started_wall)
        if cause is not None:
            self._first_stop_signal(now, signal.SIGTERM, cause=f"stop on {cause}")

    def _finish(self, now: float, state: State, code: int, reason: str) -> None:
        self.exit_code = code
        self.exit_reason = reason
        self._transition(state, now, reason, exit_code=code)

    # -- the loop ---------------------------------------------------------------
    def _tick(self, now: float) -> None:
        self._handle_signals(now)
        self._follow_other_nodes(now)
        if self.state.terminal:
            return
        self.procs.reap(self._children())
        self._read_heartbeat(now)
        self._refresh_checkpoints(now)
        self._check_costs()
        for name, d in self.watchers.poll(now):
            self._act(name, d, now)
        self._echo_output()
        if self.state in ACTIVE:
            self._tick_stopping(now) if self.state is State.STOPPING else self._tick_active(now)
        elif now >= self.backoff_until:  # BACKOFF, WAITING
            self._next_attempt(now)
        if not self.state.terminal:
            self._write_supervisor_json(now)
            self.reporter.progress(self.snapshot(now))

    # -- heartbeat, checkpoints, watchers ----------------------------------------
    def _read_heartbeat(self, now: float) -> None:
        a = self.attempt
        if a is None or self.state not in ACTIVE:
            return
        st = runfiles.read_json(self.paths.status)
        if not st or st.get("attempt") != a.number:
            return
        stamp = (st.get("updated_at"), st.get("step"), st.get("state"))
        if stamp != a.heartbeat_stamp:
            a.heartbeat_stamp, a.heartbeat_seen_at, a.heartbeat = stamp, now, st
            if isinstance(st.get("step"), int):
                a.max_step = max(a.max_step, st["step"])
        if self.state == State.STARTING:
            # a rank's first beat comes before it has loaded the checkpoint: no step to tell yet
            what = "loading/setting up" if st.get("state") == "starting" else f"step {st.get('step')}"
            self._transition(State.RUNNING, now, f"first heartbeat ({what})")

    def _refresh_checkpoints(self, now: float) -> None:
        ck = self.ckpts.refresh()
        if ck is None:
            return
        self._event("checkpoint", step=ck.step, reason=ck.reason, path=str(ck.path),
                    attempt=self.attempt.number if self.attempt else None)
        log.info("checkpoint committed: step %d (%s)", ck.step, ck.reason)
        self._last_save_request = now
        if self.attempt is not None:
            self.attempt.max_step = max(self.attempt.max_step, ck.step)
        self.watchers.on_checkpoint(ck.step, now)
        protected = {self.attempt.resume.step} if self.attempt and self.attempt.resume else set()
        if self.job.launch.machine_rank != 0:
            return  # several machines share the checkpoints: machine rank 0's supervisor prunes them
        deleted, kept = self.ckpts.prune(self.job.retention, protected)
        if deleted:
            self._event("prune", deleted=deleted, kept=kept)
            log.info("retention: removed step(s) %s", ", ".join(map(str, deleted)))

    def _watcher_failed(self, name: str, e: Exception) -> None:
        self._event("watcher_error", watcher=name, error=f"{type(e).__name__}: {e}")

    def _act(self, name: str, d: Decision, now: float) -> None:
        self._event(d.event, watcher=name, action=d.action.value, reason=d.reason, details=dict(d.details) or None)
        log.info("%s: %s (%s)", name, d.reason, d.action.value)
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
        elif d.action is Action.STOP and self.state in (State.STARTING, State.RUNNING):
            if self.job.node is not None and self.user_stop is None:
                # several machines: the run stops on every node (all exit 75), not on this one alone
                self.user_stop = signal.SIGTERM
                nodes.post_stop(self.job, f"{name}: {d.reason}", self.wall_clock())
            self._request_stop(now, f"{name}: {d.reason}", budget_s=float(d.details.get("budget_s") or 0.0))

    def _set_control(self, **changes: Any) -> None:
        self.control = replace(self.control, **changes)
        try:
            runfiles.write_control(self.paths.control, self.control)
        except OSError as e:  # e.g. a full disk: a stop still reaches the ranks by signal
            log.warning("cannot write %s: %s", self.paths.control, e)

    # -- attempts ---------------------------------------------------------------
    def _next_attempt(self, now: float) -> None:
        reason = self.watchers.blocking(now)
        if reason is None:
            self.blocked_reason = None
            self._start_attempt(now)
        elif self.state != State.WAITING:
            self.blocked_reason = reason
            self.procs.discard_standby()  # waiting for power, heat or a shutdown: nothing runs meanwhile
            self._transition(State.WAITING, now, f"not starting: {reason}")
        elif reason != self.blocked_reason:
            self.blocked_reason = reason
            self._event("waiting", reason=reason)

    def _start_attempt(self, now: float) -> None:
        for p in self.ckpts.remove_stale_tmp():  # a save killed in the previous attempt
            log.info("removed uncommitted save %s", p.name)
        self.ckpts.refresh(force=True)
        resume, refused = self.ckpts.choose_resume()
        if refused:  # said once per attempt: what is not resumed from, and that it stays
            log.warning("not resuming from %d newer checkpoint(s) (%s: %s); they stay on disk, `trainsup checkpoints "
                        "list` shows why", len(refused), refused[-1].path.name, refused[-1].problem)
        for p in self.paths.ranks.glob("*.json"):
            p.unlink(missing_ok=True)
        self._set_control(stop=False, pause=bool(self.paused_by), reason="attempt start")
        if self.attempts == self._first_attempt:
            self.batch.restore(self.paths.events, resume)
        self.attempts += 1
        number = self.attempts
        self.history = history.started(self.paths, self.history, self.wall_clock())
        plan = launch.build_launch(self.job, attempt=number, resume_from=resume.path if resume else None,
                                   supervisor_pid=os.getpid(), base_env=os.environ,
                                   attempt_env={**self.batch.env, **self._auto_interval_env()},
                                   port=launch.free_port() if launch.needs_port(self.job) else None)
        log_path = self.paths.logs / f"attempt-{number}.log"
        child = self.procs.spawn(plan, log_path, cwd=self._cwd(), paths=self.paths)
        self.attempt = Attempt(number=number, child=child, plan=plan, started_at=now, resume=resume,
                               newest_at_start=self.newest_step, log_offset=_size(log_path))
        self._transition(State.STARTING, now,
                         f"attempt {number}: " + (f"resuming from {resume.path.name}" if resume else "fresh start"),
                         pid=child.pid, resume_from=str(resume.path) if resume else None,
                         log=str(log_path), argv=list(plan.argv), standby=child.from_standby)

    def _auto_interval_env(self) -> dict[str, str]:
        """What "auto" (the job's, or the script's when the job leaves the interval to it) chooses
        the interval from (train_core/interval.py)."""
        c = self.job.checkpoint
        if c.interval_steps not in ("auto", 0):  # a fixed interval in the job wins over the script
            return {}
        return {runfiles.ENV_AUTO_INTERVAL: json.dumps({
            "expected_mtbf_s": c.expected_mtbf_s, "min_steps": c.min_interval_steps, "max_s": c.max_interval_s,
            "failures": self.history.failures, "uptime_s": round(self.history.uptime_s, 1)})}

    def _find_ranks(self, a: Attempt) -> None:
        a.find_ranks(self.paths, self.procs, launcher_is_rank=a.plan.launcher_is_rank)

    def _tick_active(self, now: float) -> None:
        a = self.attempt
        if a.child.exited:
            if a.over(self.procs):
                self._conclude(now)
                return
            # 1-process launcher died, its rank still runs (orphaned, adopted by us): stop it cleanly.
            status = LauncherStatus.from_wait_status(a.child.status)
            self._request_stop(now, f"launcher {status.describe()} while ranks still run: asking them to save")
            return
        self._find_ranks(a)
        self.watchers.on_attempt(list(a.rank_pids.values()))
        if (not a.standby_asked and self.idle_standby and (a.heartbeat or {}).get("state") == "training"
                and now - a.started_at >= IDLE_STANDBY_AFTER_S):
            a.standby_asked = True  # training is under way: a standby for a crash, at idle priority
            self._prepare_standby(idle=True)
        w = self.job.watch
        if self.state == State.STARTING:
            if now - a.started_at > w.startup_timeout_s:
                self._event("hung", attempt=a.number, reason=f"no heartbeat within startup_timeout_s={w.startup_timeout_s:g}")
                self._request_stop(now, f"no heartbeat {w.startup_timeout_s:g} s after launch: hung", hung=True)
            return
        paused = self.control.pause or (a.heartbeat or {}).get("state") == "paused"
        silent_s = now - (a.heartbeat_seen_at or a.started_at)
        if not paused and silent_s > w.hang_timeout_s:
            self._event("hung", attempt=a.number, step=a.max_step,
                        reason=f"no heartbeat for {silent_s:.1f} s (hang_timeout_s={w.hang_timeout_s:g})")
            self._request_stop(now, f"no heartbeat for {silent_s:.0f} s at step {a.max_step}: hung", hung=True)
            return
        iv = self.job.checkpoint.interval_s
        if iv and now - max(self._last_save_request, a.started_at) >= iv:
            self._last_save_request = now
            self._set_control(save_seq=self.control.save_seq + 1, reason=f"interval_s={iv:g}")
            self._event("save_requested", cause=f"interval_s={iv:g}", save_seq=self.control.save_seq)

    def _conclude(self, now: float) -> None:
        a = self.attempt
        self._refresh_checkpoints(now)
        self._echo_output(final=True)
        status = LauncherStatus.from_wait_status(a.child.status)
        reports = a.exit_reports(self.paths)
        for r in reports:  # the exit report knows the last step even between heartbeats
            if isinstance(r.get("step"), int):
                a.max_step = max(a.max_step, r["step"])
        c = classify_exit(reports, status, expected_ranks=a.plan.world_size_local, hung=a.hung,
                          killed_by_supervisor=a.killed)
        self._event("attempt_exit", attempt=a.number, kind=c.kind.value, detail=c.detail,
                    launcher=status.describe(), step=a.max_step, newest_checkpoint=self.newest_step,
                    ranks_reported=len(reports), duration_s=round(now - a.started_at, 3))
        self.history = history.ended(self.paths, self.history, now - a.started_at, c.kind,
                                     asked_to_stop=self.user_stop is not None or c.kind is ExitKind.SAVED)
        unsaved = [r for r in reports if isinstance(r.get("lost_steps"), int)][:1]
        for r in unsaved:  # the stop's budget could not hold a save: what was lost, and why
            self._event("stop_unsaved", attempt=a.number, lost_steps=r["lost_steps"], step=r.get("step"),
                        checkpoint=r.get("checkpoint"), reason=r.get("detail"))
            log.warning("stopped without a save (%s): %d step(s) lost", r.get("detail"), r["lost_steps"])
        log.info("attempt %d ended: %s (%s)", a.number, c.kind.value, c.detail)
        if c.kind is ExitKind.RESUME_FAILED and a.resume is not None:
            self._fall_back(a.resume, c.detail, keep=c.transient)
        if self.user_stop is not None:
            saved = self.newest_step > a.newest_at_stop or (c.kind is ExitKind.SAVED and self.newest_step >= 0)
            how = f"checkpoint step {self.newest_step} committed" if saved else "no new checkpoint"
            self._finish(now, State.EXITED, exit_code_for_stop(saved, self.user_stop),
                         f"stopped on {signal.Signals(self.user_stop).name}: {how} ({c.kind.value})")
            return
        if c.kind is ExitKind.OOM and self.job.node is not None:
            log.warning("out of memory on this node: restarting with the same micro-batch (the back-off would "
                        "change it on this node only; lower it for every node in the job file)")
        elif c.kind is ExitKind.OOM:
            give_up = self._oom_backoff(a, reports)
            if give_up is not None:
                self._finish(now, State.FATAL, EXIT_GAVE_UP, f"gave up: {give_up}")
                return
        result = AttemptResult(c.kind, c.detail, self.newest_step > a.newest_at_start, a.max_step)
        self.restart_state, decision = after_exit(self.job.restart, self.restart_state, result, now, self.rand())
        if decision.verdict is Verdict.RESTART:
            self._schedule_restart(now, decision.delay_s, decision.reason, c.kind)
        elif decision.verdict is Verdict.DONE:
            self._finish(now, State.EXITED, EXIT_OK, f"training finished at step {a.max_step}")
        elif decision.verdict is Verdict.GIVE_UP:
            self._finish(now, State.FATAL, EXIT_GAVE_UP, f"gave up: {decision.reason}")
        else:  # BAD_INPUT
            self._finish(now, State.FATAL, EXIT_USAGE, f"not restarting: {decision.reason}")

    def _schedule_restart(self, now: float, delay_s: float, why: str, kind: ExitKind) -> None:
        self.backoff_until = now + delay_s
        blocked = self.watchers.blocking(now)
        if blocked is not None:
            self.blocked_reason = blocked
            self.procs.discard_standby()  # waiting for power, heat or a shutdown: nothing runs meanwhile
            self._transition(State.WAITING, now, f"not restarting after {why}: {blocked}", kind=kind.value)
            return
        self._prepare_standby()
        self._transition(State.BACKOFF, now, f"restart in {delay_s:.1f} s after {why}", delay_s=round(delay_s, 3),
                         kind=kind.value, restarts=len(self.restart_state.restart_times))

    def _prepare_standby(self, *, idle: bool = False) -> None:
        """Let a standby rank import torch for the next attempt (runner/procs.py): `idle` while
        this attempt trains, else because a restart is coming."""
        if not self.job.restart.standby:
            return
        plan = launch.build_launch(self.job, attempt=self.attempts + 1, resume_from=None, supervisor_pid=os.getpid(),
                                   base_env=os.environ, attempt_env=self.batch.env)
        try:
            self.procs.prepare(plan, cwd=self._cwd(), paths=self.paths, idle=idle)
        except OSError as e:  # the restart starts cold instead
            log.warning("could not start a standby rank: %s", e)

    def _cwd(self) -> Path | None:
        return self.job.job_file.parent if self.job.job_file else None

    def _fall_back(self, ckpt: Checkpoint, detail: str, *, keep: bool) -> None:
        """Never resume from `ckpt` again in this run. A deterministic fault moves it aside
        (quarantine); a transient one (out of memory, I/O, timeout, retried by the ranks)
        leaves it where it is: nothing is wrong with it."""
        target = None if keep else self.ckpts.quarantine(ckpt, self.wall_clock())
        if keep:
            self.ckpts.skip(ckpt)
            reason = f"falling back to an older checkpoint (kept: a transient error): {detail}"
        else:
            reason = f"falling back to an older checkpoint: {detail}"
        self._event("resume_fallback", failed=str(ckpt.path), moved_to=str(target) if target else None,
                    quarantined=target is not None, reason=reason)
        where = "kept" if keep else f"moved to {target.name if target else '(not moved)'}"
        log.warning("checkpoint %s could not be loaded (%s); %s; falling back to an older one",
                    ckpt.path.name, detail, where)

    # -- the OOM back-off ------------------------------------------------------------
    def _oom_backoff(self, a: Attempt, reports: list[dict[str, Any]]) -> str | None:
        """Returns the reason to give up, or None (the next attempts run the smaller batch)."""
        give_up, changed = self.batch.after_oom(a.number, reports, a.heartbeat)
        if changed:
            # A new batch shape is a new try, not a repeat of the failure: no growing backoff, and
            # the no-progress count starts over (the floor bounds the chain of shrinks).
            self.restart_state = replace(self.restart_state, failures_in_a_row=0, no_progress_in_a_row=0)
        return give_up

    # -- what humans see ----------------------------------------------------------------
    def _echo_output(self, final: bool = False) -> None:
        if self.attempt is not None:
            for line in self.attempt.new_output(final=final):
                self.reporter.child_output(line)

    def snapshot(self, now: float) -> dict[str, Any]:
        return report.snapshot(self, now)

    def _write_supervisor_json(self, now: float, force: bool = False) -> None:
        if not force and now - self._last_supervisor_json < 1.0:
            return
        self._last_supervisor_json = now
        try:
            runfiles.write_json_atomic(self.paths.supervisor, self.snapshot(now), durable=False)
        except (OSError, ValueError) as e:
            log.warning("cannot write supervisor.json: %s", e)


def _size(path: os.PathLike) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
