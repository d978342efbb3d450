"""`trainsup run` end to end: real `accelerate launch` children, real signals, real files.

The rank is tests/scripts/sup_fake_rank.py (torch-free, honours contract.md), so each
launch costs ~1.5 s of launcher start-up, not a torch import.
"""

from __future__ import annotations

import os
from pathlib import Path
import signal
import time

import pytest

from supervisor_helpers import (
    finish,
    events,
    final_weights,
    heartbeat_step,
    read_json,
    run_cli,
    run_processes,
    start_supervisor,
    wait_for,
    write_job,
)
from train_core.store import CheckpointStore

pytestmark = pytest.mark.slow




def uninterrupted(tmp_path, args, **sections):
    """Final weights of the same job run without interruption (the fake rank, no launcher)."""
    d = tmp_path / "ref"
    d.mkdir()
    job = write_job(d, args, run_dir=d / "run", launch={"launcher": "python", "cpu": True}, **sections)
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stdout + r.stderr
    return final_weights(d / "run")


@pytest.mark.parametrize("nproc, direct", [(1, True), (1, False), (2, True)], ids=["1-direct", "1-launcher", "2"])
def test_sigterm_saves_exits_75_and_resumes(tmp_path, cleanup, nproc, direct):
    """One rank is started directly by default; `direct = false` (and 2 ranks) go through
    `accelerate launch`: the same stop, save and exact resume either way."""
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    args = ["--steps", "90", "--step-time", "0.03"]
    job = write_job(tmp_path, args, launch={"num_processes": nproc, "direct": direct})
    sup = start_supervisor(job, log=tmp_path / "sup1.log")
    cleanup[1].append(sup)
    wait_for(lambda: heartbeat_step(run_dir) >= 15, 30, "step 15")
    if nproc == 1:
        # A second supervisor on the same run dir: exit 4 naming the holder's pid.
        r = run_cli("run", str(job))
        assert r.returncode == 4, r.stderr
        assert f"locked by another supervisor (pid {sup.pid})" in r.stderr
    os.kill(sup.pid, signal.SIGTERM)
    assert finish(sup) == 75, (tmp_path / "sup1.log").read_text()
    assert run_processes(run_dir) == []
    latest = CheckpointStore(run_dir / "checkpoints").latest_valid(full=True)
    assert latest is not None and latest.reason == "preempt" and 15 < latest.step < 90
    exits = [read_json(run_dir / "ranks" / f"exit-{r}.json") for r in range(nproc)]
    assert [e["kind"] for e in exits] == ["saved"] * nproc
    assert events(run_dir, "stop_requested")[0]["signal"] == "SIGTERM"
    assert events(run_dir, "attempt_exit")[-1]["kind"] == "saved"
    assert events(run_dir, "supervisor_exit")[-1]["exit_code"] == 75

    sup2 = start_supervisor(job, log=tmp_path / "sup2.log")
    cleanup[1].append(sup2)
    assert finish(sup2) == 0, (tmp_path / "sup2.log").read_text()
    start = [e for e in events(run_dir, "state") if e["to"] == "starting"][-1]
    assert start["resume_from"] == str(latest.path) and start["attempt"] == 2  # numbering goes on
    assert ("accelerate.commands.launch" in start["argv"]) == (not direct or nproc > 1)
    assert start["log"].endswith("attempt-2.log")
    assert f"resumed from step {latest.step}" in Path(start["log"]).read_text()
    assert final_weights(run_dir) == uninterrupted(tmp_path, args)
    assert run_processes(run_dir) == []
    if nproc == 2:
        assert "[rank1]:" in (tmp_path / "sup2.log").read_text()
    else:
        assert "[rank0]:rank 0: finished at step 90" in (tmp_path / "sup2.log").read_text()


def test_script_ignoring_the_request_is_escalated(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    # the next interval save (step 100) is ~1.4 s after the signal: none lands while the request travels
    job = write_job(tmp_path, ["--steps", "400", "--step-time", "0.03", "--save-every", "50", "--ignore-stop",
                               "--heartbeat-s", "0.05"], stop={"grace_s": 1.5, "kill_after_s": 1.0})
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)
    wait_for(lambda: heartbeat_step(run_dir) >= 52, 30, "step 52")
    before = CheckpointStore(run_dir / "checkpoints").latest_valid()
    t0 = time.monotonic()
    os.kill(sup.pid, signal.SIGTERM)
    code = finish(sup)
    elapsed = time.monotonic() - t0
    assert code == 128 + signal.SIGTERM  # no checkpoint was committed on the way
    assert 2.0 <= elapsed < 15, elapsed  # grace 1.5 s + kill_after 1 s
    assert [e["signal"] for e in events(run_dir, "escalate")] == ["SIGTERM", "SIGKILL"]
    assert events(run_dir, "attempt_exit")[-1]["kind"] == "killed"
    assert run_processes(run_dir) == []
    store = CheckpointStore(run_dir / "checkpoints")
    assert all(c.valid for c in store.scan(full=True))
    assert store.latest_valid().step == before.step == 50


def test_crashing_script_backs_off_then_gives_up(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    job = write_job(tmp_path, ["--steps", "50", "--crash-at", "3"],
                    restart={"max_restarts": 2, "backoff_initial_s": 0.5, "backoff_multiplier": 3.0,
                             "no_progress_limit": 0})
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)
    assert finish(sup, 90) == 3
    backoffs = [e for e in events(run_dir, "state") if e["to"] == "backoff"]
    assert [b["delay_s"] for b in backoffs] == [0.5, 1.5]
    starts = [e["ts"] for e in events(run_dir, "state") if e["to"] == "starting"]
    assert len(starts) == 3
    exits = events(run_dir, "attempt_exit")
    assert [e["kind"] for e in exits] == ["error"] * 3
    assert exits[0]["detail"] == "rank 0 failed: RuntimeError: simulated crash at step 3"
    out = (tmp_path / "sup.log").read_text()
    assert "gave up: restart budget spent: 2 restart(s) of max_restarts=2; last attempt: error: rank 0 failed" in out
    assert run_processes(run_dir) == []


@pytest.mark.parametrize("standby", [True, False])
def test_restart_after_a_crash_runs_in_the_standby_and_stays_exact(tmp_path, cleanup, standby):
    """A crash restarts inside the run in the standby rank (torch imported while attempt 1
    trained), with the attempt's own environment; the result is the uninterrupted run's."""
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    args = ["--steps", "60", "--step-time", "0.05", "--save-every", "10"]
    job = write_job(tmp_path, [*args, "--crash-at", "35", "--fault-attempts", "1"],
                    restart={"backoff_initial_s": 0.2, "standby": standby})
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)
    assert finish(sup, 120) == 0, (tmp_path / "sup.log").read_text()
    starts = [e for e in events(run_dir, "state") if e["to"] == "starting"]
    assert [s["standby"] for s in starts] == [False, standby]
    assert [e["kind"] for e in events(run_dir, "attempt_exit")] == ["error", "finished"]
    standby_log = run_dir / "logs" / "standby.log"
    assert (standby_log.exists() and "ready" in standby_log.read_text()) == standby
    assert "resumed from step 30" in (run_dir / "logs" / "attempt-2.log").read_text()
    assert final_weights(run_dir) == uninterrupted(tmp_path, args)
    assert run_processes(run_dir) == []  # no standby left behind


def test_no_progress_gives_up(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    job = write_job(tmp_path, ["--steps", "50", "--crash-at", "2"], launch={"launcher": "python"},
                    restart={"max_restarts": 10, "backoff_initial_s": 0.1, "no_progress_limit": 2})
    r = run_cli("run", str(job))
    assert r.returncode == 3
    assert "gave up: no progress in 2 attempt(s) in a row (no_progress_limit=2, best step 2)" in r.stdout


def test_hang_detected_killed_and_restarted(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    job = write_job(tmp_path, ["--steps", "30", "--step-time", "0.02", "--save-every", "10", "--hang-at", "15",
                               "--fault-attempts", "1"],
                    watch={"hang_timeout_s": 1.5}, stop={"kill_after_s": 1.0})
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)
    assert finish(sup, 90) == 0, (tmp_path / "sup.log").read_text()
    hung = events(run_dir, "hung")
    assert len(hung) == 1 and 10 <= hung[0]["step"] <= 15
    exits = events(run_dir, "attempt_exit")
    assert [e["kind"] for e in exits] == ["hung", "finished"]
    start2 = [e for e in events(run_dir, "state") if e["to"] == "starting"][1]
    assert start2["resume_from"].endswith("step-00000010")
    assert run_processes(run_dir) == []


def test_rank_sigkilled_mid_save_restarts_from_previous_checkpoint(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    args = ["--steps", "30", "--step-time", "0.02", "--save-every", "10"]
    job = write_job(tmp_path, args + ["--slow-save-at", "20", "--fault-attempts", "1"])
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)
    ckpts = run_dir / "checkpoints"
    tmp = wait_for(lambda: [p for p in ckpts.glob(".tmp-step-00000020-*") if (p / "optimizer.bin").exists()],
                   30, "the save of step 20 to be under way")
    rank_pid = read_json(run_dir / "ranks" / "rank-0.json")["pid"]
    os.kill(rank_pid, signal.SIGKILL)
    assert finish(sup, 60) == 0, (tmp_path / "sup.log").read_text()
    exits = events(run_dir, "attempt_exit")
    assert exits[0]["kind"] in ("killed", "error") and exits[1]["kind"] == "finished"
    start2 = [e for e in events(run_dir, "state") if e["to"] == "starting"][1]
    assert start2["resume_from"].endswith("step-00000010")
    assert not tmp[0].exists()  # the torn save was cleaned up
    assert final_weights(run_dir) == uninterrupted(tmp_path, args)


@pytest.mark.parametrize("nproc", [1, 2])
def test_supervisor_sigkilled_leaves_no_rank_training(tmp_path, cleanup, nproc):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    job = write_job(tmp_path, ["--steps", "2000", "--step-time", "0.02"], launch={"num_processes": nproc})
    sup = start_supervisor(job)
    cleanup[1].append(sup)
    wait_for(lambda: heartbeat_step(run_dir) >= 10, 30, "step 10")
    assert len(run_processes(run_dir)) >= nproc + (nproc > 1)  # the ranks (+ the launcher of 2)
    os.kill(sup.pid, signal.SIGKILL)
    sup.wait()
    wait_for(lambda: run_processes(run_dir) == [], 20, "every process of the run to exit")
    # the ranks noticed the supervisor was gone and saved on their way out
    latest = CheckpointStore(run_dir / "checkpoints").latest_valid(full=True)
    assert latest is not None and latest.reason == "preempt" and latest.step >= 10


TOY = Path(__file__).resolve().parent / "scripts" / "toy_train.py"


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "train_core" / "session.py").exists(),
                    reason="train_core/session.py not written yet")
@pytest.mark.parametrize("nproc", [1, 2])
def test_preempted_toy_run_equals_uninterrupted_bitwise(tmp_path, cleanup, nproc):
    """Real torch + TrainSession ranks: SIGTERM mid-epoch, exit 75, resume, same final state hash."""
    args = ["--steps", "24", "--sleep-s", "0.04", "--save-every", "0"]
    sections = {"launch": {"num_processes": nproc}}
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    job = write_job(tmp_path, args, script=TOY, **sections)
    sup = start_supervisor(job, log=tmp_path / "sup1.log")
    cleanup[1].append(sup)
    wait_for(lambda: heartbeat_step(run_dir) >= 7, 60, "step 7")
    os.kill(sup.pid, signal.SIGTERM)
    assert finish(sup, 90) == 75, (tmp_path / "sup1.log").read_text()
    assert run_processes(run_dir) == []
    latest = CheckpointStore(run_dir / "checkpoints").latest_valid(full=True)
    assert latest is not None and 7 <= latest.step < 24
    sup2 = start_supervisor(job, log=tmp_path / "sup2.log")
    cleanup[1].append(sup2)
    assert finish(sup2, 90) == 0, (tmp_path / "sup2.log").read_text()
    assert [e.get("resume_from") for e in events(run_dir, "state") if e["to"] == "starting"][-1] == str(latest.path)

    ref = tmp_path / "ref"
    ref.mkdir()
    ref_job = write_job(ref, args, script=TOY, run_dir=ref / "run", **sections)
    r = run_cli("run", str(ref_job), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    got = read_json(run_dir / "final_hash.json")
    want = read_json(ref / "run" / "final_hash.json")
    assert got["step"] == want["step"] == 24
    assert got["hash"] == want["hash"]
