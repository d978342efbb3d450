"""How a run stops: stop signals in (only Ctrl-C twice skips the save), save requests out,
and the escalation of supervisor.runner.attempt, in the loop's STOPPING state and, when the
loop itself died, in the teardown. A part of Runner (supervisor.runner.loop), kept apart so
the stop path reads in one place.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING

from supervisor.runner import nodes
from supervisor.runner.inbox import STOP_SIGNALS
from supervisor.runner.policy import exit_code_for_stop
from supervisor.runner.states import ACTIVE, State

if TYPE_CHECKING:
    from supervisor.runner.loop import Runner

log = logging.getLogger(__name__)


class Stopping:
    """Mixed into Runner: every method here runs on the Runner's state."""

    def _handle_signals(self: Runner, now: float) -> None:
        while self.inbox.pending:
            sig = self.inbox.pending.popleft()
            if sig not in STOP_SIGNALS:
                continue
            # Only Ctrl-C twice skips the save. Any other signal during a stop (a scheduler's
            # SIGTERM, the SIGHUP of a terminal closed after a Ctrl-C) lets the save go on.
            second_ctrl_c = sig == signal.SIGINT and self._sigint_seen
            self._sigint_seen = self._sigint_seen or sig == signal.SIGINT
            if self.user_stop is None:
                self._first_stop_signal(now, sig)
                if self.state.terminal:
                    return
            elif second_ctrl_c and not self.stop_now and self.state in ACTIVE:
                self.stop_now = True
                self._event("stop_now", signal=signal.Signals(sig).name)
                log.warning("second %s: killing the run now", signal.Signals(sig).name)
                if self.state != State.STOPPING:
                    self._request_stop(now, f"second {signal.Signals(sig).name}: stop now")
                self._escalate(now, signal.SIGKILL)
            else:
                name, first = signal.Signals(sig).name, signal.Signals(self.user_stop).name
                why = "already stopping at once" if self.stop_now else "the save goes on"
                self._event("signal_ignored", signal=name, stop_signal=first, reason=why)
                log.info("received %s while stopping on %s: ignored, %s", name, first, why)
                if sig == signal.SIGINT and not self.stop_now and self.state in ACTIVE:
                    log.info("Ctrl-C again to stop at once without saving")

    def _first_stop_signal(self: Runner, now: float, sig: int, *, cause: str | None = None) -> None:
        """`cause`: the stop came from another node (nodes.py), not as a signal to this one."""
        name = signal.Signals(sig).name
        self.user_stop = sig
        self._event("stop_requested", signal=name, **({"cause": cause} if cause else {}))
        log.info("%s: asking the ranks to save and stop", cause or f"received {name}")
        if cause is None and self.job.node is not None:
            nodes.post_stop(self.job, f"{name} received", self.wall_clock())
        if self.state in (State.STARTING, State.RUNNING):
            self._request_stop(now, cause or f"{name} received: save and stop")
        elif self.state == State.STOPPING:
            self.attempt.stop_cause = f"{name} received while stopping"
        else:  # BACKOFF, WAITING: nothing runs
            has = self.newest_step >= 0
            self._finish(now, State.EXITED, exit_code_for_stop(has, sig), f"{name} received with no attempt running"
                         + (f"; newest checkpoint step {self.newest_step}" if has else ""))
            return
        if sig == signal.SIGINT:
            log.info("Ctrl-C again to stop at once without saving")

    def _request_stop(self: Runner, now: float, cause: str, *, hung: bool = False, budget_s: float = 0.0) -> None:
        """`budget_s`: this stop's own budget when shorter than the job's (logind's delay)."""
        a = self.attempt
        a.begin_stop(now, cause, grace_s=self.job.stop.grace_s, newest_step=self.newest_step, hung=hung)
        self._set_control(stop=True, reason=cause, budget_s=budget_s)
        self._find_ranks(a)
        a.signal_ranks(self.procs, self.save_signal)
        if self.state != State.STOPPING:
            self._transition(State.STOPPING, now, cause, grace_s=0 if a.hung else self.job.stop.grace_s)
        if hung:
            self._prepare_standby()  # a restart follows: its rank imports while this one is killed

    def _escalate(self: Runner, now: float, sig: int) -> None:
        groups = self.attempt.escalate(self.procs, sig, now)
        self._event("escalate", signal=signal.Signals(sig).name, groups=groups, attempt=self.attempt.number)
        log.warning("sent %s to process group(s) %s", signal.Signals(sig).name, groups)

    def _tick_stopping(self: Runner, now: float) -> None:
        a = self.attempt
        if a.over(self.procs):
            self._conclude(now)
            return
        self._find_ranks(a)
        a.signal_ranks(self.procs, self.save_signal)  # ranks that registered after the request
        sig = a.due_signal(now, self.job.stop.kill_after_s)
        if sig is not None:
            self._escalate(now, sig)

    def _emergency_stop(self: Runner) -> None:
        """The loop died (an internal error; a KeyboardInterrupt, which SIGINT's handler should
        rule out, alike) while ranks run: they are asked to save as on a normal stop, and
        escalated by the same sequence. Only Ctrl-C twice is heard here."""
        a, before = self.attempt, self.newest_step
        grace = 0.0 if a.hung else self.job.stop.grace_s
        log.warning("asking the ranks to save and stop before the supervisor exits (up to %g s, then "
                    "SIGTERM, SIGKILL after %g s; Ctrl-C twice stops at once)", grace, self.job.stop.kill_after_s)
        try:
            a.begin_stop(self.clock(), "supervisor error", grace_s=grace, newest_step=before, hung=a.hung)
            self._set_control(stop=True, reason=f"supervisor error: {self.exit_reason or 'internal error'}")
            while self.procs.descendants():
                self.procs.reap(self._children())
                while self.inbox.pending:
                    if self.inbox.pending.popleft() == signal.SIGINT:
                        self.stop_now, self._sigint_seen = self.stop_now or self._sigint_seen, True
                now = self.clock()
                self._find_ranks(a)
                a.signal_ranks(self.procs, self.save_signal)  # ranks that registered since
                sig = signal.SIGKILL if self.stop_now else a.due_signal(now, self.job.stop.kill_after_s)
                if sig is not None:
                    self._escalate(now, sig)
                    if sig == signal.SIGKILL:
                        break
                self.sleep(0.05)
            self.procs.reap(self._children())
            self.ckpts.refresh()
            if self.newest_step > before:
                self.exit_reason = (f"{self.exit_reason}; the ranks saved: checkpoint step "
                                    f"{self.newest_step} committed").lstrip("; ")
        except Exception:  # noqa: BLE001
            log.exception("could not stop the ranks in order")

    def _kill_leftovers(self: Runner) -> None:
        """Whatever happened before, no process of the run outlives the supervisor."""
        left = self.procs.descendants()
        if left:
            log.warning("killing %d leftover process(es) of the run", len(left))
            for pid in left:
                self.procs.signal(pid, signal.SIGKILL)
            deadline = self.clock() + 5
            while self.procs.descendants() and self.clock() < deadline:
                self.procs.reap(self._children())
                self.sleep(0.05)
        self.procs.reap(self._children())
