"""The runner's state machine on a fake process table and a fake clock (tests/fake_procs.py):
every allowed transition, each illegal one refused, and the timers (grace -> SIGTERM ->
SIGKILL, backoff, hang and startup detection) to the tick, in milliseconds of real time.
The real-process integration tests (test_supervisor_integration.py and others) stay."""

from __future__ import annotations

import itertools
import signal
from typing import Any, Callable

import pytest

from fake_procs import FakeClock, FakeProcesses, Rank, job_file
from supervisor.config import load_job
from supervisor.events import read_events
from supervisor.runner import Runner, State, TransitionError
from supervisor.runner.states import ALLOWED
from supervisor.watch import Action, Decision
from train_core import runfiles
from train_core.contract import EXIT_GAVE_UP, EXIT_OK, EXIT_SAVED, EXIT_USAGE, ExitKind

T0 = 1000.0  # the fake clock's start
TICK = 0.1  # [watch] poll_interval_s of job_file(): how late a timer may fire


class ScriptedWatcher:
    """Blocks starts during [t0, t1) windows; hands out decisions at given times."""

    name = "fake"

    def __init__(self, blocked: tuple[tuple[float, float], ...] = (),
                 decisions: tuple[tuple[float, Action], ...] = ()) -> None:
        self.blocked = blocked
        self.decisions = list(decisions)

    def poll(self, now: float) -> list[Decision]:
        due = [(t, a) for t, a in self.decisions if t <= now]
        for d in due:
            self.decisions.remove(d)
        return [Decision(a, f"fake_{a.value}", f"scripted {a.value}") for _, a in due]

    def blocking_reason(self, now: float) -> str | None:
        return "scripted block" if any(t0 <= now < t1 for t0, t1 in self.blocked) else None

    def on_checkpoint(self, step: int, now: float) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class Sim:
    def __init__(self, tmp_path, script: Callable[[int], Rank] | Rank, *, watchers=(), **sections) -> None:
        self.job = load_job(job_file(tmp_path, **sections), check_script=False)
        self.clock = FakeClock(T0)
        scripted = script if callable(script) else (lambda n, r=script: r)
        self.procs = FakeProcesses(self.clock, self.job.run_dir, scripted)
        self.runner = Runner(self.job, watchers=watchers, procs=self.procs, clock=self.clock,
                             wall_clock=self.clock, sleep=self._sleep, rand=lambda: 0.5, install_signals=False)

    def _sleep(self, dt: float) -> None:
        assert self.clock.t < T0 + 3600, "the fake run never ended"
        self.clock.sleep(dt)

    def signal_at(self, t: float, sig: int) -> None:
        self.procs.at(T0 + t, lambda: self.runner.enqueue_signal(sig))

    def run(self) -> int:
        return self.runner.run()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in read_events(runfiles.RunPaths(self.job.run_dir).events) if name in (None, e["event"])]

    def path(self) -> list[tuple[str | None, str]]:
        return [(e.get("from"), e["to"]) for e in self.events("state")]

    def entered(self, state: str) -> list[float]:
        """Fake times (since T0) at which `state` was entered."""
        return [round(e["ts"] - T0, 3) for e in self.events("state") if e["to"] == state]


S, R, ST, B, W, X, F = "starting", "running", "stopping", "backoff", "waiting", "exited", "fatal"
crash_at_start = Rank(beat_after=None, exit_at=0.5)
finish = Rank(finish_at_step=30)  # 3 s from a fresh start, past any step a test saves at


def attempts(*ranks: Rank) -> Callable[[int], Rank]:
    """Attempt n runs ranks[n-1]; later attempts run the last one."""
    return lambda n: ranks[min(n, len(ranks)) - 1]


# name -> (build the simulation, expected exit code, expected path of transitions)
SCENARIOS: dict[str, tuple[Callable[[Any], Sim], int, list[tuple[str | None, str]]]] = {
    "finish": (lambda p: Sim(p, finish), EXIT_OK, [(None, S), (S, R), (R, X)]),
    "finish before any heartbeat": (
        lambda p: Sim(p, Rank(beat_after=None, exit_at=0.5, exit_kind=ExitKind.FINISHED, exit_code=0)),
        EXIT_OK, [(None, S), (S, X)]),
    "crash at start, then finish": (
        lambda p: Sim(p, attempts(crash_at_start, finish)), EXIT_OK,
        [(None, S), (S, B), (B, S), (S, R), (R, X)]),
    "bad input": (
        lambda p: Sim(p, Rank(beat_after=None, exit_at=0.3, exit_kind=ExitKind.BAD_INPUT, exit_code=2)),
        EXIT_USAGE, [(None, S), (S, F)]),
    "crashes until the budget is spent": (
        lambda p: Sim(p, Rank(exit_at=1.0), restart={"max_restarts": 1}), EXIT_GAVE_UP,
        [(None, S), (S, R), (R, B), (B, S), (S, R), (R, F)]),
    "SIGTERM while running": (lambda p: _with_signal(Sim(p, Rank()), 1.0, signal.SIGTERM), EXIT_SAVED,
                              [(None, S), (S, R), (R, ST), (ST, X)]),
    "SIGTERM while starting": (lambda p: _with_signal(Sim(p, Rank(beat_after=None)), 0.5, signal.SIGTERM),
                               EXIT_SAVED, [(None, S), (S, ST), (ST, X)]),
    "hang, killed, restarted": (
        lambda p: Sim(p, attempts(Rank(hang_at=1.0, on_save="ignore"), finish)), EXIT_OK,
        [(None, S), (S, R), (R, ST), (ST, B), (B, S), (S, R), (R, X)]),
    "never beats, budget spent": (
        lambda p: Sim(p, Rank(beat_after=None), restart={"max_restarts": 0}), EXIT_GAVE_UP,
        [(None, S), (S, ST), (ST, F)]),
    "blocked at start": (lambda p: Sim(p, finish, watchers=[ScriptedWatcher(blocked=((T0, T0 + 2),))]), EXIT_OK,
                         [(None, W), (W, S), (S, R), (R, X)]),
    "watcher stop, blocked, resumed": (
        lambda p: Sim(p, attempts(Rank(), finish), watchers=[ScriptedWatcher(
            blocked=((T0 + 1, T0 + 3),), decisions=((T0 + 1, Action.STOP),))]), EXIT_OK,
        [(None, S), (S, R), (R, ST), (ST, W), (W, S), (S, R), (R, X)]),
    "watcher stop, restart at once": (
        lambda p: Sim(p, attempts(Rank(), finish), watchers=[ScriptedWatcher(decisions=((T0 + 1, Action.STOP),))]),
        EXIT_OK, [(None, S), (S, R), (R, ST), (ST, B), (B, S), (S, R), (R, X)]),
    "crash while a watcher blocks": (
        lambda p: Sim(p, attempts(Rank(exit_at=1.0), finish), watchers=[ScriptedWatcher(
            blocked=((T0 + 0.9, T0 + 2),))]), EXIT_OK, [(None, S), (S, R), (R, W), (W, S), (S, R), (R, X)]),
    "crash at start while a watcher blocks": (
        lambda p: Sim(p, attempts(crash_at_start, finish), watchers=[ScriptedWatcher(
            blocked=((T0 + 0.4, T0 + 2),))]), EXIT_OK, [(None, S), (S, W), (W, S), (S, R), (R, X)]),
    "blocked when the backoff ends": (
        lambda p: Sim(p, attempts(Rank(exit_at=1.0), finish), watchers=[ScriptedWatcher(
            blocked=((T0 + 1.5, T0 + 3),))]), EXIT_OK, [(None, S), (S, R), (R, B), (B, W), (W, S), (S, R), (R, X)]),
    "SIGTERM during the backoff": (
        lambda p: _with_signal(Sim(p, Rank(exit_at=1.0)), 1.5, signal.SIGTERM), 128 + signal.SIGTERM,
        [(None, S), (S, R), (R, B), (B, X)]),
    "SIGTERM while waiting": (
        lambda p: _with_signal(Sim(p, finish, watchers=[ScriptedWatcher(blocked=((T0, T0 + 99),))]), 1.0,
                               signal.SIGTERM), 128 + signal.SIGTERM, [(None, W), (W, X)]),
}


def _with_signal(sim: Sim, t: float, sig: int) -> Sim:
    sim.signal_at(t, sig)
    return sim


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_walks_its_path(tmp_path, name):
    build, code, path = SCENARIOS[name]
    sim = build(tmp_path)
    assert sim.run() == code
    assert sim.path() == path
    assert not sim.procs.descendants()  # nothing of the run outlives it


def test_the_scenarios_cover_every_allowed_transition():
    walked = {step for _, _, path in SCENARIOS.values() for step in path}
    allowed = {(None if old is None else old.value, new.value) for old, news in ALLOWED.items() for new in news}
    assert walked <= allowed  # no scenario expects an illegal step
    assert allowed - walked == set()


ILLEGAL = [(old, new) for old, new in itertools.product([None, *State], list(State)) if new not in ALLOWED[old]]


@pytest.mark.parametrize("old,new", ILLEGAL, ids=[f"{o.value if o else 'init'}->{n.value}" for o, n in ILLEGAL])
def test_illegal_transition_is_refused(tmp_path, old, new):
    sim = Sim(tmp_path, finish)
    r = sim.runner
    r._setup()
    try:
        r.state = old
        with pytest.raises(TransitionError, match="illegal transition"):
            r._transition(new, 0.0, "test")
        assert r.state == old
    finally:
        r.events.close()


def test_stop_escalates_grace_then_sigterm_then_sigkill(tmp_path):
    """A rank that ignores the save request and SIGTERM: SIGUSR1 at the stop, SIGTERM
    grace_s (5) later, SIGKILL kill_after_s (2) after that; no checkpoint: exit 128+15."""
    sim = _with_signal(Sim(tmp_path, Rank(on_save="ignore", on_term="ignore")), 1.0, signal.SIGTERM)
    assert sim.run() == 128 + signal.SIGTERM
    got = [(round(t - T0, 1), s) for t, s in sim.procs.signals_to(0)]
    assert got[0] == (1.0, signal.SIGUSR1)
    assert [s for _, s in got] == [signal.SIGUSR1, signal.SIGTERM, signal.SIGKILL]
    assert got[1][0] == pytest.approx(1.0 + 5.0, abs=TICK)
    assert got[2][0] == pytest.approx(got[1][0] + 2.0, abs=TICK)
    assert [e["signal"] for e in sim.events("escalate")] == ["SIGTERM", "SIGKILL"]


def test_a_rank_that_saves_is_never_escalated(tmp_path):
    sim = _with_signal(Sim(tmp_path, Rank(save_s=4.0)), 1.0, signal.SIGTERM)  # a save within grace_s
    assert sim.run() == EXIT_SAVED
    assert [s for _, s in sim.procs.signals_to(0)] == [signal.SIGUSR1]
    assert sim.events("escalate") == []
    assert sim.entered(X) == [pytest.approx(5.0, abs=TICK)]


def test_second_ctrl_c_kills_at_once(tmp_path):
    sim = Sim(tmp_path, Rank(on_save="ignore"))
    sim.signal_at(1.0, signal.SIGINT)
    sim.signal_at(1.5, signal.SIGINT)
    sim.signal_at(1.2, signal.SIGHUP)  # ignored: only a second Ctrl-C skips the save
    assert sim.run() == 128 + signal.SIGINT
    kinds = [(round(t - T0, 1), s) for t, s in sim.procs.signals_to(0)]
    assert kinds[0] == (1.0, signal.SIGUSR1) and kinds[-1] == (1.5, signal.SIGKILL)
    assert [e["signal"] for e in sim.events("signal_ignored")] == ["SIGHUP"]
    assert len(sim.events("stop_now")) == 1


def test_backoff_grows_and_progress_resets_it(tmp_path):
    """Crashes before any heartbeat (no progress): restarts after 1, 2, 4 s (initial 1 s,
    multiplier 2); the budget (3) spent, it gives up."""
    sim = Sim(tmp_path, crash_at_start, restart={"max_restarts": 3})
    assert sim.run() == EXIT_GAVE_UP
    starts, backoffs = sim.entered(S), sim.entered(B)
    delays = [round(s - b, 1) for b, s in zip(backoffs, starts[1:])]
    assert delays == [1.0, 2.0, 4.0]
    assert [e["delay_s"] for e in sim.events("state") if e["to"] == B] == [1.0, 2.0, 4.0]


def test_hang_is_detected_after_hang_timeout_and_killed_without_grace(tmp_path):
    sim = Sim(tmp_path, attempts(Rank(hang_at=1.0, on_save="ignore"), finish))
    assert sim.run() == EXIT_OK
    last_beat = 0.2 + 0.8  # heartbeats from 0.2 s until the hang at 1.0 s
    (hung,) = sim.events("hung")
    assert hung["ts"] - T0 == pytest.approx(last_beat + 3.0, abs=2 * TICK)  # hang_timeout_s = 3
    (term,) = [t for t, s in sim.procs.signals_to(0) if s == signal.SIGTERM]
    assert 0 < term - hung["ts"] <= 1.5 * TICK  # the next tick: no grace for a hung rank


def test_startup_timeout(tmp_path):
    sim = Sim(tmp_path, Rank(beat_after=None), restart={"max_restarts": 0})
    assert sim.run() == EXIT_GAVE_UP
    assert sim.entered(ST) == [pytest.approx(4.0, abs=TICK)]  # startup_timeout_s = 4
    assert "startup_timeout_s=4" in sim.events("hung")[0]["reason"]


def test_oom_restarts_with_half_the_micro_batch(tmp_path):
    oom = Rank(exit_at=1.0, exit_kind=ExitKind.OOM, report={"micro_batch": 8, "grad_accum": 2})
    sim = Sim(tmp_path, attempts(oom, finish))
    assert sim.run() == EXIT_OK
    first, second = sim.procs.spawned
    assert runfiles.ENV_MICRO_BATCH not in first
    assert (second[runfiles.ENV_MICRO_BATCH], second[runfiles.ENV_GRAD_ACCUM]) == ("4", "4")


def test_oom_at_the_floor_gives_up(tmp_path):
    oom = Rank(beat_after=None, exit_at=0.3, exit_kind=ExitKind.OOM, report={"micro_batch": 1, "grad_accum": 4})
    sim = Sim(tmp_path, oom)
    assert sim.run() == EXIT_GAVE_UP
    assert sim.path() == [(None, S), (S, F)]
    assert len(sim.events("oom_give_up")) == 1


def test_a_watcher_stop_resumes_from_the_saved_step(tmp_path):
    build, _, _ = SCENARIOS["watcher stop, blocked, resumed"]
    sim = build(tmp_path)
    assert sim.run() == EXIT_OK
    saved = sim.events("checkpoint")[0]["step"]
    resumed = [e for e in sim.events("state") if e["to"] == S][-1]
    assert resumed["resume_from"].endswith(f"step-{saved:0{len(resumed['resume_from'].rsplit('-', 1)[1])}d}")
    assert sim.entered(S)[-1] == pytest.approx(3.0, abs=TICK)  # when the block ended


def test_a_pid_in_a_rank_file_that_is_not_of_the_run_is_never_signalled(tmp_path):
    sim = Sim(tmp_path, Rank(on_save="ignore"))

    def plant() -> None:  # a rank file naming a pid this run never started (pid 1)
        runfiles.write_json_atomic(runfiles.RunPaths(sim.job.run_dir).rank_file(7),
                                   {"pid": 1, "rank": 7, "attempt": 1})
    sim.procs.at(T0 + 0.5, plant)
    sim.signal_at(1.0, signal.SIGTERM)
    sim.run()
    assert all(pid != 1 for _, pid, _ in sim.procs.received)
    assert 1 in sim.runner.attempt.refused_pids
