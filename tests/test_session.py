"""TrainSession in one process (no launcher): saves, stops, resume checks, exit reports.

The toy script (tests/scripts/toy_train.py) runs in this very process, so each run costs
a fraction of a second. Signals are real (os.kill to this process) and go through the real
handler; files are real. Multi-process and launcher behaviour is in test_session_resume.py.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from supervisor_helpers import final_hash, wait_for
from train_core import session as session_mod
from train_core.fingerprint import ConfigError, ConfigMismatch, check_config_change, diff_configs, fingerprint
from train_core.contract import pid_alive
from train_core.heartbeat import RankWatcher
from train_core.runfiles import Control, RunPaths, read_json, write_control
from train_core.signals import StopFlag, ignore_stop_signals_worker_init, parse_signal
from train_core.store import CheckpointStore
from toy_inprocess import STOP_SIGNALS, isolated, run, steps, toy  # noqa: F401 - isolated: an autouse fixture


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every resumed run must match bit for bit."""
    d = tmp_path_factory.mktemp("reference")
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    code, report = run(d)
    for s, handler in saved.items():
        signal.signal(s, handler)
    assert code == 0 and report["kind"] == "finished", report
    return d


# ---------------------------------------------------------------- pure parts
def test_fingerprint_ignores_key_order_and_diff_names_leaves():
    a = {"lr": 0.1, "model": {"n_layer": 2, "d": 64}}
    b = {"model": {"d": 64, "n_layer": 2}, "lr": 0.1}
    assert fingerprint(a) == fingerprint(b)
    c = {"lr": 0.2, "model": {"n_layer": 4, "d": 64}, "new": True}
    assert set(diff_configs(a, c)) == {"lr", "model.n_layer", "new"}
    assert diff_configs({"x": 1}, {"x": 1.0}) == {"x": (1, 1.0)}  # int vs float is a change


def test_config_mismatch_lists_keys_and_the_fix():
    with pytest.raises(ConfigMismatch) as e:
        check_config_change({"lr": 0.1, "model": {"n_layer": 2}}, {"lr": 0.2, "model": {"n_layer": 4}},
                            checkpoint="step-00000010")
    msg = str(e.value)
    assert "step-00000010" in msg and "lr (0.1 -> 0.2)" in msg and "model.n_layer (2 -> 4)" in msg
    assert "allow_changes=('lr', 'model.n_layer',)" in msg
    assert e.value.keys == ("lr", "model.n_layer")
    # allowed by exact key or by a parent prefix
    assert check_config_change({"optim": {"lr": 1}}, {"optim": {"lr": 2}}, allow_changes=("optim",))
    with pytest.raises(ConfigMismatch):
        check_config_change({"optimizer": 1}, {"optimizer": 2}, allow_changes=("optim",))


def test_config_with_unstable_value_names_the_key():
    with pytest.raises(ConfigError, match=r"config\.model\.act is a object"):
        fingerprint({"model": {"act": object()}})
    with pytest.raises(ConfigError, match=r"config\.lr is nan"):
        fingerprint({"lr": float("nan")})
    assert fingerprint({"n": torch.tensor(3)}) == fingerprint({"n": 3})


def test_stop_flag_real_signals_second_one_is_harmless():
    flag = StopFlag()
    flag.install([signal.SIGUSR1, signal.SIGTERM])
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second request: recorded nowhere, no crash
        assert flag.is_set() and flag.signum == signal.SIGUSR1
        assert flag.describe() == "signal SIGUSR1"
    finally:
        flag.uninstall()


def test_save_signal_names():
    assert parse_signal("SIGUSR2") == signal.SIGUSR2
    assert parse_signal("usr1") == signal.SIGUSR1
    assert parse_signal(str(int(signal.SIGUSR2))) == signal.SIGUSR2
    with pytest.raises(ValueError, match="TRAINSUP_SAVE_SIGNAL='SIGFOO' is not a signal name"):
        parse_signal("SIGFOO")


class _SelfTerminating(torch.utils.data.Dataset):
    """Each item sends SIGTERM to the worker that loads it (what a forwarded group signal does)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        return torch.tensor([i])


def test_dataloader_workers_ignore_stop_signals_and_chain_user_init():
    seen = []
    dl = torch.utils.data.DataLoader(
        _SelfTerminating(), batch_size=2, num_workers=1,
        worker_init_fn=ignore_stop_signals_worker_init(lambda wid: seen.append(wid)),
    )
    assert sorted(int(x) for b in dl for x in b) == list(range(8))  # no "worker exited unexpectedly"
    plain = torch.utils.data.DataLoader(_SelfTerminating(), batch_size=2, num_workers=1)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        list(plain)


def test_watcher_control_json_and_supervisor_pid(tmp_path):
    paths = RunPaths(tmp_path)
    write_control(paths.control, Control(save_seq=5))  # an old request: never replayed
    sup = subprocess.Popen(["sleep", "30"])
    flag = StopFlag()
    w = RankWatcher(paths, flag, status_fn=lambda: {"state": "training"}, supervisor_pid=sup.pid,
                    control_poll_s=0.02, heartbeat_s=0.02, supervisor_poll_s=0.02)
    w.start()
    try:
        assert w.control.save_seq == 5
        write_control(paths.control, Control(pause=True, save_seq=6))
        wait_for(lambda: w.control.pause and w.control.save_seq == 6, 5.0, "pause and save 6 seen")
        assert not flag.is_set()
        assert read_json(paths.status)["state"] == "training" and "updated_at" in read_json(paths.status)
        sup.kill()
        sup.wait()
        assert not pid_alive(sup.pid)
        wait_for(flag.is_set, 5.0, "the stop flag")
        assert "supervisor pid" in flag.describe()
    finally:
        w.stop()
        sup.kill()
        sup.wait()


# ---------------------------------------------------------------- in-process runs
def test_fresh_run_files_and_manifest(tmp_path, reference):
    d = reference
    exit_report = read_json(d / "ranks" / "exit-0.json")
    assert exit_report["kind"] == "finished" and exit_report["code"] == 0 and exit_report["step"] == 24
    rank = read_json(d / "ranks" / "rank-0.json")
    assert {"pid", "rank", "local_rank", "world_size", "attempt", "host", "started_at"} <= set(rank)
    status = read_json(d / "status.json")
    assert status["state"] == "finished" and status["step"] == 24 and status["max_steps"] == 24
    assert status["last_checkpoint"]["reason"] == "final"
    for key in ("attempt", "pid", "epoch", "batch_in_epoch", "loss", "tokens_per_s", "samples_per_s",
                "metrics", "micro_batch", "grad_accum", "world_size", "updated_at"):
        assert key in status
    store = CheckpointStore(d / "checkpoints")
    ckpts = store.scan(full=True)
    assert all(c.valid for c in ckpts)
    final = ckpts[-1]
    assert final.step == 24 and final.reason == "final"
    m = final.manifest
    assert m["config"]["lr"] == 0.02 and m["config_fingerprint"].startswith("sha256:")
    # what the model trained in (accelerator.mixed_precision), on every save, background ones too
    assert [c.manifest["mixed_precision"] for c in ckpts] == ["no"] * len(ckpts)
    assert m["world_size"] == 1 and m["micro_batch"] == 4 and m["grad_accum"] == 3 and m["registered"] == ["ema"]
    assert {f["path"] for f in m["files"]} >= {"model.safetensors", "optimizer.bin", "scheduler.bin",
                                                "random_states_0.pkl", "custom_checkpoint_0.pkl",
                                                "trainer_state.json"}
    # eval every 4 steps: the improved ones are "best" saves carrying their val_loss
    best = [c for c in ckpts if c.reason == "best"]
    assert best and all("val_loss" in c.metrics for c in best) and all(c.step % 4 == 0 for c in best)


def test_the_manifest_records_the_mixed_precision(tmp_path, monkeypatch):
    """bf16 as `accelerate launch --mixed_precision bf16` sets it: every checkpoint says so, and
    [launch] mixed_precision = "auto" reads it back on resume (supervisor/precision.py)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    code, report = run(tmp_path, "--steps", "8")
    assert code == 0, report
    ckpts = CheckpointStore(tmp_path / "checkpoints").scan(full=True)
    assert ckpts and all(c.valid for c in ckpts)
    assert [c.manifest["mixed_precision"] for c in ckpts] == ["bf16"] * len(ckpts)
    assert [c.mixed_precision for c in ckpts] == ["bf16"] * len(ckpts)


def test_signal_stops_save_and_resume_bitwise(tmp_path, reference, monkeypatch):
    d = tmp_path / "run"
    at_exit = []
    monkeypatch.setattr(atexit, "register", at_exit.append)
    code, rep = run(d, "--signal-at", "5")  # mid-accumulation (grad_accum 3): saved at the step-2 boundary
    assert code == 75 and rep["kind"] == "saved" and rep["step"] == 2 and rep["detail"] == "signal SIGUSR1"
    # the process exits fast: every object is frozen before the interpreter's final collections
    assert gc.freeze in at_exit
    monkeypatch.undo()
    assert rep["checkpoint"].endswith("step-00000002")
    assert CheckpointStore(d / "checkpoints").check(Path(rep["checkpoint"]), full=True).reason == "preempt"
    code, rep = run(d, "--signal-at", "10")  # batch 16 of 16: the epoch's last (partial) step
    assert code == 75 and rep["step"] == 6 and rep["epoch"] == 0 and rep["batch_in_epoch"] == 16, rep
    code, rep = run(d, "--signal-at", "3")  # resumes at the start of epoch 1
    assert code == 75 and rep["step"] == 7 and rep["epoch"] == 1 and rep["batch_in_epoch"] == 3
    code, rep = run(d)
    assert code == 0 and rep["kind"] == "finished"
    assert final_hash(d) == final_hash(reference)


def test_control_json_pause_request_stop_and_stop_right_after_resume(tmp_path, reference):
    d = tmp_path / "run"
    paths = RunPaths(d)
    seen_states = []

    def operator():  # what a supervisor does, from another thread
        wait_for(lambda: (read_json(paths.status) or {}).get("state") == "paused", 5.0, "paused")
        seen_states.append("paused")
        write_control(paths.control, Control(pause=False, save_seq=1))

    def on_micro(n, session, x):
        if n == 4:
            write_control(paths.control, Control(pause=True))
            threading.Thread(target=operator, daemon=True).start()
        if n == 40:
            write_control(paths.control, Control(stop=True, reason="test"))

    code, rep = run(d, "--sleep-s", "0.01", on_micro=on_micro)
    assert seen_states == ["paused"]
    assert code == 75 and rep["kind"] == "saved" and "control.json stop (test)" in rep["detail"]
    store = CheckpointStore(d / "checkpoints")
    assert any(c.reason == "request" for c in store.scan()), [c.reason for c in store.scan()]
    stopped_at = rep["step"]
    # stop still standing: the resumed run saves nothing new and points at the same checkpoint
    code, rep = run(d)
    assert code == 75 and rep["step"] == stopped_at and rep["checkpoint"].endswith(f"step-{stopped_at:08d}")
    write_control(paths.control, Control())
    code, rep = run(d)
    assert code == 0 and final_hash(d) == final_hash(reference)


def test_control_json_is_seen_at_the_next_step_boundary(tmp_path):
    """The loop reads control.json at every boundary: no waiting for the watcher thread's poll."""
    paths = RunPaths(tmp_path)

    def on_micro(n, session, x):
        if n == 4:  # in optimizer step 2 (grad_accum 3)
            write_control(paths.control, Control(save_seq=1, stop=True, reason="test"))

    code, rep = run(tmp_path, "--steps", "24", on_micro=on_micro)
    assert code == 75 and rep["step"] == 2


def test_second_request_while_saving_is_ignored(tmp_path, monkeypatch):
    real_commit = CheckpointStore.commit

    def commit_under_fire(self, *a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        return real_commit(self, *a, **kw)

    monkeypatch.setattr(CheckpointStore, "commit", commit_under_fire)
    code, rep = run(tmp_path, "--signal-at", "2")
    assert code == 75 and rep["kind"] == "saved" and rep["step"] == 1
    assert CheckpointStore(tmp_path / "checkpoints").check(Path(rep["checkpoint"]), full=True).valid


def test_config_change_refused_unless_allowed(tmp_path):
    run(tmp_path, "--signal-at", "6")
    code, rep = run(tmp_path, "--lr", "0.05", "--hidden", "16")
    # deterministic bad input: exit 2 (no traceback, no retry), the checkpoint and the keys named
    assert code == 2 and rep["kind"] == "bad_input" and "step-00000002" in rep["detail"]
    assert "lr (0.02 -> 0.05)" in rep["detail"] and "hidden (32 -> 16)" in rep["detail"]
    code, rep = run(tmp_path, "--lr", "0.05", "--allow-change", "lr")
    assert code == 0 and rep["kind"] == "finished"
    assert CheckpointStore(tmp_path / "checkpoints").latest_valid().manifest["config"]["lr"] == 0.05


def test_oom_and_error_exit_reports(tmp_path):
    code, rep = run(tmp_path / "a", "--oom-at", "4")
    assert isinstance(code, torch.OutOfMemoryError)
    assert rep["kind"] == "oom" and rep["micro_batch"] == 4 and rep["grad_accum"] == 3 and rep["code"] == 1

    def boom(n, session, x):
        if n == 2:
            raise ValueError("boom\nsecond line")

    code, rep = run(tmp_path / "b", on_micro=boom)
    assert isinstance(code, ValueError) and rep["kind"] == "error" and rep["detail"] == "ValueError: boom"


def test_oom_override_is_exact_in_samples(tmp_path, monkeypatch):
    """micro 4 x accum 3 stopped mid-epoch, resumed as micro 2 x accum 6: same sample sequence."""
    def recorder(rows):
        return lambda n, session, x: rows.extend(tuple(r.tolist()) for r in x)

    ref_rows: list = []
    run(tmp_path / "ref", "--steps", "12", on_micro=recorder(ref_rows))
    rows: list = []
    code, rep = run(tmp_path / "r", "--steps", "12", "--signal-at", "6", on_micro=recorder(rows))
    assert code == 75 and rep["step"] == 2
    monkeypatch.setenv("TRAINSUP_MICRO_BATCH", "2")
    monkeypatch.setenv("TRAINSUP_GRAD_ACCUM", "6")
    code, rep = run(tmp_path / "r", "--steps", "12", on_micro=recorder(rows))
    assert code == 0 and rep["micro_batch"] == 2 and rep["grad_accum"] == 6
    assert rows == ref_rows  # every sample once, in the same order
    # a product change would shift the samples per step: refused, naming both
    monkeypatch.delenv("TRAINSUP_MICRO_BATCH")
    monkeypatch.delenv("TRAINSUP_GRAD_ACCUM")
    run(tmp_path / "p", "--steps", "12", "--signal-at", "6")
    monkeypatch.setenv("TRAINSUP_MICRO_BATCH", "2")
    code, rep = run(tmp_path / "p", "--steps", "12")
    assert code == 2 and rep["kind"] == "bad_input" and "micro_batch*grad_accum" in rep["detail"]


def test_interval_from_the_job_file_wins(tmp_path, monkeypatch):
    """[checkpoint] interval_steps reaches the rank as TRAINSUP_CHECKPOINT_INTERVAL_STEPS."""
    monkeypatch.setenv("TRAINSUP_CHECKPOINT_INTERVAL_STEPS", "4")
    code, rep = run(tmp_path, "--steps", "12", "--save-every", "5")
    assert code == 0 and steps(tmp_path) == [4, 8, 12]


def test_corrupt_checkpoint_is_resume_failed_before_the_first_step(tmp_path, monkeypatch):
    """Flipped bytes load silently: every hash is checked while the ranks load (one read of the
    checkpoint), and a mismatch stops the run before it trains a single step on them."""
    code, rep = run(tmp_path, "--signal-at", "6")
    ckpt = Path(rep["checkpoint"])
    before = steps(tmp_path)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only the full check (every file's hash) sees it
    weights.write_bytes(bytes(data))
    loads, micro = [], []
    real_load = toy.Accelerator.load_state
    monkeypatch.setattr(toy.Accelerator, "load_state", lambda self, *a, **k: (loads.append(1), real_load(self, *a, **k)))
    code, rep = run(tmp_path, on_micro=lambda n, *_: micro.append(n))
    assert isinstance(code, session_mod.ResumeFailed)
    assert rep["kind"] == "resume_failed" and rep["checkpoint"] == str(ckpt) and "hash mismatch" in rep["detail"]
    assert loads == [1] and micro == [] and steps(tmp_path) == before  # loaded, never trained on


def test_missing_random_states_is_an_error(tmp_path):
    code, rep = run(tmp_path, "--signal-at", "6")
    ckpt = Path(rep["checkpoint"])
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != "random_states_0.pkl"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    (ckpt / "random_states_0.pkl").unlink()
    code, rep = run(tmp_path)
    assert rep["kind"] == "resume_failed" and "random_states_0.pkl is missing" in rep["detail"]


def test_resume_modes(tmp_path):
    code, rep = run(tmp_path / "a", "--resume", "latest")
    assert rep["kind"] == "error" and "holds no valid checkpoint" in rep["detail"]
    run(tmp_path / "b", "--signal-at", "6")
    code, rep = run(tmp_path / "b", "--resume", "never")
    assert rep["kind"] == "error" and "already holds checkpoints" in rep["detail"]
    # an explicit path, and TRAINSUP_RESUME_FROM (which wins over the script's choice)
    first = CheckpointStore(tmp_path / "b" / "checkpoints").latest_valid()
    code, rep = run(tmp_path / "b", "--resume", str(first.path), "--signal-at", "3")
    assert code == 75 and rep["step"] == first.step + 1


def test_older_resume_point_replaces_the_abandoned_branch(tmp_path):
    run(tmp_path, "--save-every", "2", "--signal-at", "12")  # step-2, step-4
    assert steps(tmp_path) == [2, 4]
    older = tmp_path / "checkpoints" / "step-00000002"
    code, rep = run(tmp_path, "--resume", str(older), "--lr", "0.05", "--allow-change", "lr", "--signal-at", "6")
    assert code == 75 and rep["step"] == 4
    # the step-4 of the abandoned branch (lr 0.02) was replaced, not reused
    ckpt = CheckpointStore(tmp_path / "checkpoints").check(Path(rep["checkpoint"]), full=True)
    assert ckpt.valid and ckpt.manifest["config"]["lr"] == 0.05 and ckpt.manifest["attempt"] == 0


def test_resume_skips_at_sampler_level(tmp_path, monkeypatch):
    from accelerate.data_loader import SkipBatchSampler

    run(tmp_path, "--signal-at", "12")  # 12 of 16 batches of epoch 0
    skipped = []
    real_skip = session_mod.skip_first_batches

    def spy(dl, n):
        out = real_skip(dl, n)
        skipped.append((n, out.batch_sampler))
        return out

    fetched = []
    real_getitem = torch.utils.data.TensorDataset.__getitem__
    monkeypatch.setattr(session_mod, "skip_first_batches", spy)
    monkeypatch.setattr(torch.utils.data.TensorDataset, "__getitem__",
                        lambda self, i: (fetched.append(i), real_getitem(self, i))[1])
    code, rep = run(tmp_path, "--steps", "6")
    assert code == 0
    (n, sampler), = skipped
    assert n == 12 and isinstance(sampler, SkipBatchSampler)
    # steps 5 and 6 end epoch 0: batches 13..16 (16 items) were loaded, the 12 skipped never were
    assert len(fetched) == 16


def test_retention_prunes_when_run_without_supervisor(tmp_path):
    code, rep = run(tmp_path, "--save-every", "2", "--eval-every", "0", "--keep-last", "2")
    assert code == 0
    assert steps(tmp_path) == [22, 24]


def test_supervisor_gone_saves_and_exits(tmp_path, monkeypatch):
    sup = subprocess.Popen(["sleep", "60"])
    monkeypatch.setenv("TRAINSUP_SUPERVISOR_PID", str(sup.pid))

    def kill_supervisor(n, session, x):
        if n == 3:
            sup.kill()
            sup.wait()

    code, rep = run(tmp_path, "--sleep-s", "0.05", "--save-every", "1", "--keep-last", "1", on_micro=kill_supervisor)
    assert code == 75 and rep["kind"] == "saved" and f"supervisor pid {sup.pid} is gone" in rep["detail"]
    assert len(steps(tmp_path)) > 1  # under a supervisor, retention is the supervisor's job


def test_bad_setup_errors_name_the_fix(tmp_path):
    from accelerate import Accelerator

    with pytest.raises(session_mod.SessionError, match="use_seedable_sampler=True"):
        session_mod.TrainSession(Accelerator(), max_steps=1, run_dir=tmp_path)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    from accelerate.utils import DataLoaderConfiguration

    acc = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    with pytest.raises(session_mod.SessionError, match="max_steps=N or max_epochs=N"):
        session_mod.TrainSession(acc, run_dir=tmp_path)
    with pytest.raises(session_mod.SessionError, match=r"save_every_steps=...\) must be an integer >= 0"):
        session_mod.TrainSession(acc, max_steps=1, save_every_steps=-1, run_dir=tmp_path)
    # an eval loader may have any batch size; the training loader must match micro_batch
    session = session_mod.TrainSession(acc, max_steps=1, micro_batch=4, run_dir=tmp_path / "bs")
    data = torch.utils.data.TensorDataset(torch.zeros(16, 1))
    train_dl, eval_dl = session.prepare(torch.utils.data.DataLoader(data, batch_size=8),
                                        torch.utils.data.DataLoader(data, batch_size=16))
    with pytest.raises(session_mod.SessionError, match="batch_size is 8 but session.micro_batch is 4"):
        with session:
            next(iter(session.batches(train_dl)))
    assert read_json(tmp_path / "bs" / "ranks" / "exit-0.json")["kind"] == "error"
    os.environ["TRAINSUP_MICRO_BATCH"] = "x"
    try:
        with pytest.raises(session_mod.SessionError, match="TRAINSUP_MICRO_BATCH='x' must be a positive integer"):
            session_mod.TrainSession(acc, max_steps=1, micro_batch=4, run_dir=tmp_path)
    finally:
        del os.environ["TRAINSUP_MICRO_BATCH"]


def test_manifest_and_trainer_state_carry_the_same_position(reference):
    """Both files are written from one Position: every key they share has the same value."""
    ckpts = CheckpointStore(reference / "checkpoints").scan()
    assert ckpts
    for c in ckpts:
        state = json.loads((c.path / "trainer_state.json").read_text())
        shared = {"epoch", "batch_in_epoch", "samples_in_epoch", "epoch_complete", "micro_batch", "grad_accum",
                  "world_size", "tokens_seen", "samples_seen", "registered", "config", "config_fingerprint"}
        assert {k: c.manifest[k] for k in shared} == {k: state[k] for k in shared}, c.path.name
        assert c.manifest["step"] == state["global_step"] == c.step


def test_collectives_in_one_process_are_the_identity():
    from train_core.collectives import Collectives

    one = Collectives(1, torch.device("cpu"))
    assert not one.active
    box = {"a": 1}
    assert one.broadcast(box) is box
    assert one.all_max([0, 3, 1]) == [0, 3, 1] and one.all_sum([2, 5]) == [2, 5]
    assert one.all_ok(True) and not one.all_ok(False)


def test_a_position_this_micro_batch_cannot_reach_is_bad_input_not_a_broken_checkpoint(tmp_path):
    """6 samples into the epoch cannot be reached with micro_batch 4: ConfigMismatch (exit 2),
    never resume_failed (which would set a good checkpoint aside); a malformed file is."""
    from train_core.resume import restore_position

    state = {"global_step": 3, "epoch": 0, "samples_in_epoch": 6, "micro_batch": 2}
    assert restore_position(tmp_path, state, micro_batch=2, world_size=1).skip_batches == 3
    with pytest.raises(ConfigMismatch, match="not a multiple of micro_batch"):
        restore_position(tmp_path, state, micro_batch=4, world_size=1)
    with pytest.raises(session_mod.ResumeFailed, match="trainer_state.json is malformed"):
        restore_position(tmp_path, {"global_step": 3}, micro_batch=4, world_size=1)
    done = restore_position(tmp_path, {**state, "epoch_complete": True}, micro_batch=4, world_size=1)
    assert (done.epoch, done.skip_batches) == (1, 0)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(torch.arange(10))


def test_dataloader_takes_a_stream_without_arguments(tmp_path):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from train_core.errors import SessionError
    from train_core.session import TrainSession

    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    session = TrainSession(acc, config={}, max_steps=1, micro_batch=4, run_dir=tmp_path / "run")
    dl = session.dataloader(_Stream())  # torch alone: "expected unspecified shuffle option"
    assert [b.tolist() for b in dl] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # the stream's own order
    with pytest.raises(SessionError, match="shuffle=True.*_Stream is an IterableDataset.*shuffle inside the dataset"):
        session.dataloader(_Stream(), shuffle=True)
    mapped = session.dataloader(torch.utils.data.TensorDataset(torch.arange(64)))  # map-style: shuffled
    assert [int(x) for b in mapped for x in b[0]] != list(range(64))
    assert sorted(int(x) for b in mapped for x in b[0]) == list(range(64))
