"""RUN_DIR/failures.json: the run's unannounced failures and the time it was exposed to them,
across attempts and supervisors, for the "auto" checkpoint interval (train_core/interval.py).

  failures     attempts that ended without being asked to: a crash, an OOM, a hang, a kill
               (a saved stop loses nothing and is not one)
  uptime_s     seconds of attempts, from their start to their end
  open_since   wall-clock start of the attempt under way; a supervisor that finds one at
               start was itself killed mid-attempt (power loss, SIGKILL): a failure, whose
               uptime ends at that attempt's last heartbeat
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

from train_core.contract import ExitKind
from train_core.runfiles import RunPaths, json_number, read_json, write_json_atomic

UNANNOUNCED = (ExitKind.ERROR, ExitKind.OOM, ExitKind.HUNG, ExitKind.KILLED)


@dataclass(frozen=True)
class History:
    failures: int = 0
    uptime_s: float = 0.0
    open_since: float | None = None


def load(paths: RunPaths) -> History:
    obj = read_json(paths.failures) or {}
    return History(int(json_number(obj, "failures") or 0), json_number(obj, "uptime_s") or 0.0,
                   json_number(obj, "open_since"))


def store(paths: RunPaths, h: History) -> None:
    write_json_atomic(paths.failures, asdict(h))


def recover(paths: RunPaths) -> History:
    """At a supervisor's start: an attempt left open by a supervisor that died is counted."""
    h = load(paths)
    if h.open_since is None:
        return h
    beat = json_number(read_json(paths.status) or {}, "updated_at")
    end = min(beat, time.time()) if beat is not None and beat >= h.open_since else h.open_since
    h = History(h.failures + 1, h.uptime_s + max(0.0, end - h.open_since), None)
    store(paths, h)
    return h


def started(paths: RunPaths, h: History, wall_now: float) -> History:
    h = replace(h, open_since=wall_now)
    store(paths, h)
    return h


def ended(paths: RunPaths, h: History, duration_s: float, kind: ExitKind, asked_to_stop: bool) -> History:
    failed = kind in UNANNOUNCED and not asked_to_stop
    h = History(h.failures + int(failed), h.uptime_s + max(0.0, duration_s), None)
    store(paths, h)
    return h

