"""Bitwise exact resume through real `accelerate launch` children and real signals.

An uninterrupted run and a run stopped 3 times (once mid gradient-accumulation) and resumed
must end with the same model, EMA and optimizer state, bit for bit: for 1 process and for
2 CPU ranks talking over gloo (docs/platform.md: ACCELERATE_USE_CPU=1 ... --multi_gpu). Dropout,
shuffling, grad_accum=3, an LR schedule and an EMA are all on in the toy script.

Stops come from a real SIGUSR1: either the toy sends it to itself at a chosen micro-batch
(deterministic stop points), or the test sends it from outside to a rank PID read from
ranks/rank-R.json (the supervisor's way), or SIGTERM to the whole process group (what a
launcher or a scheduler does), which also hits the DataLoader workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor.runner.launch import free_port
from supervisor_helpers import final_hash
from train_core.runfiles import read_json
from train_core.store import CheckpointStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "scripts" / "toy_train.py"
TIMEOUT_S = 180


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINSUP_", "ACCELERATE_"))}
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cmd(nproc: int | None) -> tuple[list[str], dict[str, str]]:
    """nproc None: plain `python toy.py`; 1 or 2: through `accelerate launch`."""
    env = _env()
    if nproc is None:
        return [sys.executable, str(TOY)], env
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if nproc > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd += ["--multi_gpu", "--main_process_port", str(free_port())]
    return cmd + [str(TOY)], env


def launch(run_dir: Path, *args: str, nproc: int | None = 1) -> list[dict]:
    """Run to the end; returns every rank's exit report."""
    cmd, env = _cmd(nproc)
    proc = subprocess.run(cmd + ["--run-dir", str(run_dir), *args], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    return _reports(run_dir, nproc or 1, proc.stdout + proc.stderr)


def _reports(run_dir: Path, world: int, output: str = "") -> list[dict]:
    reports = [read_json(run_dir / "ranks" / f"exit-{r}.json") for r in range(world)]
    assert all(reports), f"missing exit report; output:\n{output[-3000:]}"
    return reports


def assert_saved_together(reports: list[dict], step: int | None = None) -> Path:
    """Every rank stopped at the same committed checkpoint, which holds every rank's RNG."""
    assert {r["kind"] for r in reports} == {"saved"}, reports
    assert len({r["checkpoint"] for r in reports}) == 1 and len({r["step"] for r in reports}) == 1, reports
    if step is not None:
        assert reports[0]["step"] == step, reports
    path = Path(reports[0]["checkpoint"])
    ckpt = CheckpointStore(path.parent).check(path, full=True)
    assert ckpt.valid, ckpt.problem
    files = {f["path"] for f in ckpt.manifest["files"]}
    assert {f"random_states_{r}.pkl" for r in range(len(reports))} <= files
    return path


@pytest.fixture(scope="module")
def ref1(tmp_path_factory) -> str:
    """1 process, uninterrupted, run plainly (`python toy.py`, no launcher)."""
    d = tmp_path_factory.mktemp("ref1")
    (rep,) = launch(d, nproc=None)
    assert rep["kind"] == "finished", rep
    return final_hash(d)


@pytest.fixture(scope="module")
def ref2(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ref2")
    reports = launch(d, nproc=2)
    assert {r["kind"] for r in reports} == {"finished"}, reports
    return final_hash(d)


def test_one_process_stopped_three_times_is_bitwise_equal(tmp_path, ref1):
    d = tmp_path / "run"
    # 64 samples / micro 4 = 16 batches per epoch; grad_accum 3 -> steps end at batches 3,6,..,15,16
    assert_saved_together(launch(d, "--signal-at", "5"), step=2)  # mid accumulation -> next boundary
    assert_saved_together(launch(d, "--signal-at", "10"), step=6)  # the epoch's last, partial step
    assert_saved_together(launch(d, "--signal-at", "9"), step=9)  # on a boundary, mid epoch 1
    (rep,) = launch(d)
    assert rep["kind"] == "finished" and rep["step"] == 24
    assert final_hash(d) == ref1


def test_two_ranks_one_rank_signalled_save_one_checkpoint_bitwise_equal(tmp_path, ref2):
    d = tmp_path / "run"
    # 2 ranks: 8 batches per rank per epoch -> steps end at batches 3, 6, 8. One rank is signalled.
    assert_saved_together(launch(d, "--signal-at", "4", "--signal-rank", "1", nproc=2), step=2)
    assert_saved_together(launch(d, "--signal-at", "5", "--signal-rank", "1", nproc=2), step=4)  # boundary
    assert_saved_together(launch(d, "--signal-at", "5", "--signal-rank", "0", nproc=2), step=6)  # epoch end
    reports = launch(d, nproc=2)
    assert {r["kind"] for r in reports} == {"finished"}, reports
    assert final_hash(d) == ref2


def _start(run_dir: Path, *args: str, nproc: int | None) -> subprocess.Popen:
    cmd, env = _cmd(nproc)
    return subprocess.Popen(cmd + ["--run-dir", str(run_dir), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int) -> None:
    end = time.monotonic() + TIMEOUT_S
    while (read_json(run_dir / "status.json") or {}).get("step", -1) < step:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < end, "the run never got there"
        time.sleep(0.05)


def test_external_signal_to_one_rank_pid(tmp_path, ref2):
    d = tmp_path / "run"
    proc = _start(d, "--sleep-s", "0.05", nproc=2)
    try:
        _wait_for_step(d, proc, 3)
        pid = read_json(d / "ranks" / "rank-1.json")["pid"]
        os.kill(pid, signal.SIGUSR1)  # rank 1 only, straight to its PID; rank 0 learns by the all_reduce
        out = proc.communicate(timeout=TIMEOUT_S)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reports = _reports(d, 2, out)
    path = assert_saved_together(reports)
    assert reports[1]["detail"] == "signal SIGUSR1" and reports[0]["detail"] == "another rank was asked to stop"
    assert 3 <= reports[0]["step"] < 24, reports
    assert path.name == f"step-{reports[0]['step']:08d}"
    reports = launch(d, nproc=2)
    assert {r["kind"] for r in reports} == {"finished"}, reports
    assert final_hash(d) == ref2


def test_sigterm_to_process_group_with_dataloader_workers(tmp_path, ref1):
    d = tmp_path / "run"
    # persistent workers too: docs/platform.md says sys.exit hangs with them unless they are shut down
    proc = _start(d, "--sleep-s", "0.05", "--num-workers", "1", "--persistent-workers", nproc=None)
    try:
        _wait_for_step(d, proc, 2)
        os.killpg(proc.pid, signal.SIGTERM)  # the rank and its DataLoader worker both get it
        out = proc.communicate(timeout=TIMEOUT_S)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, out[-3000:]
    (rep,) = _reports(d, 1, out)
    assert rep["kind"] == "saved" and rep["detail"] == "signal SIGTERM", rep
    (rep,) = launch(d, "--num-workers", "1", nproc=None)
    assert rep["kind"] == "finished"
    assert final_hash(d) == ref1  # workers change nothing: same samples, same order
