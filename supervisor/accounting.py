"""Where a run's wall-clock time went, across all its attempts and supervisors:
`account(run_dir) -> Accounting`. Goodput here is the productive time (the steps that are in the
final model's history) over the wall time, as the goodput bench measures it (README, "Goodput
under preemption"), with the lost time split by cause. Torch-free; reads only files of the run
dir, all of them untrusted (a bad line or field is skipped, a missing file is no data).

Sources: events.jsonl (the supervisor: attempts, stops, exits, checkpoints, pauses, waiting,
sleep), metrics.jsonl (the main rank: each optimizer step, save and pause, with wall-clock
times), the checkpoints' manifests, status.json, supervisor.json and the attempt logs' mtimes
(an attempt whose supervisor was SIGKILLed has no attempt_exit record: it ends at the last sign
of it).

Every moment of the run is one category (the first that applies, from the top):

  asleep      the machine slept (logind's prepare_for_sleep .. resumed_from_sleep, from the
              last thing written before it): not counted in the goodput
  paused      the loop was paused (metrics.jsonl pause records; the supervisor's heat and power
              pauses)
  waiting     the supervisor waited for a watcher before starting an attempt (heat, power,
              shutdown)
  saving      the loop was held by a save (metrics.jsonl save records: blocked_s)
  training    a step that is in the final model's history (the productive time)
  recomputed  a step whose work was lost (after the newest checkpoint when its attempt ended
              without saving): it was run again, or the run ended without it
  exit        an attempt's end: from its last step, save or evaluation until its processes
              were gone (the stop, a crash's dying, a hang until it was killed)
  restart     the rest: from an attempt's end (or the run's start) until the first step of the
              next attempt (backoff, process start, imports, loading the checkpoint)

A step's time is the time since the step before it in the same attempt; the first step of an
attempt starts when its session's loop started (metrics.jsonl's start record), else it is given
the attempt's median step time (the rest of the time from its launch is restart). An attempt
without step records (a script without a TrainSession) is known only by its checkpoints and
last heartbeat: the time between them is its steps', the time after its last checkpoint until
a crash is recomputed, and the result says `estimated`. The time between a supervisor's clean exit (a stop with exit 75, a finished or given
up run) and the next supervisor's start is not the run's (`off_s`: a person chose to stop it);
after a supervisor that vanished without a supervisor_exit record it is restart.

goodput = productive_s / (wall_s - asleep_s).
"""

from __future__ import annotations

import bisect
import datetime as dt
import heapq
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from supervisor.events import read_events
from train_core.checkpoint import STEP_RE
from train_core.contract import pid_alive
from train_core.metricslog import METRICS_FILE, iter_metrics
from train_core.runfiles import RunPaths, is_number, paths_here, read_json

CATEGORIES = ("training", "saving", "exit", "restart", "recomputed", "paused", "waiting", "asleep")
LOST = ("saving", "exit", "restart", "recomputed", "paused", "waiting")
STOP_CAUSES = ("preempt", "crash", "oom", "hang", "thermal", "power", "sleep", "shutdown", "other")

# where layers overlap, the higher one wins; "off" is cut out of the timeline
_PRIORITY = {"restart": 0, "exit": 1, "training": 2, "recomputed": 2, "saving": 3, "waiting": 4, "paused": 5,
             "asleep": 6, "off": 7}
_STEP_DIR = re.compile(r"(?:^|/)step-0*(\d+)/?$")
_TERMINAL = ("exited", "fatal")


@dataclass
class Accounting:
    """Where the run's time went. Seconds are wall-clock seconds; `segments`, `stops` and
    `checkpoints` are for a picture: sorted by time, in unix seconds."""

    run_dir: str
    live: bool  # a supervisor of the run is running: the end is now
    start_ts: float | None
    end_ts: float | None
    wall_s: float  # end - start, less off_s
    productive_s: float  # the steps in the final model's history
    lost_s: dict[str, float]  # by cause: saving, exit, restart, recomputed, paused, waiting
    asleep_s: float  # apart: in wall_s, not in the goodput
    off_s: float  # between a supervisor's clean exit and the next one's start: not in wall_s
    goodput: float | None  # productive_s / (wall_s - asleep_s); None without wall time
    attempts: int
    final_step: int | None  # the last step of the final model's history
    steps_in_history: int  # step records that are in it
    steps_recomputed: int  # steps whose work was lost (that are known)
    estimated: bool = False  # some attempt has no step records: its steps are known from its checkpoints only
    segments: list[tuple[float, float, str]] = field(default_factory=list)  # (start_ts, end_ts, category)
    stops: list[dict[str, Any]] = field(default_factory=list)  # {ts, step, cause, kind, attempt, detail}
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # {ts, step, reason, attempt}

    def summary(self) -> dict[str, Any]:
        """The numbers, without the lists (what `trainsup status --json` shows)."""
        return {
            "live": self.live,
            "start_ts": _r(self.start_ts), "end_ts": _r(self.end_ts),
            "wall_s": _r(self.wall_s), "productive_s": _r(self.productive_s),
            "lost_s": {k: _r(v) for k, v in self.lost_s.items()},
            "asleep_s": _r(self.asleep_s), "off_s": _r(self.off_s),
            "goodput": None if self.goodput is None else round(self.goodput, 4),
            "attempts": self.attempts, "final_step": self.final_step,
            "steps_in_history": self.steps_in_history, "steps_recomputed": self.steps_recomputed,
            "estimated": self.estimated, "stops": len(self.stops), "checkpoints": len(self.checkpoints),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return {
            "run_dir": self.run_dir,
            **self.summary(),
            "stops": [dict(s) for s in self.stops],
            "checkpoints": [dict(c) for c in self.checkpoints],
            "segments": [[_r(a), _r(b), c] for a, b, c in self.segments],
        }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


# --------------------------------------------------------------------------- reading


def _num(v: Any) -> float | None:
    return float(v) if is_number(v) else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def iso_ts(v: Any) -> float | None:
    if not isinstance(v, str):
        return None
    try:
        t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


def _step_of_path(v: Any) -> int | None:
    m = _STEP_DIR.search(v) if isinstance(v, str) else None
    return int(m.group(1)) if m else None


@dataclass
class _Attempt:
    number: int  # TRAINSUP_ATTEMPT (0: no supervisor)
    part: int = 0  # runs without a supervisor: each resumed run is a part of attempt 0
    start: float | None = None  # launched (state -> starting)
    loop_start: float | None = None  # its session's loop started (metrics.jsonl start record)
    end: float | None = None
    exit_kind: str | None = None  # attempt_exit's kind; None: no record
    unsaved: bool = False  # it stopped as asked but its budget could not hold a save (stop_unsaved)
    exit_detail: str = ""
    exit_step: int | None = None
    resume_step: int | None = None
    stop_at: float | None = None  # state -> stopping
    stop_reason: str = ""
    steps: list[tuple[int, float]] = field(default_factory=list)  # (step, ts) in file order
    saves: list[tuple[float, float]] = field(default_factory=list)
    pauses: list[tuple[float, float]] = field(default_factory=list)
    last_metrics_ts: float | None = None  # the last metrics record after the last step (an evaluation)
    last_record_ts: float | None = None
    live: bool = False
    coarse: bool = False  # no step records: its steps are its checkpoints (and last heartbeat)

    @property
    def first_ts(self) -> float | None:
        for t in (self.start, self.loop_start, self.steps[0][1] if self.steps else None):
            if t is not None:
                return t
        return self.last_record_ts

    @property
    def last_step(self) -> int | None:
        return self.steps[-1][0] if self.steps else self.exit_step

    @property
    def lo(self) -> int:
        """The step it resumed from (0: a fresh start)."""
        if self.resume_step is not None:
            return self.resume_step
        return self.steps[0][0] - 1 if self.steps else 0


def _manifests(paths: RunPaths) -> list[dict[str, Any]]:
    out = []
    try:
        entries = list(os.scandir(paths.checkpoints))
    except OSError:
        return out
    for e in entries:
        m = STEP_RE.match(e.name)
        if not m or not e.is_dir(follow_symlinks=False):
            continue
        man = read_json(Path(e.path) / "manifest.json") or {}
        ts = iso_ts(man.get("created_at"))
        if ts is not None and _int(man.get("step")) == int(m.group(1)):
            out.append({"ts": ts, "step": int(m.group(1)), "reason": man.get("reason")
                        if isinstance(man.get("reason"), str) else None, "attempt": _int(man.get("attempt"))})
    return out


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


# --------------------------------------------------------------------------- the account


def account(run_dir: str | os.PathLike, *, now: float | None = None, live: bool | None = None) -> Accounting:
    """The accounting of `run_dir` as of `now` (default: the time now). `live`: whether a
    supervisor of the run still runs (default: supervisor.json's pid is alive and its state not
    final); a live run's time runs until `now`."""
    paths = paths_here(Path(run_dir))
    wall_now = time.time() if now is None else now
    sup = read_json(paths.supervisor) or {}
    if live is None:
        live = sup.get("state") not in (None, *_TERMINAL) and pid_alive(sup.get("pid"))
    events = sorted((e for e in read_events(paths.events) if _num(e.get("ts")) is not None
                     and isinstance(e.get("event"), str)), key=lambda e: e["ts"])
    b = _Builder(paths, events, wall_now, live, sup)
    return b.result()


class _Builder:
    def __init__(self, paths: RunPaths, events: list[dict[str, Any]], now: float, live: bool,
                 sup: dict[str, Any]) -> None:
        self.paths, self.events, self.now, self.live, self.sup = paths, events, now, live, sup
        self.attempts: dict[tuple[int, int], _Attempt] = {}
        self.layers: list[tuple[float, float, str]] = []
        self.activity: list[float] = []  # every time something was written: the last before a sleep
        self.off: list[tuple[float, float]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.stops: list[dict[str, Any]] = []
        self.triggers: list[tuple[float, str, str]] = []  # (ts, cause, detail) of stop requests
        self.sup_starts: list[float] = []
        self.sup_exits: list[float] = []
        self.sleeps: list[tuple[float, float]] = []  # prepare_for_sleep .. resumed_from_sleep
        self.manifests = _manifests(paths)
        self.final: int | None = None
        self._read_events()
        self._read_metrics()
        self.order = sorted(self.attempts.values(),
                            key=lambda a: (a.first_ts if a.first_ts is not None else math.inf, a.number, a.part))

    # -- events ------------------------------------------------------------------
    def _attempt(self, number: int, part: int = 0) -> _Attempt:
        return self.attempts.setdefault((number, part), _Attempt(number, part))

    def _read_events(self) -> None:
        waiting_since: float | None = None
        paused_by: dict[str, float] = {}  # watcher -> since
        pause_since: float | None = None
        sleep_since: float | None = None
        exit_at: float | None = None  # the last supervisor's clean exit
        last_ts: float | None = None

        def close_waiting(at: float) -> None:
            nonlocal waiting_since
            if waiting_since is not None:
                self.layers.append((waiting_since, at, "waiting"))
                waiting_since = None

        def close_pauses(at: float) -> None:
            nonlocal pause_since
            if pause_since is not None:
                self.layers.append((pause_since, at, "paused"))
                pause_since = None
            paused_by.clear()

        for e in self.events:
            ts, name = float(e["ts"]), e["event"]
            n = _int(e.get("attempt"))
            if name != "resumed_from_sleep":
                self.activity.append(ts)
            if name == "supervisor_start":
                if exit_at is not None:
                    self.off.append((exit_at, ts))
                elif last_ts is not None:  # the one before vanished: what it waited for ends with it
                    close_waiting(last_ts)
                    close_pauses(last_ts)
                exit_at = None
                self.sup_starts.append(ts)
            elif name == "supervisor_exit":
                close_waiting(ts)
                close_pauses(ts)
                exit_at = ts
                self.sup_exits.append(ts)
            elif name == "state":
                to = e.get("to")
                if to == "waiting":
                    waiting_since = ts if waiting_since is None else waiting_since
                else:
                    close_waiting(ts)
                if to == "starting" and n is not None:
                    a = self._attempt(n)
                    a.start = ts
                    a.resume_step = _step_of_path(e.get("resume_from"))
                    if a.resume_step is None and not e.get("resume_from"):  # null: a fresh start
                        a.resume_step = 0
                elif to == "stopping" and n is not None:
                    a = self._attempt(n)
                    if a.stop_at is None:
                        a.stop_at, a.stop_reason = ts, str(e.get("cause") or "")
            elif name == "attempt_exit" and n is not None:
                a = self._attempt(n)
                a.end = ts
                a.exit_kind = e.get("kind") if isinstance(e.get("kind"), str) else "error"
                a.exit_detail = str(e.get("detail") or "")
                a.exit_step = _int(e.get("step"))
                dur = _num(e.get("duration_s"))
                if a.start is None and dur is not None:
                    a.start = ts - dur
            elif name == "checkpoint" and _int(e.get("step")) is not None:
                self.checkpoints.append({"ts": ts, "step": e["step"], "reason": e.get("reason")
                                         if isinstance(e.get("reason"), str) else None, "attempt": n})
            elif name == "stop_unsaved" and n is not None:
                self._attempt(n).unsaved = True
            elif name == "stop_requested":
                self.triggers.append((ts, "preempt", f"signal {e.get('signal')}"))
            elif name == "hung":
                self.triggers.append((ts, "hang", str(e.get("reason") or "no heartbeat")))
            elif name == "prepare_for_sleep":
                sleep_since = ts
                self.stops.append({"ts": ts, "step": None, "cause": "sleep", "kind": "sleep", "attempt": None,
                                   "detail": "the system went to sleep (a checkpoint first, training went on)"})
            elif name == "resumed_from_sleep":
                if sleep_since is not None:
                    self.sleeps.append((sleep_since, ts))
                sleep_since = None
            else:
                self._watcher_event(e, ts, name, paused_by)
                if paused_by and pause_since is None:
                    pause_since = ts
                elif not paused_by and pause_since is not None:
                    self.layers.append((pause_since, ts, "paused"))
                    pause_since = None
            last_ts = ts
        end = self.now if self.live else last_ts
        if end is not None:
            close_waiting(end)
            close_pauses(end)

    def _watcher_event(self, e: dict[str, Any], ts: float, name: str, paused_by: dict[str, float]) -> None:
        """A watcher's decision: pauses (heat, power), stops (heat, power, shutdown)."""
        action, watcher = e.get("action"), str(e.get("watcher") or name)
        cause = ("thermal" if name.startswith("thermal") or watcher == "gpu" else
                 "shutdown" if watcher == "logind" else "power")
        if action == "pause":
            paused_by[watcher] = ts
            self.stops.append({"ts": ts, "step": None, "cause": cause, "kind": "pause", "attempt": None,
                               "detail": str(e.get("reason") or name)})
        elif action in ("resume", "stop"):
            paused_by.pop(watcher, None)
        if action == "stop":
            self.triggers.append((ts, cause, str(e.get("reason") or name)))

    # -- metrics.jsonl -----------------------------------------------------------------
    def _read_metrics(self) -> None:
        parts: dict[int, int] = {}
        for rec in iter_metrics(self.paths.run_dir / METRICS_FILE):
            ts, step, kind = float(rec["ts"]), rec["step"], rec["kind"]
            n = _int(rec.get("attempt"))
            n = 0 if n is None or n < 0 else n
            a = self._attempt(n, parts.get(n, 0))
            if (kind == "step" and a.steps and step <= a.steps[-1][0]) or (
                    kind == "start" and (a.steps or a.loop_start is not None)):
                if n != 0:
                    continue  # a supervisor's attempt runs once, each step once: a repeated line is noise
                parts[n] = parts.get(n, 0) + 1  # a run without a supervisor again: the next part of attempt 0
                a = self._attempt(n, parts[n])
            self.activity.append(ts)
            a.last_record_ts = ts if a.last_record_ts is None else max(a.last_record_ts, ts)
            if kind == "start":
                a.loop_start = ts
                if a.resume_step is None:
                    a.resume_step = step
            elif kind == "step":
                a.steps.append((step, ts))
                a.last_metrics_ts = None
            elif kind == "metrics":
                if a.steps:
                    a.last_metrics_ts = ts
            elif kind == "save":
                s = _num(rec.get("blocked_s"))
                if s is not None and s >= 0:
                    a.saves.append((ts - s, ts))
            elif kind == "pause":
                s = _num(rec.get("paused_s"))
                if s is not None and s >= 0:
                    a.pauses.append((ts - s, ts))

    # -- the timeline --------------------------------------------------------------------
    def result(self) -> Accounting:
        self.activity.sort()
        self._close_attempts()
        known = {c["step"] for c in self.checkpoints}
        self.checkpoints += [c for c in self.manifests if c["step"] not in known]
        self.checkpoints.sort(key=lambda c: (c["ts"], c["step"]))
        self._coarse_steps()
        history = self._history()
        typical = self._typical_step_s()
        for a in self.order:
            self._paint_attempt(a, history.get((a.number, a.part)), typical)
        self._supervisor_exits()
        times = [t for a in self.order for t in (a.start, a.end, a.last_record_ts) if t is not None]
        times += [self.events[0]["ts"], self.events[-1]["ts"]] if self.events else []
        times += [t for a, b, _ in self.layers for t in (a, b)]
        if not times:
            return self._empty()
        start = min(times)
        end = self.now if self.live else max(times)
        for s0, s1 in self.sleeps:
            i = bisect.bisect_left(self.activity, s1)
            last = self.activity[i - 1] if i > 0 else s0
            self.layers.append((max(s0, min(last, s1)), s1, "asleep"))
        self.layers += [(a, b, "off") for a, b in self.off]
        segments = _paint(start, end, [("restart", start, end)] + [(c, a, b) for a, b, c in self.layers])
        totals = dict.fromkeys(CATEGORIES, 0.0)
        for a, b, c in segments:
            totals[c] += b - a
        wall = sum(totals.values())
        asleep = totals["asleep"]
        productive = totals["training"]
        off = sum(max(0.0, min(b, end) - max(a, start)) for a, b in self.off)
        n_hist = n_lost = 0
        for a in self.order:
            prev = a.lo
            for s, _ in a.steps:  # a coarse attempt's points stand for the steps since the one before
                if _in(history.get((a.number, a.part)), s):
                    n_hist += max(1, s - prev)
                else:
                    n_lost += max(1, s - prev)
                prev = s
        self._stops()
        final = self.final
        return Accounting(
            run_dir=str(self.paths.run_dir), live=self.live, start_ts=start, end_ts=end, wall_s=wall,
            productive_s=productive, lost_s={k: totals[k] for k in LOST}, asleep_s=asleep, off_s=off,
            goodput=productive / (wall - asleep) if wall - asleep > 0 else None,
            attempts=len({a.number for a in self.order if a.number > 0}) or len(self.order),
            final_step=final, steps_in_history=n_hist, steps_recomputed=n_lost,
            estimated=any(a.coarse for a in self.order),
            segments=segments, stops=sorted(self.stops, key=lambda s: s["ts"]), checkpoints=self.checkpoints,
        )

    def _empty(self) -> Accounting:
        return Accounting(run_dir=str(self.paths.run_dir), live=self.live, start_ts=None, end_ts=None, wall_s=0.0,
                          productive_s=0.0, lost_s=dict.fromkeys(LOST, 0.0), asleep_s=0.0, off_s=0.0, goodput=None,
                          attempts=0, final_step=None, steps_in_history=0, steps_recomputed=0,
                          checkpoints=self.checkpoints)

    def _close_attempts(self) -> None:
        """An attempt without an attempt_exit record: the live one runs until now; one whose
        supervisor vanished ends at the last sign of it (its records, heartbeat, checkpoints,
        log), before the next attempt or supervisor started."""
        status = read_json(self.paths.status) or {}
        current = _int(self.sup.get("attempt"))
        for i, a in enumerate(self.order):
            if a.end is not None:
                continue
            if self.live and a.number == current and a.number > 0 and i == len(self.order) - 1:
                a.live, a.end = True, self.now
                continue
            signs = [a.last_record_ts, _mtime(self.paths.logs / f"attempt-{a.number}.log") if a.number > 0 else None]
            if a.number > 0:
                if _int(status.get("attempt")) == a.number:
                    signs.append(_num(status.get("updated_at")))
                signs += [m["ts"] for m in self.manifests if m["attempt"] == a.number]
            first = a.first_ts
            later = [t for t in (b.first_ts for b in self.order[i + 1:]) if t is not None]
            later += [t for t in self.sup_starts if first is not None and t > first]
            end = max((t for t in signs if t is not None), default=first)
            if end is not None and later:
                end = min(end, min(later))
            if end is not None and first is not None:
                end = max(end, first)
            a.end = end

    def _supervisor_exits(self) -> None:
        """From a supervisor's last attempt's end to its exit: exit."""
        for x in self.sup_exits:
            since = max((t for t in self.sup_starts if t <= x), default=-math.inf)
            ends = [a.end for a in self.order if a.end is not None and since <= a.end <= x]
            if ends:
                self.layers.append((max(ends), x, "exit"))

    def _coarse_steps(self) -> None:
        """An attempt of a supervisor without step records (a script without a TrainSession, or
        one older than metrics.jsonl): its steps are its checkpoints, and its last heartbeat."""
        status = read_json(self.paths.status) or {}
        for a in self.order:
            if a.steps or a.number <= 0:
                continue
            pts = {c["step"]: c["ts"] for c in self.checkpoints if c.get("attempt") == a.number and c["step"] > a.lo}
            hb_step, hb_ts = _int(status.get("step")), _num(status.get("updated_at"))
            if _int(status.get("attempt")) == a.number and hb_step is not None and hb_ts is not None:
                pts.setdefault(hb_step, hb_ts)
            seq: list[tuple[int, float]] = []
            for step, ts in sorted(pts.items(), key=lambda p: (p[1], p[0])):
                if step > a.lo and (not seq or step > seq[-1][0]) and (a.end is None or ts <= a.end):
                    seq.append((step, ts))
            if seq:
                a.steps, a.coarse = seq, True

    def _typical_step_s(self) -> float:
        per = [x for a in self.order for x in _per_step(a.steps)]
        return statistics.median(per) if per else 0.0

    def _history(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(lo, hi]: the steps of each attempt that are in the final model's history, walking back
        from the final state through the checkpoint each attempt resumed from."""
        with_steps = [a for a in self.order if a.steps]
        if not with_steps:
            return {}
        last = with_steps[-1]
        top = last.steps[-1][0]
        committed = [c["step"] for c in self.checkpoints if last.lo < c["step"] <= top]
        if last.live or last.exit_kind == "finished":
            hi = top
        elif committed:
            hi = max(committed)
        elif last.exit_kind in (None, "saved") and not last.unsaved:
            hi = top  # no record of a checkpoint either way (a run without a supervisor): taken as kept
        else:
            hi = last.lo
        self.final = hi
        out: dict[tuple[int, int], tuple[int, int]] = {}
        cur: _Attempt | None = last
        while cur is not None and (cur.number, cur.part) not in out:
            lo = cur.lo
            out[(cur.number, cur.part)] = (lo, hi)
            if lo <= 0:
                break
            idx = next(i for i, x in enumerate(self.order) if x is cur)
            # its checkpoint came from the latest attempt before it that ran that step (known only
            # by its checkpoints: that started before it)
            cur = next((b for b in reversed(self.order[:idx])
                        if (b.lo < lo if b.coarse else any(s == lo for s, _ in b.steps))), None)
            hi = lo
        return out

    def _paint_attempt(self, a: _Attempt, hist: tuple[int, int] | None, typical: float) -> None:
        add = self.layers.append
        if a.steps:
            if a.loop_start is not None and a.loop_start <= a.steps[0][1]:
                prev = a.loop_start  # the session's loop started: the first step began
            else:  # else it took as long as the attempt's usual step
                own = _per_step(a.steps)
                prev = a.steps[0][1] - (statistics.median(own) if own else typical) * max(1, a.steps[0][0] - a.lo)
            if a.start is not None:
                prev = max(prev, min(a.start, a.steps[0][1]))
            run_start, cat = prev, None
            for step, ts in a.steps:  # runs of steps of one category: one layer each
                now_cat = "training" if _in(hist, step) else "recomputed"
                if now_cat != cat and cat is not None:
                    add((run_start, prev, cat))
                    run_start = prev
                cat = now_cat
                prev = max(prev, ts)
            add((run_start, prev, cat))
            if a.last_metrics_ts is not None and a.last_metrics_ts > prev:  # the last evaluation
                add((prev, a.last_metrics_ts, cat))
                prev = a.last_metrics_ts
            work_end = prev
        else:
            work_end = a.start
        for s0, s1 in a.saves:
            add((s0, s1, "saving"))
        for p0, p1 in a.pauses:
            add((p0, p1, "paused"))
        if a.end is not None and work_end is not None:
            tail = max([work_end] + [s1 for _, s1 in a.saves + a.pauses if s1 <= a.end])
            if a.steps and a.end > tail:
                if a.live:  # the step under way
                    cat = "exit" if self.sup.get("state") == "stopping" else "training"
                elif a.coarse and a.exit_kind not in ("finished", "saved"):
                    cat = "recomputed"  # steps past its last checkpoint, not recorded, lost
                else:
                    cat = "exit"
                add((tail, a.end, cat))

    # -- stops ---------------------------------------------------------------------------
    def _stops(self) -> None:
        for i, a in enumerate(self.order):
            if a.live or a.exit_kind == "finished" or a.end is None:
                continue
            last_of_plain = a.number == 0 and i == len(self.order) - 1
            if last_of_plain:
                continue  # a run without a supervisor that simply ended
            window_end = a.stop_at if a.stop_at is not None else a.end
            window_start = a.first_ts if a.first_ts is not None else window_end
            trig = [t for t in self.triggers if window_start - 1e-6 <= t[0] <= window_end + 1e-6]
            kind = a.exit_kind
            if kind == "oom":
                cause, detail = "oom", a.exit_detail or "out of memory"
            elif kind == "hung":
                cause, detail = "hang", a.exit_detail or "no heartbeat"
            elif trig:
                cause, detail = trig[-1][1], trig[-1][2]
            elif kind in ("error", "resume_failed", "killed"):
                cause, detail = "crash", a.exit_detail or kind
            elif kind is None and a.number > 0:
                cause, detail = "crash", "no attempt_exit record: the supervisor ended without one (killed?)"
            elif a.stop_reason.startswith(("second SIG", "SIG")):
                cause, detail = "preempt", a.stop_reason
            else:
                cause, detail = "other", a.exit_detail or a.stop_reason or (kind or "a new run")
            step = a.last_step
            self.stops.append({"ts": window_end, "step": step, "cause": cause, "kind": "stop",
                               "attempt": a.number or None, "detail": detail})
        steps = sorted((ts, s) for a in self.order for s, ts in a.steps)
        times = [t for t, _ in steps]
        for s in self.stops:
            if s["step"] is None:  # a pause or a sleep: the step it came after
                i = bisect.bisect_right(times, s["ts"])
                s["step"] = steps[i - 1][1] if i > 0 else None


def _per_step(steps: list[tuple[int, float]]) -> list[float]:
    """Seconds per step between consecutive (step, ts) points."""
    return [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(steps, steps[1:]) if b[0] > a[0] and b[1] >= a[1]]


def _in(hist: tuple[int, int] | None, step: int) -> bool:
    return hist is not None and hist[0] < step <= hist[1]


def _paint(start: float, end: float, layers: Iterable[tuple[str, float, float]]) -> list[tuple[float, float, str]]:
    """[start, end] split into (a, b, category), each moment the highest-priority layer over it;
    "off" moments left out; neighbours of one category merged."""
    items = sorted((max(a, start), min(b, end), c) for c, a, b in layers if min(b, end) > max(a, start))
    points = sorted({p for a, b, _ in items for p in (a, b)})
    out: list[tuple[float, float, str]] = []
    heap: list[tuple[int, float, str]] = []
    j = 0
    for p, q in zip(points, points[1:]):
        while j < len(items) and items[j][0] <= p:
            a, b, c = items[j]
            heapq.heappush(heap, (-_PRIORITY[c], b, c))
            j += 1
        while heap and heap[0][1] <= p:
            heapq.heappop(heap)
        if not heap:
            continue
        cat = heap[0][2]
        if cat == "off":
            continue
        if out and out[-1][2] == cat and out[-1][1] == p:
            out[-1] = (out[-1][0], q, cat)
        else:
            out.append((p, q, cat))
    return out
