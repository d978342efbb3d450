"""Stops that fit their budget: no stop starts a save that cannot finish in time.

Unit checks of train_core.costs; in-process runs of the toy with a budget
($TRAINSUP_STOP_BUDGET_S, what the supervisor passes) against save costs an earlier attempt
measured (RUN_DIR/costs.json); and, marked slow, the supervisor reporting a short budget at
start and after a re-measurement, and naming the steps a stop without a save lost.
"""

from __future__ import annotations

import json
import re
import signal
import threading
from pathlib import Path

import pytest

from supervisor_helpers import events, finish, start_supervisor, wait_for, write_job
from toy_inprocess import isolated, run, steps  # noqa: F401 - isolated: an autouse fixture
from train_core import costs as costing
from train_core.store import CheckpointStore

TOY = Path(__file__).parent / "scripts" / "toy_train.py"


def test_budget_problem_names_the_need_and_the_fix():
    ok = costing.Costs(save_s=1.0, save_measured="sync", step_s=0.5)
    assert costing.budget_problem(30.0, ok) is None
    short = costing.budget_problem(3.0, costing.Costs(save_s=5.0, save_measured="sync", step_s=0.5))
    assert "a stop has 3.0 s" in short and "one save (5.0 s, sync)" in short and "grace_s" in short
    assert "--signal=B:USR1@" in short
    assert costing.budget_problem(3.0, costing.Costs()) is None  # nothing measured yet: nothing to say
    assert costing.save_fits(10.0, None) and costing.save_fits(10.0, 5.0) and not costing.save_fits(5.0, 5.0)


def test_costs_file_that_is_not_ours_reads_as_unmeasured(tmp_path):
    p = tmp_path / "costs.json"
    for text in ("[1, 2]", "not json", json.dumps({"save_s": "5", "step_s": -1, "save_measured": "x"})):
        p.write_text(text)
        assert costing.load(p) == costing.Costs()
    assert costing.load(tmp_path / "missing.json") == costing.Costs()


def test_a_run_records_what_a_save_and_a_step_cost(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINSUP_BACKGROUND_SAVES", "0")
    assert run(tmp_path, "--save-every", "4", "--eval-every", "0", "--steps", "8", "--save-sleep-s", "0.3")[0] == 0
    c = costing.load(tmp_path / "costs.json")
    assert c.save_measured == "sync" and 0.3 <= c.save_s < 3 and 0.3 <= c.stall_s < 3
    assert c.step_s is not None and c.step_s < 0.3  # saves are left out of a step's time


def _measured(run_dir: Path, save_s: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    costing.store(run_dir / "costs.json", costing.Costs(save_s=save_s, save_measured="sync", step_s=0.01))


def test_a_stop_whose_budget_cannot_hold_a_save_starts_none_and_names_the_steps_lost(tmp_path, monkeypatch):
    # the save of step 4 is timed at 1.5 s; the stop in step 5 has 1 s
    monkeypatch.setenv("TRAINSUP_BACKGROUND_SAVES", "0")
    monkeypatch.setenv("TRAINSUP_STOP_BUDGET_S", "1")
    code, rep = run(tmp_path, "--save-every", "4", "--eval-every", "0", "--save-sleep-s", "1.5", "--signal-at", "15")
    assert code == 75 and rep["kind"] == "saved"
    assert rep["step"] == 5 and rep["lost_steps"] == 1 and rep["checkpoint"].endswith("step-00000004")
    assert re.search(r"not saved: .* a save takes about (1\.[5-9]|[2-9]\.\d) s", rep["detail"]), rep["detail"]
    assert steps(tmp_path) == [4]  # no save was started: no tmp dir either
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_stop_whose_budget_holds_the_save_saves(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINSUP_BACKGROUND_SAVES", "0")
    monkeypatch.setenv("TRAINSUP_STOP_BUDGET_S", "3")
    code, rep = run(tmp_path, "--save-every", "4", "--eval-every", "0", "--save-sleep-s", "0.3", "--signal-at", "15")
    assert code == 75 and rep["step"] == 5 and rep.get("lost_steps") is None
    assert steps(tmp_path) == [4, 5]


def test_a_short_budget_keeps_the_staged_save_in_flight_and_starts_no_other(tmp_path, monkeypatch):
    # step 4's state is in memory and being written (2 s) when the stop comes at step 5; once it
    # is in, a new save (as long as that one took, this attempt's own figure) does not fit the 1 s
    # left of the 3 s budget: the one in flight is finished, no other started
    monkeypatch.setenv("TRAINSUP_STOP_BUDGET_S", "3")
    code, rep = run(tmp_path, "--save-every", "4", "--eval-every", "0", "--write-sleep-s", "2", "--signal-at", "15")
    assert code == 75 and rep["step"] == 5 and rep["lost_steps"] == 1
    assert rep["checkpoint"].endswith("step-00000004")
    assert steps(tmp_path) == [4]


def test_a_background_save_that_cannot_finish_in_the_budget_is_abandoned(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINSUP_STOP_BUDGET_S", "1")
    _measured(tmp_path, 5.0)
    code, rep = run(tmp_path, "--save-every", "4", "--eval-every", "0", "--write-sleep-s", "3", "--signal-at", "15")
    assert code == 75 and rep["step"] == 5 and rep["lost_steps"] == 5 and rep["checkpoint"] is None
    assert "could not finish within the stop's 1.0 s" in rep["detail"]
    # the abandoned writer, done sleeping, commits nothing late (the report said "lost")
    for t in threading.enumerate():
        if t.name.startswith("trainsup-save"):
            t.join(10)
    assert steps(tmp_path) == [] and not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_supervisor_reports_a_short_budget_at_start_and_names_the_steps_a_stop_lost(tmp_path, cleanup):
    dirs, procs = cleanup
    run_dir = tmp_path / "run"
    dirs.append(run_dir)
    # synchronous saves of 5 s against a 3 s stop budget
    job = write_job(tmp_path, ["--steps", "400", "--save-every", "4", "--eval-every", "0", "--sleep-s", "0.02",
                                          "--save-sleep-s", "5"], script=TOY, run_dir=run_dir,
                    checkpoint={"background": False}, stop={"grace_s": 3.0})
    sup = start_supervisor(job)
    procs.append(sup)
    short = wait_for(lambda: events(run_dir, "stop_budget_short"), 90, "the short budget reported")
    assert short[0]["budget_s"] == 3.0 and short[0]["save_s"] >= 5.0 and "give it at least" in short[0]["message"]
    wait_for(lambda: steps(run_dir) and (run_dir / "status.json").exists(), 60, "a checkpoint")
    sup.send_signal(signal.SIGTERM)
    assert finish(sup) == 75
    unsaved = events(run_dir, "stop_unsaved")
    assert len(unsaved) == 1 and unsaved[0]["lost_steps"] >= 1 and "not saved" in unsaved[0]["reason"]
    newest = CheckpointStore(run_dir / "checkpoints").latest_valid()
    assert unsaved[0]["step"] - unsaved[0]["lost_steps"] == newest.step
    # the next run knows the cost before its first save: reported at start
    sup = start_supervisor(job)
    procs.append(sup)

    def second_run() -> list[str]:
        second = events(run_dir)[[e["event"] for e in events(run_dir)].index("supervisor_exit"):]
        return [e["event"] for e in second if e["event"] == "stop_budget_short" or e.get("to") == "starting"]

    order = wait_for(lambda: len(second_run()) >= 2 and second_run(), 30, "the second run's first attempt")
    assert order[:2] == ["stop_budget_short", "state"], order  # reported before the first attempt starts
    sup.send_signal(signal.SIGKILL)
    sup.wait()
