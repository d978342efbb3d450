"""SLURM: the launch settings read from an allocation's environment, the requeue rule, the sbatch
script, and (slow) a real one-host Slurm (.ci/slurm-up.sh): a job submitted with the printed
script gets Slurm's warning signal before its (2-minute) time limit, saves, requeues itself, resumes and
ends COMPLETED with the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from supervisor import slurm
from supervisor.cli import main
from supervisor.config import JobConfigError, load_job
from supervisor_helpers import (
    events, finish, kill_run, missing, read_json, start_supervisor, wait_for, write_job,
)
from toy_inprocess import isolated, run  # noqa: F401 - isolated: an autouse fixture
from train_core import costs as costing
from train_core.contract import EXIT_SAVED
from train_core.store import CheckpointStore

TOY = Path(__file__).parent / "scripts" / "toy_train.py"


def alloc_env(nnodes: int, node_id: int, job_id: str = "4242", nodelist: str = "gpu[07-08]") -> dict[str, str]:
    return {"SLURM_JOB_ID": job_id, "SLURM_NNODES": str(nnodes), "SLURM_NODEID": str(node_id),
            "SLURM_JOB_NODELIST": nodelist}


def test_outside_slurm_or_on_one_node_the_job_is_unchanged(tmp_path):
    job = load_job(write_job(tmp_path, []))
    assert slurm.apply(job, {}) is job
    assert slurm.apply(job, alloc_env(1, 0)) is job


def test_two_nodes_get_their_launch_settings_from_the_allocation(tmp_path):
    job = load_job(write_job(tmp_path, [], launch={"num_processes": 2}))
    a, b = (slurm.apply(job, alloc_env(2, m)).launch for m in (0, 1))
    assert (a.num_machines, a.machine_rank, b.machine_rank) == (2, 0, 1)
    assert a.main_process_ip == b.main_process_ip == "gpu07"  # the first host, the same on every node
    assert a.main_process_port == b.main_process_port == 20000 + 4242
    assert a.num_processes == 2  # the ranks of both nodes, as accelerate counts them
    mine = load_job(write_job(tmp_path, [], launch={"num_processes": 2, "main_process_port": 31000,
                                                    "main_process_ip": "head"}))
    assert (slurm.apply(mine, alloc_env(2, 1)).launch.main_process_port,
            slurm.apply(mine, alloc_env(2, 1)).launch.main_process_ip) == (31000, "head")  # the job's own win


def test_the_first_host_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert slurm.first_host("gpu[03-05,07],cpu1") == "gpu03"
    assert slurm.first_host("node7,node9") == "node7"


@pytest.mark.parametrize("launch, nnodes, message", [
    ({"num_machines": 4, "num_processes": 4, "main_process_ip": "h", "main_process_port": 1}, 2,
     "[launch] num_machines = 4 but the Slurm allocation has 2 nodes (SLURM_NNODES)"),
    ({"num_processes": 3}, 2, "[launch] num_processes = 3 counts the ranks of all 2 nodes"),
])
def test_an_allocation_that_does_not_fit_the_job_is_refused(tmp_path, launch, nnodes, message):
    with pytest.raises(JobConfigError, match=re.escape(message)):
        slurm.apply(load_job(write_job(tmp_path, [], launch=launch)), alloc_env(nnodes, 0))


@pytest.mark.parametrize("requeue, code, sig, node, env, expected", [
    (True, EXIT_SAVED, signal.SIGUSR1, 0, True, True),
    (False, EXIT_SAVED, signal.SIGUSR1, 0, True, False),  # [slurm] requeue off
    (True, 0, None, 0, True, False),  # finished
    (True, EXIT_SAVED, signal.SIGTERM, 0, True, False),  # scancel or the limit itself: maybe a person's cancel
    (True, EXIT_SAVED, signal.SIGUSR1, 1, True, False),  # only machine rank 0 requeues the job
    (True, EXIT_SAVED, signal.SIGUSR1, 0, False, False),  # not under Slurm
])
def test_when_a_job_requeues_itself(tmp_path, requeue, code, sig, node, env, expected):
    job = load_job(write_job(tmp_path, [], slurm={"requeue": requeue}))
    assert slurm.should_requeue(job, alloc_env(2, node) if env else {}, exit_code=code, stop_signal=sig) is expected


def test_the_warning_lead_comes_from_the_recorded_save_time(tmp_path):
    def lead(recorded: str | None) -> int:
        path = tmp_path / "costs.json"
        path.unlink(missing_ok=True)
        if recorded is not None:
            path.write_text(recorded)
        return slurm.signal_lead_s(costing.load(path))

    assert lead(None) == 60 + 30
    assert lead('{"save_s": 4.0, "step_s": 0.5}') == 60 + 17  # 1.5 x 4 + 0.5 + 10 s to exit
    assert lead('{"save_s": "x"}') == 90
    assert lead('{"save_s": Infinity}') == 90  # json reads it as a float; it is no save time


class FakeLimit:
    """TimeLimitWatch's outside world: Slurm's answers for the end time, a clock, the signal sent."""

    def __init__(self, *ends: float | None, now: float = 1000.0) -> None:
        self.ends, self.now, self.sent = list(ends), now, threading.Event()

    def query(self, job_id: str) -> float | None:
        return self.ends.pop(0) if len(self.ends) > 1 else self.ends[0]

    def watch(self, tmp_path: Path, *, stopping=lambda: False,
              costs=costing.Costs()) -> slurm.TimeLimitWatch:
        w = slurm.TimeLimitWatch("77", lambda: costs, stopping=stopping, events=tmp_path / "events.jsonl",
                                 query=self.query, wall_clock=lambda: self.now, send=self.sent.set)
        w.start()
        return w


def test_the_supervisor_sends_itself_the_warning_at_the_limit_minus_a_stops_cost(tmp_path):
    # a recorded save of 10 s and a step of 1 s: the stop costs 1.5 * 10 + 1 + 10 = 26 s
    limit = FakeLimit(1000.0 + 26)
    w = limit.watch(tmp_path, costs=costing.Costs(save_s=10.0, step_s=1.0))
    assert limit.sent.wait(5)
    w.cancel()
    [record] = events(tmp_path)
    assert record["event"] == "slurm_time_limit" and record["lead_s"] == 26 and record["seconds_left"] == 26


def test_no_warning_of_its_own_before_that_moment_or_once_a_stop_began(tmp_path):
    early = FakeLimit(1000.0 + 27)  # 1 s before the moment: it waits
    w = early.watch(tmp_path, costs=costing.Costs(save_s=10.0, step_s=1.0))
    assert not early.sent.wait(0.5)
    w.cancel()
    stopping = FakeLimit(1000.0 + 5)  # past the moment, but Slurm's warning (or a scancel) came first
    w = stopping.watch(tmp_path, stopping=lambda: True)
    w._thread.join(5)  # it ends by itself
    assert not w._thread.is_alive() and not stopping.sent.is_set() and events(tmp_path) == []


def test_an_extended_limit_moves_the_warning(tmp_path):
    # the moment came (no costs: 30 s before the end), but `scontrol update TimeLimit=` moved the end
    limit = FakeLimit(1000.0 + 20, 1000.0 + 3600)
    w = limit.watch(tmp_path)
    assert not limit.sent.wait(0.5)
    w.cancel()
    assert limit.ends == [1000.0 + 3600] and events(tmp_path) == []


def test_a_job_without_a_time_limit_gets_no_warning_of_its_own(tmp_path):
    limit = FakeLimit(None, now=1e12)
    w = limit.watch(tmp_path)
    w._thread.join(5)
    assert not w._thread.is_alive() and not limit.sent.is_set()


def test_slurm_script_prints_an_sbatch_script(tmp_path):
    job = write_job(tmp_path, ["--steps", "5"], script=TOY)
    r = CliRunner().invoke(main, ["slurm", "script", str(job), "--nodes", "2", "--time", "30", "--set",
                                  "stop.grace_s=40"])
    assert r.exit_code == 0, r.output
    text = r.output
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=30", "#SBATCH --signal=USR1@90",
                 "#SBATCH --requeue"):
        assert line in text
    assert re.search(r"srun .*trainsup run \S+job\.toml --set stop\.grace_s=40 --set slurm\.requeue=true", text)
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "costs.json").write_text(json.dumps({"save_s": 2.0, "step_s": 1.0}))
    r = CliRunner().invoke(main, ["slurm", "script", str(job)])
    assert "#SBATCH --signal=USR1@74 " in r.output and "from the save time in" in r.output
    r = CliRunner().invoke(main, ["slurm", "script", str(job), "--time", "1"])
    assert r.exit_code == 2 and "is not longer than the warning's lead (74 s)" in r.output


# --------------------------------------------------------------------------- a real Slurm

def scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


@pytest.fixture
def cluster():
    if shutil.which("sbatch") is None or subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        missing("no Slurm cluster answers here (.ci/slurm-up.sh starts a one-host one)")


TOY_ARGS = ["--steps", "300", "--eval-every", "0", "--save-every", "0", "--dataset-size", "256"]


def submit(tmp_path: Path, costs: dict, sleep_s: float, edit=lambda script: script, **sections):
    """sbatch the toy (TOY_ARGS, `sleep_s` a micro-batch) under the script `trainsup slurm script
    --time 2` prints, `edit`ed, into a run dir whose costs.json records `costs`. The job id, and
    what a failure needs to be understood: the job's output, the events and the ranks' logs."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "costs.json").write_text(json.dumps(costs))
    job = write_job(tmp_path, [*TOY_ARGS, "--sleep-s", str(sleep_s)], script=TOY, run_dir=tmp_path / "run",
                    watch={"poll_interval_s": 0.2}, **sections)
    r = CliRunner().invoke(main, ["slurm", "script", str(job), "--time", "2"])
    assert r.exit_code == 0, r.output
    (tmp_path / "job.sbatch").write_text(edit(r.output))
    out = subprocess.run(["sbatch", "--parsable", "--chdir", str(tmp_path), str(tmp_path / "job.sbatch")],
                         capture_output=True, text=True, check=True).stdout
    job_id = out.strip().split(";")[0]

    def tail() -> str:
        out_file = tmp_path / f"slurm-{job_id}.out"
        text = out_file.read_text()[-4000:] if out_file.exists() else "(no job output)"
        ev = tmp_path / "run" / "events.jsonl"
        logs = sorted((tmp_path / "run" / "logs").glob("attempt-*.log"))
        return (text + "\n--- events\n" + (ev.read_text()[-4000:] if ev.exists() else "(none)")
                + "".join(f"\n--- {p.name}\n" + p.read_text()[-2000:] for p in logs))

    return job_id, tail


def follow(job_id: str, tail, *, until_requeued: bool = False) -> None:
    """Until the job is requeued after its first slot (`until_requeued`), or else until it is
    COMPLETED, its requeued second slot released as soon as the node is free, with time to finish."""
    deadline = time.monotonic() + 420
    released, refused = False, ""
    while True:
        info = scontrol_job(job_id)
        state = info.get("JobState")
        if state == "COMPLETED":
            break
        seen = f"JobState={state} Reason={info.get('Reason')} Restarts={info.get('Restarts')} {refused}"
        # SIGNALING: a running job while slurmctld delivers its --signal warning (seen for a poll or two)
        assert state in ("PENDING", "RUNNING", "SIGNALING", "REQUEUED", "COMPLETING", "CONFIGURING"), (seen, tail())
        if state == "PENDING" and info.get("Restarts", "0") != "0":
            if until_requeued:  # and the supervisor has said so (it writes that after scontrol returns)
                wait_for(lambda: "requeued: it resumes" in tail(), 10, "the supervisor's requeue record")
                return
            # let it start now, with time to finish (the next warning would stop it again), once the node is
            # done with its first slot: started while the node is still completing, the job fails at launch
            # (FAILED, NonZeroExitCode; docs/platform.md). Slurm's own BeginTime delay is what avoids that.
            node = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout
            if not released and "completing" not in node:
                r = subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=15", "StartTime=now"],
                                   capture_output=True, text=True)
                released, refused = r.returncode == 0, r.stderr.strip()  # refused: the next poll asks again
        assert time.monotonic() < deadline, (seen, tail())
        time.sleep(1)
    assert released and scontrol_job(job_id).get("Restarts") == "1", tail()


def saved_and_requeued(run_dir: Path, tail) -> None:
    """One stop, on the warning signal, whose checkpoint is the run's first; one requeue."""
    assert [s["signal"] for s in events(run_dir, "stop_requested")] == ["SIGUSR1"], tail()
    requeues = events(run_dir, "slurm_requeue")
    assert len(requeues) == 1 and "error" not in requeues[0], tail()
    first = CheckpointStore(run_dir / "checkpoints").scan()[0]
    assert first.reason == "preempt" and 0 <= first.step < 300, first


@pytest.mark.slow
def test_a_job_saves_on_the_warning_requeues_resumes_and_completes_bit_for_bit(tmp_path, cluster):
    code, _ = run(tmp_path / "reference", *TOY_ARGS)
    assert code == 0
    reference = json.loads((tmp_path / "reference" / "final_hash.json").read_text())

    # A save time recorded by an earlier run: the warning's lead is 60 s plus this stop's cost (11 s),
    # so Slurm sends it 49 s after the start, or up to 30 s earlier (its time-limit check runs every
    # 30 s here): never in the first second, before the supervisor is there to take it (a lost
    # warning would leave the job to run out). ~0.22 s a step, ~65 s in all: longer than that.
    costs = {"save_s": 0.1, "save_measured": "sync", "step_s": 0.2}
    job_id, tail = submit(tmp_path, costs, 0.08)
    assert "#SBATCH --signal=USR1@71 " in (tmp_path / "job.sbatch").read_text()
    try:
        follow(job_id, tail)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    saved_and_requeued(tmp_path / "run", tail)
    assert [c.reason for c in CheckpointStore(tmp_path / "run" / "checkpoints").scan()] == ["preempt", "final"]
    assert "requeued: it resumes from the checkpoint" in tail()
    assert json.loads((tmp_path / "run" / "final_hash.json").read_text()) == reference


@pytest.mark.slow
def test_a_job_without_a_warning_saves_before_its_time_limit_by_itself(tmp_path, cluster):
    """No --signal, a 1-minute limit: the supervisor sends itself the warning a stop's cost before
    the end (a recorded save of 14 s: 32 s, so ~28 s in), saves and requeues as on Slurm's own."""
    def no_warning(script: str) -> str:
        assert "#SBATCH --signal=" in script and "#SBATCH --time=2\n" in script
        kept = [line for line in script.splitlines(keepends=True) if not line.startswith("#SBATCH --signal=")]
        return "".join(kept).replace("#SBATCH --time=2\n", "#SBATCH --time=1\n")

    costs = {"save_s": 14.0, "save_measured": "sync", "step_s": 0.2}
    # ~0.16 s a step, ~50 s in all; a stop's budget that holds the recorded save
    job_id, tail = submit(tmp_path, costs, 0.05, no_warning, stop={"grace_s": 60.0})
    try:
        follow(job_id, tail, until_requeued=True)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    [own] = events(tmp_path / "run", "slurm_time_limit")
    lead = slurm.stop_cost_s(costing.Costs(save_s=costs["save_s"], step_s=costs["step_s"]))  # as submitted
    assert own["lead_s"] == lead == 32 and 0 < own["seconds_left"] <= lead, own
    saved_and_requeued(tmp_path / "run", tail)
    assert "no warning signal came: saving now" in tail() and "requeued: it resumes" in tail()


@pytest.mark.slow
def test_a_save_request_to_every_process_during_start_up_saves_instead_of_killing(tmp_path):
    """What Slurm's warning does when it comes early: SIGUSR1 to the supervisor and to every
    process of its step, the launcher and a rank still importing torch among them."""
    import psutil

    job = write_job(tmp_path, ["--steps", "50", "--eval-every", "0"], script=TOY, launch={"num_processes": 2})
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(sup.pid).children():
            assert time.monotonic() < deadline, "no launcher started"
            time.sleep(0.01)
        launcher = psutil.Process(sup.pid).children()[0]
        os.killpg(launcher.pid, signal.SIGUSR1)  # the launcher's group: it and whatever it started by now
        os.kill(sup.pid, signal.SIGUSR1)
        assert finish(sup, 120) == EXIT_SAVED, (tmp_path / "sup.log").read_text()[-3000:]
    finally:
        kill_run(tmp_path / "run")
    reports = [read_json(p) for p in sorted((tmp_path / "run" / "ranks").glob("exit-*.json"))]
    assert [r["kind"] for r in reports] == ["saved", "saved"], reports
    assert [c.reason for c in CheckpointStore(tmp_path / "run" / "checkpoints").scan()] == ["preempt"]


def caught_signals(pid: int) -> int:
    """The mask of signals `pid` has a handler for (/proc/PID/status, SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


@pytest.mark.slow
def test_a_save_request_while_the_supervisor_itself_starts_saves_instead_of_killing(tmp_path):
    """Slurm's warning in the job's first second, while the supervisor still imports: the
    command's first line holds it (supervisor/entry.py) and the run loop replays it."""
    def bit(sig: int) -> int:
        return 1 << (sig - 1)

    job = write_job(tmp_path, ["--steps", "50", "--eval-every", "0"], script=TOY)
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    try:
        deadline = time.monotonic() + 30
        while not (caught := caught_signals(sup.pid)) & bit(signal.SIGUSR1):
            assert sup.poll() is None and time.monotonic() < deadline, (tmp_path / "sup.log").read_text()
        os.kill(sup.pid, signal.SIGUSR1)
        # sent before the run loop was up: from then on it also catches SIGCHLD
        assert not caught & bit(signal.SIGCHLD)
        assert finish(sup, 120) == EXIT_SAVED, (tmp_path / "sup.log").read_text()[-3000:]
    finally:
        kill_run(tmp_path / "run")
    assert [s["signal"] for s in events(tmp_path / "run", "stop_requested")] == ["SIGUSR1"]
    assert [c.reason for c in CheckpointStore(tmp_path / "run" / "checkpoints").scan()] == ["preempt"]
