"""Restart policy: how an attempt ended, and what to do next. Pure functions, no I/O.

Everything here is a function of frozen dataclasses and an explicit `now` (and an explicit
random number for jitter), so the whole policy is tested with tables.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

from supervisor.config import RestartConfig
from train_core.contract import EXIT_SAVED, ExitKind


@dataclass(frozen=True)
class LauncherStatus:
    """How the launcher process ended: `code` for a normal exit, `signal` when a signal killed it."""

    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait_status(cls, status: int) -> "LauncherStatus":
        import os

        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status))
        return cls(code=os.waitstatus_to_exitcode(status))

    def describe(self) -> str:
        if self.signal is not None:
            import signal as _signal

            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        return f"exit code {self.code}"


@dataclass(frozen=True)
class Classification:
    kind: ExitKind
    detail: str  # one line for events.jsonl and the log
    checkpoint: str | None = None  # resume_failed: the checkpoint that failed to load
    transient: bool = False  # resume_failed by OOM/I-O/timeout (retried in the rank): fall back, keep it


_PRIORITY = ("bad_input", "resume_failed", "oom", "error")


def classify_exit(
    reports: Sequence[Mapping[str, Any]],
    launcher: LauncherStatus,
    *,
    expected_ranks: int,
    hung: bool = False,
    killed_by_supervisor: bool = False,
) -> Classification:
    """Why an attempt ended, from the ranks' exit reports first and the launcher second.

    The launcher's code is not reliable (2+ ranks: 1 even when every rank exited 0), so
    a complete set of reports wins over it.
    """
    if hung:
        return Classification(ExitKind.HUNG, "no heartbeat: killed as hung")
    by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for r in reports:
        by_kind.setdefault(str(r.get("kind", "error")), []).append(r)
    for kind in _PRIORITY:
        if kind in by_kind:
            r = by_kind[kind][0]
            detail = str(r.get("detail") or kind)
            where = f"rank {r.get('rank', '?')}"
            if kind == "oom":
                extra = f" (micro_batch={r.get('micro_batch')}, grad_accum={r.get('grad_accum')})"
                return Classification(ExitKind.OOM, f"{where} ran out of memory{extra}: {detail}")
            if kind == "bad_input":
                return Classification(ExitKind.BAD_INPUT, f"the training script rejected its input: {detail}")
            if kind == "resume_failed":
                ckpt = r.get("checkpoint")
                return Classification(ExitKind.RESUME_FAILED, f"{where} could not resume from {ckpt}: {detail}",
                                      checkpoint=str(ckpt) if ckpt else None, transient=r.get("transient") is True)
            return Classification(ExitKind.ERROR, f"{where} failed: {detail}")
    complete = len(reports) >= expected_ranks
    if complete and set(by_kind) == {"finished"}:
        return Classification(ExitKind.FINISHED, "every rank finished")
    if complete and by_kind and set(by_kind) <= {"finished", "saved"}:
        return Classification(ExitKind.SAVED, f"ranks saved a checkpoint and exited {EXIT_SAVED}")
    # Reports missing: fall back on the launcher (and on who killed it).
    unknown = sorted(k for k in by_kind if k not in ("finished", "saved"))
    if unknown:
        return Classification(ExitKind.ERROR, f"ranks reported unknown exit kinds {unknown}")
    if killed_by_supervisor:
        return Classification(ExitKind.KILLED, f"killed by the supervisor after the grace period "
                                               f"({len(reports)}/{expected_ranks} ranks reported; launcher {launcher.describe()})")
    if launcher.signal is not None:
        return Classification(ExitKind.KILLED, f"launcher {launcher.describe()} "
                                               f"({len(reports)}/{expected_ranks} ranks reported)")
    if launcher.code == 0 and not reports:
        return Classification(ExitKind.FINISHED, "launcher exited 0 (no exit reports: script does not use train_core)")
    if launcher.code == EXIT_SAVED and not reports:
        return Classification(ExitKind.SAVED, "launcher exited 75 (no exit reports)")
    if launcher.code is not None and launcher.code < 0:
        return Classification(ExitKind.KILLED, f"a rank was killed (launcher {launcher.describe()}, "
                                               f"{len(reports)}/{expected_ranks} ranks reported)")
    return Classification(ExitKind.ERROR, f"launcher {launcher.describe()} with {len(reports)}/{expected_ranks} "
                                          "exit reports (a rank died without reporting; see the attempt log)")


# --------------------------------------------------------------------------- backoff + budget


def backoff_delay_s(cfg: RestartConfig, failures_in_a_row: int, rand01: float) -> float:
    """Delay before restart number `failures_in_a_row` (1 = first failure): exponential, capped, jittered."""
    if failures_in_a_row <= 0:
        return 0.0
    base = cfg.backoff_initial_s * cfg.backoff_multiplier ** (failures_in_a_row - 1)
    base = min(base, cfg.backoff_max_s)
    return max(0.0, base * (1.0 + cfg.jitter * (2.0 * rand01 - 1.0)))


@dataclass(frozen=True)
class RestartState:
    restart_times: tuple[float, ...] = ()  # when each counted restart was decided
    failures_in_a_row: int = 0  # drives the backoff; reset by progress
    no_progress_in_a_row: int = 0  # failed attempts in a row without progress
    best_step: int = -1  # highest step any attempt reached (heartbeat or checkpoint)

    def restarts_in_window(self, cfg: RestartConfig, now: float) -> int:
        if cfg.window_s <= 0:
            return len(self.restart_times)
        return sum(1 for t in self.restart_times if now - t < cfg.window_s)


class Verdict(enum.Enum):
    DONE = "done"  # finished: exit 0
    RESTART = "restart"
    GIVE_UP = "give_up"  # exit 3
    BAD_INPUT = "bad_input"  # exit 2: the same input would fail the same way again


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    delay_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class AttemptResult:
    kind: ExitKind
    detail: str
    new_checkpoint: bool  # a valid checkpoint newer than the resume source was committed
    max_step: int  # highest step seen in this attempt (heartbeat or checkpoint); -1 = none


def after_exit(cfg: RestartConfig, state: RestartState, result: AttemptResult, now: float,
               rand01: float) -> tuple[RestartState, Decision]:
    """What to do once an attempt is over (not for user-requested stops: those always exit)."""
    progressed = result.new_checkpoint or result.max_step > state.best_step
    best = max(state.best_step, result.max_step)
    if result.kind is ExitKind.FINISHED:
        return replace(state, best_step=best), Decision(Verdict.DONE, reason="training finished")
    if result.kind is ExitKind.BAD_INPUT:
        return replace(state, best_step=best), Decision(Verdict.BAD_INPUT, reason=result.detail)
    if result.kind is ExitKind.SAVED:
        # Stopped by a watcher (power, heat, logind): not a failure, no backoff, no budget.
        return (replace(state, best_step=best, failures_in_a_row=0, no_progress_in_a_row=0),
                Decision(Verdict.RESTART, 0.0, "saved on a watcher's request"))
    failures = 1 if progressed else state.failures_in_a_row + 1
    no_progress = 0 if progressed else state.no_progress_in_a_row + 1
    used = state.restarts_in_window(cfg, now)
    state = replace(state, best_step=best, failures_in_a_row=failures, no_progress_in_a_row=no_progress)
    if used >= cfg.max_restarts:
        window = f" within {cfg.window_s:g} s" if cfg.window_s > 0 else ""
        return state, Decision(Verdict.GIVE_UP, reason=(
            f"restart budget spent: {used} restart(s){window} of max_restarts={cfg.max_restarts}; "
            f"last attempt: {result.kind.value}: {result.detail}"))
    if cfg.no_progress_limit and no_progress >= cfg.no_progress_limit:
        at = f"step {best}" if best >= 0 else "no step reached"
        return state, Decision(Verdict.GIVE_UP, reason=(
            f"no progress in {no_progress} attempt(s) in a row (no_progress_limit={cfg.no_progress_limit}, "
            f"best {at}); last attempt: {result.kind.value}: {result.detail}"))
    delay = backoff_delay_s(cfg, failures, rand01)
    state = replace(state, restart_times=state.restart_times + (now,))
    return state, Decision(Verdict.RESTART, delay, f"{result.kind.value}: {result.detail}")


def choose_resume(checkpoints: Iterable[tuple[int, bool]], excluded: Iterable[int] = ()) -> int | None:
    """The newest valid step not excluded (steps that failed to load), or None for a fresh start."""
    excluded = set(excluded)
    best = None
    for step, valid in checkpoints:
        if valid and step not in excluded and (best is None or step > best):
            best = step
    return best


def exit_code_for_stop(checkpoint_committed: bool, signum: int | None) -> int:
    """`trainsup run` exit code after a stop the user asked for."""
    if checkpoint_committed:
        return EXIT_SAVED
    return 128 + signum if signum else 1
