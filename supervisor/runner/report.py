"""What humans see of a running supervisor: the Reporter the CLI plugs in (rank output,
progress), and the snapshot written to supervisor.json for `trainsup status`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from supervisor.runner.states import State

if TYPE_CHECKING:
    from supervisor.runner.loop import Runner


class Reporter(Protocol):
    """Where the CLI shows what happens (logging covers transitions; this covers the rest)."""

    def child_output(self, line: str) -> None: ...

    def progress(self, snapshot: dict[str, Any]) -> None: ...


class NullReporter:
    def child_output(self, line: str) -> None:
        pass

    def progress(self, snapshot: dict[str, Any]) -> None:
        pass


def snapshot(r: "Runner", now: float) -> dict[str, Any]:
    """supervisor.json: what `trainsup status` shows of a running supervisor."""
    a = r.attempt
    hb = (a.heartbeat if a else None) or {}
    newest = r.ckpts.newest()
    return {
        "state": r.state.value if r.state else None,
        "pid": os.getpid(),
        "attempt": r.attempts,
        "restarts": max(0, r.attempts - r._first_attempt - 1),
        "started_at": r.started_at,
        "updated_at": r.wall_clock(),
        "job_file": str(r.job.job_file) if r.job.job_file else None,
        "run_dir": str(r.job.run_dir),
        "child_pid": a.child.pid if a and not a.child.exited else None,
        "rank_pids": {str(k): v for k, v in a.rank_pids.items()} if a else {},
        "resume_from": str(a.resume.path) if a and a.resume else None,
        **{k: hb.get(k) for k in ("step", "max_steps", "loss", "tokens_per_s")},
        "rank_state": hb.get("state"),
        "heartbeat_age_s": round(now - a.heartbeat_seen_at, 1) if a and a.heartbeat_seen_at else None,
        "last_checkpoint": {"step": newest.step, "path": str(newest.path), "reason": newest.reason}
        if newest else None,
        # a time of day: the timer itself is monotonic
        "backoff_until": r.wall_clock() + r.backoff_until - now if r.state == State.BACKOFF else None,
        "blocked_by": r.blocked_reason if r.state == State.WAITING else None,
        "paused_by": sorted(r.paused_by),
        "exit_code": r.exit_code,
        "exit_reason": r.exit_reason or None,
        "last_event": r.events.last if r.events else None,
        "watchers": r.watchers.status(),
        "launch_env": dict(r.batch.env) or None,  # e.g. the OOM back-off's batch shape
        "stop_budget": r.budget_state,  # budget_s against save_s + step_s; "problem" when short
    }
