"""interval_steps = "auto": the checkpoint interval from the save cost and the failure history.

The formula (train_core/interval.py) on its own; the ranks' choice in-process with a failure
history given as the supervisor gives it; and, marked slow, the supervisor keeping the history
across attempts and reporting every choice as an event while crashes pull the interval down.
"""

from __future__ import annotations

import json
import math
import time

import pytest

from supervisor_helpers import events, finish, start_supervisor, write_job
from toy_inprocess import TOY, isolated, run, steps  # noqa: F401 - isolated: an autouse fixture
from train_core import costs as costing
from train_core import interval


def test_daly_is_young_for_a_cheap_save_and_the_mtbf_for_an_expensive_one():
    c, m = 0.5, 3600.0
    young = math.sqrt(2 * c * m)
    assert young * 0.99 < interval.optimal_interval_s(c, m) < young * 1.01
    assert interval.optimal_interval_s(10.0, 4.0) == 4.0  # C >= 2M: save every M
    assert interval.optimal_interval_s(1.0, 0.0) == 0.0


def test_the_prior_is_a_tenth_of_a_failure_and_the_runs_own_failures_outweigh_it():
    assert interval.mtbf_s(3600, 0, 0) == pytest.approx(3600)
    assert interval.mtbf_s(3600, 1800, 0) == pytest.approx(21600)  # surviving makes the prior count less
    assert interval.mtbf_s(3600, 60, 1) == pytest.approx(420 / 1.1)  # one kill in a minute: M near 6 min
    assert interval.mtbf_s(3600, 300, 5) == pytest.approx(660 / 5.1)  # five in five: near 2 min


def test_choice_in_steps_keeps_floor_and_ceiling():
    kw = dict(c_s=0.5, prior_s=3600, uptime_s=0, failures=0)
    assert interval.choose(**kw, step_s=0.1, min_steps=1, max_s=1800).steps == 597  # Daly: 59.7 s (Young: 60)
    assert interval.choose(**kw, step_s=0.1, min_steps=1, max_s=30).steps == 300  # ceiling: 30 s of work
    assert interval.choose(**kw, step_s=100, min_steps=2, max_s=1800).steps == 2  # floor
    assert not interval.worth_changing(100, 115) and interval.worth_changing(100, 125)


def _auto(monkeypatch, failures: int, mtbf: float = 60.0) -> None:
    monkeypatch.setenv("TRAINSUP_CHECKPOINT_INTERVAL_STEPS", "auto")
    monkeypatch.setenv("TRAINSUP_AUTO_INTERVAL", json.dumps(
        {"expected_mtbf_s": mtbf, "min_steps": 1, "max_s": 1800, "failures": failures, "uptime_s": 60.0}))
    monkeypatch.setenv("TRAINSUP_BACKGROUND_SAVES", "0")


@pytest.mark.slow  # two 100-step runs with timed saves (~8 s)
def test_ranks_choose_from_the_measured_cost_and_save_first_to_measure_it(tmp_path, monkeypatch):
    # each save takes 0.05 s; a step ~0.03 s: T = sqrt(2 * 0.05 * M)
    args = ("--steps", "100", "--eval-every", "0", "--sleep-s", "0.01", "--save-sleep-s", "0.05")
    _auto(monkeypatch, failures=0)
    assert run(tmp_path / "calm", *args)[0] == 0
    calm = costing.load(tmp_path / "calm" / "costs.json")
    assert steps(tmp_path / "calm")[0] == 1  # the first save comes at once: it measures C
    assert calm.cost_s >= 0.05 and calm.mtbf_s > 600  # (0.1 * 60 + 60 + this attempt) / 0.1
    t = interval.optimal_interval_s(calm.cost_s, calm.mtbf_s)
    assert calm.optimum_s == pytest.approx(t, rel=0.1) and calm.interval_steps == pytest.approx(t / calm.step_s, rel=0.2)
    _auto(monkeypatch, failures=20)
    assert run(tmp_path / "failing", *args)[0] == 0
    failing = costing.load(tmp_path / "failing" / "costs.json")
    assert failing.mtbf_s < calm.mtbf_s / 10 and failing.interval_steps < calm.interval_steps / 2
    # saves follow the chosen interval: more of them when failures are frequent
    assert len(steps(tmp_path / "failing")) > len(steps(tmp_path / "calm"))


@pytest.mark.slow
def test_supervisor_keeps_the_failure_history_and_each_choice_is_an_event(tmp_path, cleanup):
    dirs, procs = cleanup
    run_dir = tmp_path / "run"
    dirs.append(run_dir)
    # every attempt crashes at its 90th micro-batch (30 steps in); saves take 0.2 s
    job = write_job(tmp_path, ["--steps", "150", "--eval-every", "0", "--sleep-s", "0.01", "--save-sleep-s", "0.2",
                               "--crash-at", "90"], script=TOY, run_dir=run_dir,
                    checkpoint={"interval_steps": "auto", "expected_mtbf_s": 30.0, "background": False},
                    restart={"max_restarts": 3, "no_progress_limit": 10})
    sup = start_supervisor(job)
    procs.append(sup)
    finish(sup, timeout=240)
    history = json.loads((run_dir / "failures.json").read_text())
    crashes = [e for e in events(run_dir, "attempt_exit") if e["kind"] == "error"]
    assert history["failures"] == len(crashes) >= 3 and history["open_since"] is None
    chosen = events(run_dir, "checkpoint_interval")
    assert chosen[0]["interval_steps"] == 1 and chosen[0].get("cost_s") is None  # before C is measured
    measured = [e for e in chosen if e.get("mtbf_s") is not None]
    assert all(e["cost_s"] >= 0.2 and e["step_s"] > 0 for e in measured)
    # M falls as the crashes come, and the interval with it
    assert measured[-1]["mtbf_s"] < measured[0]["mtbf_s"] / 2
    assert measured[-1]["interval_steps"] < measured[0]["interval_steps"]


def test_an_unbounded_mtbf_chooses_the_ceiling_and_never_raises():
    kw = dict(c_s=0.5, prior_s=3600, failures=0, step_s=0.1, min_steps=1, max_s=30)
    assert interval.choose(**kw, uptime_s=1e308 * 10).steps == 300  # inf uptime: as rarely as allowed


def test_a_hostile_failure_history_stays_finite(tmp_path):
    from supervisor.runner import history
    from train_core.runfiles import RunPaths

    paths = RunPaths(tmp_path)
    (tmp_path / "failures.json").write_text(json.dumps({"failures": 1, "uptime_s": 10.0, "open_since": 100.0}))
    for beat in ("true", "1e999", "-5", '"soon"', "1e300"):
        (tmp_path / "status.json").write_text('{"updated_at": %s}' % beat)
        h = history.recover(paths)
        # counted as a failure; the open attempt's uptime is finite and ends no later than now
        assert h.failures == 2 and 10.0 <= h.uptime_s <= 10.0 + (time.time() - 100.0) and h.open_since is None
        (tmp_path / "failures.json").write_text(json.dumps({"failures": 1, "uptime_s": 10.0, "open_since": 100.0}))


def test_auto_settings_out_of_range_are_refused(monkeypatch):
    from train_core import settings
    from train_core.errors import SessionError

    monkeypatch.setenv("TRAINSUP_CHECKPOINT_INTERVAL_STEPS", "auto")
    for bad in ({"expected_mtbf_s": "nan"}, {"min_steps": 0}, {"uptime_s": -1}, {"max_s": "inf"}):
        monkeypatch.setenv("TRAINSUP_AUTO_INTERVAL", json.dumps(bad))
        with pytest.raises(SessionError, match=next(iter(bad))):
            settings.save_interval(0)
    monkeypatch.setenv("TRAINSUP_AUTO_INTERVAL", json.dumps({"failures": 2}))
    assert settings.save_interval(0)[1].failures == 2


def _pacer(tmp_path):
    from train_core.pacing import Pacer
    from train_core.runfiles import RunPaths

    return Pacer(RunPaths(tmp_path), is_main=True, fixed_steps=1, auto=None, budget_s=None, agree=lambda v: v)


def test_a_pause_is_not_a_step_and_a_writer_costs_at_most_its_own_time(tmp_path):
    p = _pacer(tmp_path)
    for _ in range(3):
        p.stepped(writing=False)
        time.sleep(0.01)
    p.stepped(writing=False)
    step = p.costs.step_s
    p.paused()
    time.sleep(0.3)  # paused: not a step
    p.stepped(writing=False)
    assert p.costs.step_s == step
    p.started(5, 0.002)
    time.sleep(0.3)  # an eval while the writer writes: a long step, but no drag beyond the writer's 0.05 s
    p.stepped(writing=True)
    p.saved_background(0.002, 0.05)
    assert p.costs.cost_s <= 0.002 + 0.05 + 1e-9


def test_an_earlier_attempts_synchronous_save_time_gives_way_to_this_ones(tmp_path):
    costing.store(tmp_path / "costs.json", costing.Costs(save_s=100.0, save_measured="sync"))
    p = _pacer(tmp_path)
    p.saved_background(0.01, 0.5)  # this attempt has timed no synchronous save: its own figure counts
    assert p.costs.save_s == pytest.approx(0.51) and p.costs.save_measured == "background"
    p.saved_sync(0.2, 0.2)
    p.saved_background(0.01, 0.5)  # now a synchronous figure of this attempt stays
    assert p.costs.save_s == 0.2 and p.costs.save_measured == "sync"
