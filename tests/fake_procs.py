"""A fake ProcessTable (supervisor.runner.procs) and a fake clock: the runner's state machine
driven in milliseconds, with no process started.

A fake launcher starts `plan.world_size_local` fake ranks in its process group. Each rank
follows a `Rank` script: when it starts beating, how fast it steps, when it finishes, crashes
or hangs, and what it does on the save signal and on SIGTERM. Ranks talk to the runner through
the real run-dir files (rank-R.json, status.json, exit-R.json, checkpoints), like real ranks.
The clock only moves when the runner sleeps (its loop's wait), so every timer is exact.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from supervisor.runner.procs import Child
from train_core import contract, runfiles
from train_core.contract import ExitKind
from train_core.store import CheckpointStore


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt


@dataclass
class Rank:
    """What one fake rank does; times are seconds after its attempt started."""

    beat_after: float | None = 0.2  # first heartbeat (None: never beats)
    steps_per_s: float = 10.0
    finish_at_step: int | None = None  # report "finished" and exit 0 on reaching it
    exit_at: float | None = None  # exit then with `exit_kind` / `exit_code`
    exit_kind: ExitKind | None = ExitKind.ERROR  # None: exit without a report
    exit_code: int = 1
    report: dict[str, Any] = field(default_factory=dict)  # extra exit report fields (micro_batch...)
    hang_at: float | None = None  # heartbeats stop (the process lives on)
    on_save: str = "save"  # the save signal: "save" (checkpoint, exit 75) | "ignore"
    save_s: float = 0.3  # how long a save takes
    on_term: str = "die"  # SIGTERM: "die" | "ignore"


@dataclass
class FakeProc:
    pid: int
    pgid: int
    started: float
    rank: int | None = None  # None: the launcher
    status: int | None = None  # raw wait status once it exited
    save_at: float | None = None

    @property
    def alive(self) -> bool:
        return self.status is None


def _exited(code: int) -> int:
    return (code & 0xFF) << 8


class FakeProcesses:
    """`script(attempt_number) -> Rank` says what each attempt's ranks do. `at` schedules
    callbacks (e.g. a user's signal) at fake times, run when the runner reaps."""

    def __init__(self, clock: FakeClock, run_dir: Path, script: Callable[[int], Rank]) -> None:
        self.clock = clock
        self.paths = runfiles.RunPaths(run_dir)
        self.store = CheckpointStore(self.paths.checkpoints)
        self.script = script
        self.procs: dict[int, FakeProc] = {}
        self.received: list[tuple[float, int, int]] = []  # (time, pid, signal)
        self.spawned: list[dict[str, str]] = []  # each attempt's environment
        self.prepared: list[Any] = []  # plans a standby was asked for
        self._next_pid = 5000
        self._timers: list[tuple[float, Callable[[], None]]] = []
        self._attempt: dict[str, Any] = {}

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._timers.append((t, fn))

    # -- ProcessTable ---------------------------------------------------------------
    def spawn(self, plan: Any, log_path: Path, *, cwd: Path | None = None, paths: Any = None) -> Child:
        now = self.clock()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
        env = dict(plan.env)
        self.spawned.append(env)
        launcher = self._new(now, None, pgid=None)
        attempt = int(env[runfiles.ENV_ATTEMPT])
        resume = env.get(runfiles.ENV_RESUME_FROM)
        first_step = 0
        if resume:
            first_step = next(c.step for c in self.store.scan() if str(c.path) == resume)
        self._attempt = {"number": attempt, "started": now, "script": self.script(attempt), "first_step": first_step,
                         "launcher": launcher, "last_beat": None}
        for r in range(plan.world_size_local):
            p = self._new(now, r, pgid=launcher.pid)
            runfiles.write_json_atomic(self.paths.rank_file(r), {"pid": p.pid, "rank": r, "attempt": attempt},
                                       durable=False)
        return Child(pid=launcher.pid, log_path=log_path)

    def reap(self, children: Any) -> None:
        self._advance()
        for pid, child in children.items():
            p = self.procs.get(pid)
            if p is not None and not p.alive and child.status is None:
                child.status = p.status

    def descendants(self) -> list[int]:
        self._advance()
        return [p.pid for p in self.procs.values() if p.alive]

    def start_time(self, pid: int) -> float | None:
        p = self.procs.get(pid)
        return p.started if p is not None and p.alive else None

    def signal(self, pid: int, sig: int) -> bool:
        p = self.procs.get(pid)
        if p is None or not p.alive:
            return False
        self.received.append((self.clock(), pid, sig))
        self._deliver(p, sig)
        return True

    def signal_group(self, pgid: int, sig: int) -> bool:
        members = [p for p in self.procs.values() if p.alive and p.pgid == pgid]
        for p in members:
            self.signal(p.pid, sig)
        return bool(members)

    def groups(self) -> set[int]:
        return {p.pgid for p in self.procs.values() if p.alive}

    # -- the fake world -------------------------------------------------------------------
    def prepare(self, plan: Any, *, cwd: Path | None, paths: Any, idle: bool = False) -> None:
        self.prepared.append(plan)

    def discard_standby(self) -> None:
        pass

    def signals_to(self, rank: int | None) -> list[tuple[float, int]]:
        """(time, signal) received by the ranks numbered `rank` (None: the launchers)."""
        return [(t, s) for t, pid, s in self.received if self.procs[pid].rank == rank]

    def _new(self, now: float, rank: int | None, *, pgid: int | None) -> FakeProc:
        self._next_pid += 1
        p = FakeProc(self._next_pid, pgid or self._next_pid, now, rank)
        self.procs[p.pid] = p
        return p

    def _ranks(self) -> list[FakeProc]:
        a = self._attempt
        return [p for p in self.procs.values() if p.rank is not None and p.pgid == a["launcher"].pid and p.alive]

    def _step(self, now: float) -> int:
        a, s = self._attempt, self._attempt["script"]
        if s.beat_after is None:
            return a["first_step"]
        end = now if s.hang_at is None else min(now, a["started"] + s.hang_at)
        run_s = max(0.0, end - a["started"] - s.beat_after)
        step = a["first_step"] + int(run_s * s.steps_per_s)
        return min(step, s.finish_at_step) if s.finish_at_step is not None else step

    def _advance(self) -> None:
        now = self.clock()
        for t, fn in [x for x in self._timers if x[0] <= now]:
            self._timers.remove((t, fn))
            fn()
        if not self._attempt:
            return
        a, s = self._attempt, self._attempt["script"]
        since = now - a["started"]
        ranks = self._ranks()
        for p in ranks:
            if p.save_at is not None and now >= p.save_at:
                self._save_and_exit(p, now)
            elif s.finish_at_step is not None and self._step(now) >= s.finish_at_step:
                self._exit(p, ExitKind.FINISHED, contract.EXIT_OK, now)
            elif s.exit_at is not None and since >= s.exit_at:
                self._exit(p, s.exit_kind, s.exit_code, now, **s.report)
        beating = s.beat_after is not None and since >= s.beat_after and (s.hang_at is None or since < s.hang_at)
        if beating and any(p.rank == 0 for p in self._ranks()) and a["last_beat"] != self._step(now):
            a["last_beat"] = self._step(now)
            runfiles.write_json_atomic(self.paths.status, {
                "attempt": a["number"], "step": self._step(now), "state": "training", "updated_at": now,
                "micro_batch": s.report.get("micro_batch"), "grad_accum": s.report.get("grad_accum")}, durable=False)
        launcher = a["launcher"]
        if launcher.alive and not self._ranks():
            codes = [p.status for p in self.procs.values() if p.pgid == launcher.pid and p.rank is not None]
            launcher.status = codes[0] if len(codes) == 1 else _exited(1 if any(codes) else 0)

    def _deliver(self, p: FakeProc, sig: int) -> None:
        s = self._attempt["script"]
        if sig == signal.SIGKILL:
            p.status = signal.SIGKILL
        elif p.rank is None:
            if sig in (signal.SIGTERM, signal.SIGINT):
                p.status = sig  # the launcher dies of it; its ranks are orphaned, not killed
        elif sig == signal.SIGUSR1 and s.on_save == "save" and p.save_at is None:
            p.save_at = self.clock() + s.save_s
        elif sig == signal.SIGTERM and s.on_term == "die":
            p.status = signal.SIGTERM

    def _save_and_exit(self, p: FakeProc, now: float) -> None:
        step = self._step(now)
        if p.rank == 0 and not any(c.step == step for c in self.store.scan()):
            tmp = self.store.begin(step)
            (tmp / "model.safetensors").write_bytes(b"weights")
            self.store.commit(tmp, step, epoch=0, batch_in_epoch=step, reason="stop")
        self._exit(p, ExitKind.SAVED, contract.EXIT_SAVED, now)

    def _exit(self, p: FakeProc, kind: ExitKind | None, code: int, now: float, **report: Any) -> None:
        if kind is not None:
            contract.write_exit_report(self.paths, p.rank, self._attempt["number"], kind, code,
                                       step=self._step(now), detail=f"fake {kind.value}", **report)
        p.status = _exited(code)


def job_file(tmp: Path, **sections: dict[str, Any]) -> Path:
    """A job for the fake table: exact timers (no jitter), short windows."""
    from supervisor_helpers import write_job

    defaults = {
        "restart": {"max_restarts": 5, "backoff_initial_s": 1.0, "backoff_multiplier": 2.0, "backoff_max_s": 8.0,
                    "jitter": 0.0, "no_progress_limit": 0},
        "stop": {"grace_s": 5.0, "kill_after_s": 2.0},
        "watch": {"hang_timeout_s": 3.0, "startup_timeout_s": 4.0, "poll_interval_s": 0.1},
    }
    for name, body in sections.items():
        defaults.setdefault(name, {}).update(body)
    script = tmp / "train.py"
    script.write_text("")  # never run
    return write_job(tmp, [], script=script, **defaults)

