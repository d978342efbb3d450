"""Background saves: the state of a step boundary copied to memory, written while training goes on.

In-process runs of the toy (tests/toy_inprocess.py) compare what the background writer wrote
with what a synchronous save of the same step writes, resume from background-written
checkpoints bit for bit, and put faults into the writer. The launcher tests (real `accelerate
launch`, 1 and 2 ranks, a real SIGKILL) are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from supervisor_helpers import final_hash, wait_for
from toy_inprocess import isolated, run, steps, toy  # noqa: F401 - isolated: an autouse fixture
from train_core import staging
from train_core.errors import CheckpointSaveFailed
from train_core.store import CheckpointStore

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "scripts" / "toy_train.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    code, report = run(d, "--eval-every", "0")
    assert code == 0, report
    return d


def _load(path: Path):
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix == ".json":
        return path.read_text()
    return torch.load(path, weights_only=False)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if type(a).__module__ == "numpy":
        import numpy as np
        return np.array_equal(a, b)
    return a == b


def test_background_files_equal_a_synchronous_save_of_the_same_step(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINSUP_BACKGROUND_SAVES", "0")
    assert run(tmp_path / "sync", "--save-every", "4", "--eval-every", "0")[0] == 0
    monkeypatch.setenv("TRAINSUP_BACKGROUND_SAVES", "1")
    writers, threads = [], set()
    real_write = staging.write

    def spy(staged, tmp, **kw):
        writers.append(threading.current_thread().name)
        threads.add(threading.current_thread())
        return real_write(staged, tmp, **kw)

    monkeypatch.setattr(staging, "write", spy)
    assert run(tmp_path / "bg", "--save-every", "4", "--eval-every", "0")[0] == 0
    # every interval save but the last (merged into the final one) went through the writer thread
    assert writers == [f"trainsup-save-{s}" for s in (4, 8, 12, 16, 20)]
    (writer,) = threads  # one thread for all saves, and it ends with the session
    writer.join(5)
    assert not writer.is_alive()
    sync, bg = (CheckpointStore(tmp_path / n / "checkpoints").scan(full=True) for n in ("sync", "bg"))
    assert [c.step for c in sync] == [c.step for c in bg] == [4, 8, 12, 16, 20, 24]
    assert all(c.valid for c in sync + bg)
    for a, b in zip(sync, bg):
        files = sorted(f["path"] for f in a.manifest["files"])
        assert files == sorted(f["path"] for f in b.manifest["files"]), (a.step, files)
        for name in files:
            assert _equal(_load(a.path / name), _load(b.path / name)), (a.step, name)


def test_accelerate_load_state_reads_a_background_checkpoint(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    assert run(tmp_path, "--save-every", "4", "--eval-every", "0", "--steps", "10")[0] == 0
    ckpt = CheckpointStore(tmp_path / "checkpoints").scan()[1]
    assert ckpt.step == 8 and ckpt.reason == "interval"
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator()
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters())
    model, opt = acc.prepare(model, opt)
    ema = toy.EMA(model)
    acc.register_for_checkpointing(ema)
    before = model[0].weight.detach().clone()
    acc.load_state(str(ckpt.path))
    saved = load_file(ckpt.path / "model.safetensors")
    assert not torch.equal(before, saved["0.weight"])
    assert torch.equal(model[0].weight, saved["0.weight"])
    assert opt.state_dict()["state"][0]["step"].item() == 8
    assert torch.equal(ema.shadow["0.weight"], torch.load(ckpt.path / "custom_checkpoint_0.pkl")["shadow"]["0.weight"])


def test_resume_from_a_background_checkpoint_is_bitwise_exact(tmp_path, reference):
    # a crash (an error in the step) after the save at step 8 was staged: the writer still
    # commits it on the way out, and the rerun resumes there
    code, rep = run(tmp_path, "--save-every", "8", "--eval-every", "0", "--oom-at", "26",  # micro 26: step 9
                    "--write-sleep-s", "0.5")
    assert isinstance(code, torch.OutOfMemoryError) and rep["kind"] == "oom"
    ckpts = CheckpointStore(tmp_path / "checkpoints").scan(full=True)
    assert [(c.step, c.reason, c.valid) for c in ckpts] == [(8, "interval", True)]
    assert rep["checkpoint"].endswith("step-00000008")
    code, rep = run(tmp_path, "--save-every", "8", "--eval-every", "0")
    assert code == 0 and final_hash(tmp_path) == final_hash(reference)


def test_a_stop_during_a_slow_background_write_flushes_it_then_saves(tmp_path, reference):
    # the writer takes 1 s; the stop comes at step 5, while step 4's save is being written
    t0 = time.monotonic()
    code, rep = run(tmp_path, "--save-every", "4", "--eval-every", "0", "--write-sleep-s", "1", "--signal-at", "15")
    assert code == 75 and rep["kind"] == "saved" and rep["step"] == 5
    assert time.monotonic() - t0 > 1.0
    ckpts = CheckpointStore(tmp_path / "checkpoints").scan(full=True)
    assert [(c.step, c.reason, c.valid) for c in ckpts] == [(4, "interval", True), (5, "preempt", True)]
    code, rep = run(tmp_path, "--save-every", "4", "--eval-every", "0")
    assert code == 0 and final_hash(tmp_path) == final_hash(reference)


def test_training_goes_on_while_the_writer_writes(tmp_path):
    """The step after a background save starts before its files are written: the save of step 4
    is still in flight when step 5 is done (the writer takes 1 s, a step a few ms)."""
    seen = []

    def on_micro(n, session, x):
        if n == 15:  # step 5's last micro-batch
            seen.append((session.global_step, session._saver.running(), steps(session.paths.run_dir)))

    code, _ = run(tmp_path, "--save-every", "4", "--eval-every", "0", "--steps", "6", "--write-sleep-s", "1",
                  on_micro=on_micro)
    assert code == 0
    assert seen == [(4, True, [])]
    assert steps(tmp_path) == [4, 6]


def test_a_failed_background_write_fails_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_write = staging.write
    calls = []

    def failing(staged, tmp, **kw):
        calls.append(tmp.name)
        if len(calls) == 2:  # the save of step 8
            raise OSError(28, "No space left on device")
        return real_write(staged, tmp, **kw)

    monkeypatch.setattr(staging, "write", failing)
    code, rep = run(tmp_path, "--save-every", "4", "--eval-every", "0")
    assert isinstance(code, CheckpointSaveFailed), code
    assert "step-00000008 in the background failed" in str(code) and "No space left" in str(code)
    assert "step-00000004 is intact" in str(code)
    assert rep["kind"] == "error" and rep["checkpoint"].endswith("step-00000004")
    root = tmp_path / "checkpoints"
    assert steps(tmp_path) == [4] and not list(root.glob(".tmp-*"))


def test_writer_runs_at_low_priority_and_staging_copies_share_nothing(tmp_path, monkeypatch):
    nice = []
    real_write = staging.write

    def spy(staged, tmp, **kw):
        nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        # nothing the training touches after the stage is shared with the copy
        w = staged.weights[0]
        assert all(t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
                   for t in w.values() for p in live)
        return real_write(staged, tmp, **kw)

    live = []

    def on_micro(n, session, x):
        if n == 1:
            live.extend(p.detach() for p in session.accelerator._models[0].parameters())

    monkeypatch.setattr(staging, "write", spy)
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert run(tmp_path, "--save-every", "4", "--eval-every", "0", "--steps", "5", on_micro=on_micro)[0] == 0
    assert nice == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # the training thread's is untouched


def test_tied_weights_stay_one_tensor_in_the_copy():
    a = torch.nn.Linear(4, 4)
    b = torch.nn.Linear(4, 4)
    b.weight = a.weight
    state = {"a": a.weight.detach(), "b": b.weight.detach(), "bias": a.bias.detach()}
    copies = staging._Copies(staging.Buffers())
    copy = copies.walk(state, ())
    copies.copy()
    assert copy["a"] is copy["b"] and copy["a"] is not state["a"] and torch.equal(copy["a"], state["a"])
    state["a"].add_(1)
    assert not torch.equal(copy["a"], state["a"])


# ---------------------------------------------------------------- through the launcher
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINSUP_", "ACCELERATE_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_sigkill_during_a_background_write_leaves_the_previous_checkpoint_newest(tmp_path, reference):
    # a step takes ~0.06 s, every write 0.5 s: the kill lands while step 8 is being written
    cmd = [sys.executable, str(TOY), "--run-dir", str(tmp_path), "--save-every", "4", "--eval-every", "0",
           "--sleep-s", "0.02"]
    proc = subprocess.Popen(cmd + ["--write-sleep-s", "0.5"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    root = tmp_path / "checkpoints"
    try:
        wait_for(lambda: steps(tmp_path) == [4] and list(root.glob(".tmp-step-00000008-*")), 60,
                 "step 4 committed, step 8 being written")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    ckpts = CheckpointStore(root).scan(full=True)
    assert [(c.step, c.valid) for c in ckpts] == [(4, True)]
    assert CheckpointStore(root).latest_valid(full=True).step == 4
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not list(root.glob(".tmp-*"))
    assert final_hash(tmp_path) == final_hash(reference)


@pytest.mark.slow
def test_two_ranks_write_in_the_background_and_resume_bitwise(tmp_path):
    from test_session_resume import launch

    args = ("--eval-every", "0", "--save-every", "4")
    launch(tmp_path / "ref", *args, "--steps", "16", nproc=2)
    reports = launch(tmp_path / "bg", *args, "--steps", "16", "--write-sleep-s", "0.3", nproc=2)
    assert [r["kind"] for r in reports] == ["finished", "finished"]
    ckpts = CheckpointStore(tmp_path / "bg" / "checkpoints").scan(full=True)
    assert [(c.step, c.reason, c.valid) for c in ckpts] == [(4, "interval", True), (8, "interval", True),
                                                          (12, "interval", True), (16, "final", True)]
    for c in ckpts:  # both ranks' random states; the writers' markers are gone
        names = {f["path"] for f in c.manifest["files"]}
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= names and not any(".rank-" in n for n in names)
    # resume both ranks from the background-written step 8: the same final state, bit for bit
    reports = launch(tmp_path / "bg", *args, "--steps", "16", "--resume", str(ckpts[1].path), nproc=2)
    assert [r["kind"] for r in reports] == ["finished", "finished"]
    assert [c.step for c in CheckpointStore(tmp_path / "bg" / "checkpoints").quarantined()] == [12, 16]  # redone
    assert final_hash(tmp_path / "bg") == final_hash(tmp_path / "ref")


def test_the_writer_writes_the_metrics_of_its_own_step(tmp_path):
    """The loop goes on reporting metrics while a slow writer has not written trainer_state.json
    yet: the checkpoint holds the metrics as they were at its step, no later ones."""

    last_micro = {}  # step -> the micro-batch that completed it

    def on_micro(n, session, x):
        session.report_metrics({f"m{n}": float(n)})
        if session.accelerator.sync_gradients:
            last_micro[session.global_step + 1] = n

    code, _ = run(tmp_path, "--save-every", "4", "--eval-every", "0", "--steps", "9", "--write-sleep-s", "0.3",
                  on_micro=on_micro)
    assert code == 0
    ckpts = CheckpointStore(tmp_path / "checkpoints").scan()
    assert [c.step for c in ckpts] == [4, 8, 9]
    for c in ckpts:
        metrics = json.loads((c.path / "trainer_state.json").read_text())["metrics"]
        assert sorted(metrics, key=lambda k: int(k[1:])) == [f"m{n}" for n in range(1, last_micro[c.step] + 1)]


def test_a_stop_after_a_failed_background_write_still_saves(tmp_path, monkeypatch):
    """The background save of step 8 fails; a stop arrives before the next boundary: the
    stop's own save is made (the failure is logged), not lost to the earlier one's error."""
    real_write = staging.write
    calls = []

    def failing(staged, tmp, **kw):
        calls.append(tmp.name)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real_write(staged, tmp, **kw)

    monkeypatch.setattr(staging, "write", failing)
    code, rep = run(tmp_path, "--save-every", "4", "--eval-every", "0", "--signal-at", "25")
    assert code == 75 and rep["kind"] == "saved" and rep["step"] == 9, (code, rep)
    assert steps(tmp_path) == [4, 9] and not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_a_rank_whose_writer_fails_without_a_marker_fails_every_rank(tmp_path):
    """Rank 1's writer cannot leave its marker: rank 0's writer stops waiting for it (the ranks
    agree that one failed) and every rank ends with the save's error, none hangs."""
    from test_session_resume import launch

    reports = launch(tmp_path, "--eval-every", "0", "--save-every", "4", "--steps", "16", "--no-marker-rank", "1",
                     nproc=2)
    assert [r["kind"] for r in reports] == ["error", "error"], reports
    assert all("step-00000004 in the background failed" in r["detail"] for r in reports), reports
    assert steps(tmp_path) == [] and not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_one_rank_that_cannot_stage_makes_every_rank_save_synchronously(tmp_path):
    from test_session_resume import launch

    args = ("--eval-every", "0", "--save-every", "4", "--steps", "12")
    launch(tmp_path / "ref", *args, nproc=2)
    # rank 0 could stage, rank 1 cannot: a split would pair different collectives and hang
    reports = launch(tmp_path / "hook", *args, "--prehook-rank", "1", nproc=2)
    assert [r["kind"] for r in reports] == ["finished", "finished"], reports
    assert steps(tmp_path / "hook") == [4, 8, 12]
    assert final_hash(tmp_path / "hook") == final_hash(tmp_path / "ref")


def test_a_rank_that_writes_only_its_generators_copies_only_them(tmp_path, monkeypatch):
    """save_accelerator_state writes model, optimizer, scheduler and scaler on the main process
    only: another rank stages its random states and nothing else (no second copy of the model)."""
    staged = {}

    def on_micro(n, session, x):
        if n == 3:
            staged["main"] = staging.stage(session.accelerator, [], staging.Buffers())
            with monkeypatch.context() as m:
                m.setattr(type(session.accelerator), "is_main_process", property(lambda self: False))
                staged["other"] = staging.stage(session.accelerator, [], staging.Buffers())

    assert run(tmp_path, "--steps", "2", "--eval-every", "0", on_micro=on_micro)[0] == 0
    main, other = staged["main"], staged["other"]
    assert main.weights and main.optimizers and main.nbytes > 0
    assert (other.weights, other.optimizers, other.schedulers, other.dataloaders, other.nbytes) == ([], [], [], [], 0)
    assert other.rng.keys() == main.rng.keys()
