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
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from supervisor import slurm
from supervisor.cli import main
from supervisor.config import JobConfigError, load_job
from supervisor_helpers import events, missing, write_job
from toy_inprocess import isolated, run  # noqa: F401 - isolated: an autouse fixture
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


def test_the_warning_lead_comes_from_the_recorded_save_time():
    assert slurm.signal_lead_s(None) == 60 + 30
    assert slurm.signal_lead_s({"save_s": 4.0, "step_s": 0.5}) == 60 + 17  # 1.5 x 4 + 0.5 + 10 s to exit
    assert slurm.signal_lead_s({"save_s": "x"}) == 90


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


@pytest.mark.slow
def test_a_job_saves_on_the_warning_requeues_resumes_and_completes_bit_for_bit(tmp_path, cluster):
    args = ["--steps", "300", "--eval-every", "0", "--save-every", "0", "--dataset-size", "256"]
    code, _ = run(tmp_path / "reference", *args)
    assert code == 0
    reference = json.loads((tmp_path / "reference" / "final_hash.json").read_text())

    # ~0.17 s a step, ~50 s in all: longer than the first slot's warning, which comes within 30 s of the
    # start of a 2-minute limit (90 s before its end, and Slurm may signal up to 60 s early)
    job = write_job(tmp_path, [*args, "--sleep-s", "0.05"], script=TOY, run_dir=tmp_path / "run",
                    watch={"poll_interval_s": 0.2})
    r = CliRunner().invoke(main, ["slurm", "script", str(job), "--time", "2"])
    assert r.exit_code == 0, r.output
    (tmp_path / "job.sbatch").write_text(r.output)
    out = subprocess.run(["sbatch", "--parsable", "--chdir", str(tmp_path), str(tmp_path / "job.sbatch")],
                         capture_output=True, text=True, check=True).stdout
    job_id = out.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 420
        released = False
        while True:
            info = scontrol_job(job_id)
            state = info.get("JobState")
            if state == "COMPLETED":
                break
            assert state in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING"), info
            if state == "PENDING" and info.get("Restarts", "0") != "0" and not released:
                # requeued: let it start now, with time to finish (the next warning would stop it again)
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=15", "StartTime=now"],
                               check=True, capture_output=True)
                released = True
            assert time.monotonic() < deadline, (info, (tmp_path / f"slurm-{job_id}.out").read_text()[-3000:])
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert released and scontrol_job(job_id).get("Restarts") == "1", log[-3000:]
    stops = [e for e in events(tmp_path / "run", "stop_requested")]
    assert [s["signal"] for s in stops] == ["SIGUSR1"], log[-3000:]
    requeues = events(tmp_path / "run", "slurm_requeue")
    assert len(requeues) == 1 and "error" not in requeues[0]
    ckpts = CheckpointStore(tmp_path / "run" / "checkpoints").scan()
    assert [c.reason for c in ckpts] == ["preempt", "final"] and 0 <= ckpts[0].step < 300, ckpts
    assert "requeued: it resumes from the checkpoint" in log
    final = json.loads((tmp_path / "run" / "final_hash.json").read_text())
    assert final == reference


@pytest.mark.slow
def test_a_save_request_to_every_process_during_start_up_saves_instead_of_killing(tmp_path):
    """What Slurm's warning does when it comes early: SIGUSR1 to the supervisor and to every
    process of its step, the launcher and a rank still importing torch among them."""
    import psutil

    from supervisor_helpers import finish, kill_run, read_json, start_supervisor

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
