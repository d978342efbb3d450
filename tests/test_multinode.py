"""Several machines: two `trainsup run` supervisors on this host acting as two nodes (1 CPU rank
each, gloo over loopback, accelerate's static rendezvous on 127.0.0.1), one job file each that
differs only in [launch] machine_rank, one shared run dir. Real launchers, real signals."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from supervisor.runner.launch import free_port
from supervisor_helpers import events, finish, kill_run, read_json, start_supervisor, wait_for, write_job
from train_core.store import CheckpointStore

pytestmark = pytest.mark.slow

TOY = Path(__file__).parent / "scripts" / "toy_train.py"
ARGS = ["--steps", "24", "--eval-every", "0", "--sleep-s", "0.05"]  # ~5 s of training


def node_jobs(tmp: Path, run_dir: Path, args=ARGS, **launch) -> list[Path]:
    port = free_port()
    jobs = []
    for m in (0, 1):
        d = tmp / f"node{m}"
        d.mkdir(exist_ok=True)
        jobs.append(write_job(d, list(args), script=TOY, run_dir=run_dir, launch={
            "num_processes": 2, "num_machines": 2, "machine_rank": m, "main_process_ip": "127.0.0.1",
            "main_process_port": port, "join_timeout_s": 60.0, **launch}))
    return jobs


_started: list = []  # every node's supervisor a test started


def start_nodes(tmp: Path, jobs: list[Path], tag: str) -> list:
    sups = [start_supervisor(job, log=tmp / f"node{m}-{tag}.log") for m, job in enumerate(jobs)]
    _started.extend(sups)
    return sups


@pytest.fixture(autouse=True)
def nothing_left_running(tmp_path):
    """After a test, pass or fail: no supervisor (one left running would restart its ranks, which
    kill_run alone ends, and load the tests after it), then no rank of its run dir."""
    yield
    while _started:
        sup = _started.pop()
        if sup.poll() is None:
            sup.kill()
            sup.wait(10)
    kill_run(tmp_path / "run")


def wait_or_show_logs(tmp: Path, pred, what: str) -> None:
    try:
        wait_for(pred, 120, what)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{logs(tmp)}") from None


def wait_for_step(tmp: Path, run_dir: Path, node: int, step: int) -> None:
    wait_or_show_logs(tmp, lambda: ((read_json(run_dir / "nodes" / f"node-{node}" / "status.json") or {})
                                    .get("step") or 0) >= step, f"step {step} on node {node}")


def final_hash(run_dir: Path) -> str:
    return json.loads((run_dir / "final_hash.json").read_text())["hash"]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> str:
    """The same job on one node with 2 processes."""
    tmp = tmp_path_factory.mktemp("one-node")
    job = write_job(tmp, ARGS, script=TOY, launch={"num_processes": 2})
    sup = start_supervisor(job, log=tmp / "sup.log")
    try:
        assert finish(sup, 180) == 0, (tmp / "sup.log").read_text()[-3000:]
    finally:
        kill_run(tmp / "run")
    return final_hash(tmp / "run")


def logs(tmp: Path) -> str:
    """The supervisors' output, then the ranks' (each attempt's log on each node)."""
    files = sorted(tmp.glob("node*.log")) + sorted((tmp / "run" / "nodes").glob("node-*/logs/attempt-*.log"))
    return "\n".join(f"--- {p.relative_to(tmp)}\n{p.read_text()[-2500:]}" for p in files)


def test_two_nodes_train_bit_for_bit_like_one_node_with_two_processes(tmp_path, one_node):
    run_dir = tmp_path / "run"
    sups = start_nodes(tmp_path, node_jobs(tmp_path, run_dir), "1")
    try:
        assert [finish(s, 180) for s in sups] == [0, 0], logs(tmp_path)
    finally:
        kill_run(run_dir)
    assert final_hash(run_dir) == one_node
    for m in (0, 1):  # each node's own files
        node = run_dir / "nodes" / f"node-{m}"
        assert (node / "events.jsonl").is_file() and (node / "logs" / "attempt-1.log").is_file()
        assert read_json(node / "status.json")["state"] == "finished"
    assert [c.step for c in CheckpointStore(run_dir / "checkpoints").scan()] == [24]


def test_sigterm_to_one_node_both_save_the_same_step_and_exit_75_then_resume_bit_for_bit(tmp_path, one_node):
    run_dir = tmp_path / "run"
    jobs = node_jobs(tmp_path, run_dir)
    sups = start_nodes(tmp_path, jobs, "1")
    try:
        wait_for_step(tmp_path, run_dir, 1, 3)
        os.kill(sups[1].pid, signal.SIGTERM)  # node 1's supervisor only
        assert [finish(s, 120) for s in sups] == [75, 75], logs(tmp_path)
        ckpts = [c for c in CheckpointStore(run_dir / "checkpoints").scan() if c.valid]
        assert len(ckpts) == 1 and ckpts[0].reason == "preempt" and 3 <= ckpts[0].step < 24
        stop = ckpts[0].step
        for m in (0, 1):
            reports = [read_json(p) for p in (run_dir / "nodes" / f"node-{m}" / "ranks").glob("exit-*.json")]
            assert [(r["kind"], r["step"]) for r in reports] == [("saved", stop)], reports
        follow = [e for e in events(run_dir / "nodes" / "node-0") if e["event"] == "stop_requested"]
        assert follow and "machine rank 1" in follow[0]["cause"]
        sups = start_nodes(tmp_path, jobs, "2")
        assert [finish(s, 180) for s in sups] == [0, 0], logs(tmp_path)
    finally:
        kill_run(run_dir)
    assert final_hash(run_dir) == one_node


def test_sigkill_of_a_rank_on_one_node_restarts_both_from_the_newest_checkpoint(tmp_path, one_node):
    run_dir = tmp_path / "run"
    sups = start_nodes(tmp_path, node_jobs(tmp_path, run_dir, [*ARGS, "--save-every", "4"]), "1")
    try:
        ckpts = CheckpointStore(run_dir / "checkpoints")
        wait_or_show_logs(tmp_path, lambda: any(c.valid and c.step >= 8 for c in ckpts.scan()), "a checkpoint at step 8")
        rank1 = read_json(run_dir / "nodes" / "node-1" / "ranks" / "rank-1.json")
        os.kill(rank1["pid"], signal.SIGKILL)
        assert [finish(s, 240) for s in sups] == [0, 0], logs(tmp_path)
    finally:
        kill_run(run_dir)
    for m in (0, 1):
        starts = [e for e in events(run_dir / "nodes" / f"node-{m}")
                  if e["event"] == "state" and e["to"] == "starting"]
        assert len(starts) >= 2 and starts[-1]["resume_from"], starts
    one_hash = json.loads((run_dir / "final_hash.json").read_text())
    assert one_hash["step"] == 24
    # --save-every changes nothing the weights depend on
    assert one_hash["hash"] == one_node


def test_nodes_started_with_different_job_files_refuse_naming_the_keys(tmp_path):
    run_dir = tmp_path / "run"
    jobs = node_jobs(tmp_path, run_dir)
    jobs[1].write_text(jobs[1].read_text().replace('"24"', '"30"'))  # node 1: --steps 30
    sups = start_nodes(tmp_path, jobs, "1")
    codes = [finish(s, 90) for s in sups]
    assert codes == [2, 2], logs(tmp_path)
    text = (tmp_path / "node0-1.log").read_text()
    assert "machine rank 1" in text and "train.args differ" in text and "same job file" in text
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())


def test_a_node_that_never_joins_ends_the_wait_naming_its_machine_rank(tmp_path):
    run_dir = tmp_path / "run"
    jobs = node_jobs(tmp_path, run_dir, join_timeout_s=3.0)
    t0 = time.monotonic()
    sup = start_supervisor(jobs[0], log=tmp_path / "node0-1.log")
    assert finish(sup, 60) == 3
    assert time.monotonic() - t0 < 30
    text = (tmp_path / "node0-1.log").read_text()
    assert "machine rank 1 did not join within 3 s" in text and "filesystem the nodes share" in text


def test_two_supervisors_claiming_one_machine_rank_exit_4(tmp_path):
    run_dir = tmp_path / "run"
    jobs = node_jobs(tmp_path, run_dir, join_timeout_s=20.0)
    first = start_supervisor(jobs[0], log=tmp_path / "node0-1.log")
    try:
        wait_for(lambda: (run_dir / "nodes" / "node-0" / "node.json").is_file(), 30, "node 0 announced")
        second = start_supervisor(jobs[0], log=tmp_path / "node0-2.log")
        assert finish(second, 30) == 4
        assert "machine rank 0 of run dir" in (tmp_path / "node0-2.log").read_text()
    finally:
        first.send_signal(signal.SIGTERM)
        finish(first, 30)


def test_a_power_stop_stops_every_node_with_exit_75(tmp_path):
    """[power] on_battery = "stop" (a fake sysfs tree): on several machines the run stops on every
    node, one save, every supervisor exits 75 (one node alone waiting for power would leave the
    others' rendezvous hanging)."""
    from test_laptop_integration import Sysfs

    sysfs = Sysfs(tmp_path / "power_supply")
    sysfs.set("AC", type="Mains", online=1)
    sysfs.set("BAT0", type="Battery", status="Charging", capacity=90, present=1)
    run_dir = tmp_path / "run"
    port = free_port()
    jobs = []
    for m in (0, 1):
        d = tmp_path / f"node{m}"
        d.mkdir()
        jobs.append(write_job(d, ["--steps", "200", "--eval-every", "0", "--sleep-s", "0.05"], script=TOY,
                              run_dir=run_dir, power={"on_battery": "stop", "poll_interval_s": 0.1,
                                                      "sysfs_root": str(sysfs.root)},
                              launch={"num_processes": 2, "num_machines": 2, "machine_rank": m,
                                      "main_process_ip": "127.0.0.1", "main_process_port": port}))
    sups = start_nodes(tmp_path, jobs, "1")
    try:
        wait_for_step(tmp_path, run_dir, 0, 3)
        sysfs.set("AC", online=0)
        sysfs.set("BAT0", status="Discharging", capacity=80)
        assert [finish(s, 120) for s in sups] == [75, 75], logs(tmp_path)
    finally:
        kill_run(run_dir)
    ckpts = [c for c in CheckpointStore(run_dir / "checkpoints").scan() if c.valid]
    assert len(ckpts) == 1 and ckpts[0].reason == "preempt"
