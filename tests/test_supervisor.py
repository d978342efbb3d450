"""Supervisor pieces in-process: watcher decisions (test double), signals, launch command, lock, CLI output."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from supervisor.runner import launch as L
from supervisor.runner import procs
from supervisor.cli import main
from supervisor.cli.console import Console
from supervisor.cli.status import collect_status
from supervisor.config import load_job
from supervisor.errors import LockedError
from supervisor.events import EventLog, read_events
from supervisor.rundir import acquire_run_lock
from supervisor.runner import Runner, State
from supervisor.watch import Action, Decision
from supervisor_helpers import QuietWatcher, events, read_json, run_processes, write_job
from train_core import runfiles
from train_core.store import CheckpointStore


def fast_job(tmp_path, args, **sections):
    sections.setdefault("launch", {})["launcher"] = "python"
    return load_job(write_job(tmp_path, args, **sections))


class ScriptedWatcher:
    """A test double of supervisor.watch.Watcher: PAUSE, RESUME+NOTE, SAVE, STOP then block, by step."""

    name = "scripted"

    def __init__(self, run_dir: Path) -> None:
        self.status_path = run_dir / "status.json"
        self.phase = 0
        self.t = 0.0
        self.paused_steps: list[int] = []
        self.block_until: float | None = None
        self.checkpoints: list[int] = []
        self.closed = False

    def poll(self, now):
        st = read_json(self.status_path) or {}
        step = st.get("step", -1)
        if self.phase == 0 and step >= 5:
            self.phase, self.t = 1, now
            return [Decision(Action.PAUSE, "test_pause", "paused by the test")]
        if self.phase == 1:
            if st.get("state") == "paused":
                self.paused_steps.append(step)
            if now - self.t > 1.0 and self.paused_steps:
                self.phase = 2
                return [Decision(Action.RESUME, "test_resume", "resumed by the test"),
                        Decision(Action.NOTE, "test_note", "just a note", {"temp_c": 42})]
        if self.phase == 2 and step >= 15:
            self.phase = 3
            return [Decision(Action.SAVE, "test_save", "save please")]
        if self.phase == 3 and step >= 25:
            self.phase, self.block_until = 4, now + 1.0
            return [Decision(Action.STOP, "test_stop", "too hot")]
        return []

    def blocking_reason(self, now):
        return "still too hot" if self.block_until and now < self.block_until else None

    def on_checkpoint(self, step, now):
        self.checkpoints.append(step)

    def status(self):
        return {"phase": self.phase}

    def close(self):
        self.closed = True


@pytest.mark.slow  # seconds of real processes: out of the fast lane
def test_watcher_decisions_drive_the_run(tmp_path):
    job = fast_job(tmp_path, ["--steps", "40", "--step-time", "0.03", "--heartbeat-s", "0.1"],
                   retention={"keep_last": 10})
    w = ScriptedWatcher(job.run_dir)
    assert Runner(job, watchers=[w], install_signals=False).run() == 0
    ev = events(job.run_dir)
    names = [e["event"] for e in ev]
    for name in ("test_pause", "test_resume", "test_note", "test_save", "test_stop"):
        assert name in names
    # paused at a step boundary: the step did not move while paused
    assert len(set(w.paused_steps)) == 1 and w.paused_steps[0] >= 5
    note = next(e for e in ev if e["event"] == "test_note")
    assert note["details"] == {"temp_c": 42} and note["watcher"] == "scripted" and note["action"] == "note"
    store = CheckpointStore(job.run_dir / "checkpoints")
    reasons = {c.step: c.reason for c in store.scan()}
    assert "request" in reasons.values() and "preempt" in reasons.values() and reasons[40] == "final"
    assert w.checkpoints == sorted(reasons)  # on_checkpoint saw every commit, in order
    states = [(e.get("from"), e["to"]) for e in ev if e["event"] == "state"]
    assert ("stopping", "waiting") in states and ("waiting", "starting") in states
    waiting = next(e for e in ev if e["event"] == "state" and e["to"] == "waiting")
    assert waiting["cause"] == "not restarting after saved on a watcher's request: scripted: still too hot"
    exits = [e["kind"] for e in ev if e["event"] == "attempt_exit"]
    assert exits == ["saved", "finished"]
    start2 = [e for e in ev if e["event"] == "state" and e["to"] == "starting"][1]
    assert start2["resume_from"].endswith(f"step-{max(s for s, r in reasons.items() if r == 'preempt'):08d}")
    sup = read_json(job.run_dir / "supervisor.json")
    assert sup["state"] == "exited" and sup["watchers"] == {"scripted": {"phase": 4}} and sup["exit_code"] == 0
    assert w.closed


class SignalAt(QuietWatcher):
    """Injects stop signals into the runner's queue, as its signal handler would."""

    name = "signals"

    def __init__(self, runner_box, run_dir, times, when=None):
        self.box, self.status_path, self.times = runner_box, run_dir / "status.json", list(times)
        self.when = when or (lambda runner, st: st.get("step", -1) >= 5)
        self.t0 = None

    def poll(self, now):
        st = read_json(self.status_path) or {}
        if self.t0 is None and self.when(self.box[0], st):
            self.t0 = now
        while self.t0 is not None and self.times and now - self.t0 >= self.times[0][0]:
            self.box[0].enqueue_signal(self.times.pop(0)[1])
        return []


def test_second_ctrl_c_stops_at_once(tmp_path):
    job = fast_job(tmp_path, ["--steps", "1000", "--step-time", "0.02", "--ignore-stop"], stop={"grace_s": 30.0})
    box = []
    runner = Runner(job, watchers=[SignalAt(box, job.run_dir, [(0, signal.SIGINT), (0.3, signal.SIGINT)])],
                    install_signals=False)
    box.append(runner)
    t0 = time.monotonic()
    assert runner.run() == 128 + signal.SIGINT
    assert time.monotonic() - t0 < 15  # far below grace_s=30
    names = [e["event"] for e in events(job.run_dir)]
    assert names.count("stop_requested") == 1 and "stop_now" in names
    assert [e["signal"] for e in events(job.run_dir) if e["event"] == "escalate"][0] == "SIGKILL"
    assert run_processes(job.run_dir) == []


def test_stop_during_backoff_exits_with_checkpoint(tmp_path):
    job = fast_job(tmp_path, ["--steps", "100", "--step-time", "0.01", "--save-every", "5", "--crash-at", "12"],
                   restart={"backoff_initial_s": 30.0, "backoff_max_s": 30.0})
    box = []
    in_backoff = SignalAt(box, job.run_dir, [(0.5, signal.SIGTERM)], when=lambda r, st: r.state == State.BACKOFF)
    runner = Runner(job, watchers=[in_backoff], install_signals=False)
    box.append(runner)
    assert runner.run() == 75
    last = [e for e in events(job.run_dir) if e["event"] == "state"][-1]
    assert last["from"] == "backoff" and last["to"] == "exited"
    assert "newest checkpoint step 10" in last["cause"]


@pytest.mark.slow  # seconds of real processes: out of the fast lane
def test_resume_failed_falls_back_to_previous_checkpoint(tmp_path):
    job = fast_job(tmp_path, ["--steps", "30", "--step-time", "0.01", "--save-every", "10",
                              "--resume-fail-from", "20"])
    store = CheckpointStore(job.run_dir / "checkpoints")
    for step in (10, 20):  # two valid checkpoints from an earlier run
        tmp = store.begin(step)
        (tmp / "weights.json").write_text(json.dumps([0.5] * 8))
        store.commit(tmp, step, epoch=0, batch_in_epoch=step, reason="interval")
    assert Runner(job, install_signals=False).run() == 0
    ev = events(job.run_dir)
    starts = [e["resume_from"] for e in ev if e["event"] == "state" and e["to"] == "starting"]
    assert [Path(s).name for s in starts] == ["step-00000020", "step-00000010"]
    assert [e["kind"] for e in ev if e["event"] == "attempt_exit"] == ["resume_failed", "finished"]
    fallback = next(e for e in ev if e["event"] == "resume_fallback")
    assert Path(fallback["moved_to"]).name.startswith("failed-step-00000020-")  # kept as evidence, not listed
    assert Path(fallback["moved_to"]).is_dir()
    assert [c.step for c in store.scan()][-1] == 30


def test_retention_prunes_after_commits_keeping_resume_source(tmp_path):
    job = fast_job(tmp_path, ["--steps", "60", "--step-time", "0.005", "--save-every", "5"],
                   retention={"keep_last": 2, "keep_best": 0})
    assert Runner(job, install_signals=False).run() == 0
    steps = [c.step for c in CheckpointStore(job.run_dir / "checkpoints").scan()]
    assert steps[-1] == 60 and len(steps) <= 3  # keep_last=2 (+ final kept by keep_final)
    assert any(e["event"] == "prune" for e in events(job.run_dir))


def test_run_lock_names_the_holder(tmp_path):
    lock = acquire_run_lock(tmp_path)
    try:
        with pytest.raises(LockedError, match=f"locked by another supervisor \\(pid {os.getpid()}\\)") as e:
            acquire_run_lock(tmp_path)
        assert e.value.exit_code == 4
    finally:
        lock.release()
    acquire_run_lock(tmp_path).release()


# --------------------------------------------------------------------------- launch command


def test_build_launch_cpu_multi_rank_recipe(tmp_path):
    job = load_job(write_job(tmp_path, ["--x"], launch={"num_processes": 2}, stop={"grace_s": 50.0}))
    plan = L.build_launch(job, attempt=3, resume_from=tmp_path / "ck", supervisor_pid=123,
                          base_env={"PATH": "/bin", "TRAINSUP_RESUME_FROM": "stale"}, port=29999)
    argv = list(plan.argv)
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    for flag, value in [("--num_processes", "2"), ("--num_machines", "1"), ("--mixed_precision", "no"),
                        ("--dynamo_backend", "no"), ("--main_process_port", "29999")]:
        assert argv[argv.index(flag) + 1] == value
    assert "--multi_gpu" in argv and "--cpu" not in argv
    assert argv[-2:] == [str(job.train.script), "--x"]
    env = plan.env
    assert env["ACCELERATE_USE_CPU"] == "1"
    assert env["TRAINSUP_RUN_DIR"] == str(job.run_dir) and env["TRAINSUP_ATTEMPT"] == "3"
    assert env["TRAINSUP_CHECKPOINT_DIR"] == str(job.run_dir / "checkpoints")
    assert env["TRAINSUP_RESUME_FROM"] == str(tmp_path / "ck") and env["TRAINSUP_SUPERVISOR_PID"] == "123"
    assert env["TRAINSUP_SAVE_SIGNAL"] == "SIGUSR1"
    assert int(env["PET_SHUTDOWN_TIMEOUT"]) > 50 and env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == env["PET_SHUTDOWN_TIMEOUT"]
    assert plan.world_size_local == 2
    fresh = L.build_launch(job, attempt=1, resume_from=None, supervisor_pid=1,
                           base_env={"TRAINSUP_RESUME_FROM": "stale"})
    assert "TRAINSUP_RESUME_FROM" not in fresh.env


def test_build_launch_attempt_env_wins_over_train_env(tmp_path):
    """An OOM back-off must not be undone by a micro-batch the user pinned in [train] env."""
    job = load_job(write_job(tmp_path, []), ['train.env={ TRAINSUP_MICRO_BATCH = "8", OMP_NUM_THREADS = "1" }'])
    plan = L.build_launch(job, attempt=2, resume_from=None, supervisor_pid=1, base_env={"OMP_NUM_THREADS": "4"},
                          attempt_env={"TRAINSUP_MICRO_BATCH": "4", "TRAINSUP_GRAD_ACCUM": "2"})
    assert plan.env["TRAINSUP_MICRO_BATCH"] == "4" and plan.env["TRAINSUP_GRAD_ACCUM"] == "2"
    assert plan.env["OMP_NUM_THREADS"] == "1"  # [train] env still wins over the supervisor's own env


def test_build_launch_single_cpu_and_config_file(tmp_path):
    job = load_job(write_job(tmp_path, [], launch={"num_processes": 1, "direct": False}))
    argv = list(L.build_launch(job, attempt=1, resume_from=None, supervisor_pid=1, base_env={}).argv)
    assert "--cpu" in argv and "--multi_gpu" not in argv and "ACCELERATE_USE_CPU" not in argv
    cfg = tmp_path / "acc.yaml"
    cfg.write_text("num_processes: 4\n")
    job = load_job(write_job(tmp_path, [], launch={"cpu": False, "config_file": str(cfg)}))
    argv = list(L.build_launch(job, attempt=1, resume_from=None, supervisor_pid=1, base_env={}).argv)
    assert argv[argv.index("--config_file") + 1] == str(cfg)
    assert "--mixed_precision" not in argv and "--dynamo_backend" not in argv


def test_child_gets_default_signals_and_own_session(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, signal, json\n"
        "print(json.dumps({'sid': os.getsid(0), 'pgid': os.getpgrp(), 'pid': os.getpid(),\n"
        " 'int': signal.getsignal(signal.SIGINT) == signal.default_int_handler,\n"
        " 'term': signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,\n"
        " 'usr': [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGUSR1, signal.SIGUSR2)],\n"
        " 'mask': sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))}))\n")
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a non-interactive shell job
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    try:
        child = procs.spawn(L.LaunchPlan((sys.executable, str(probe)), dict(os.environ), 1), tmp_path / "out.log")
        child.popen.wait(30)
    finally:
        signal.signal(signal.SIGINT, old)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
    info = json.loads((tmp_path / "out.log").read_text())
    assert info["sid"] == info["pgid"] == info["pid"] == child.pid
    assert info["int"] and info["term"] and info["mask"] == []
    assert info["usr"] == [True, True]  # a save request before the rank's handler must not kill it


# --------------------------------------------------------------------------- CLI


def test_every_command_has_help():
    runner = CliRunner()
    for name in ("run", "validate", "status"):
        r = runner.invoke(main, [name, "--help"])
        assert r.exit_code == 0 and "Example:" in r.output, name


def test_validate_ok_and_bad(tmp_path):
    job = write_job(tmp_path, ["--steps", "5"])
    r = CliRunner().invoke(main, ["validate", str(job)])
    assert r.exit_code == 0 and r.output.startswith(f"{job}: OK\n  script:     ")
    assert "\n  gpu:        not watched: a CPU job\n" in r.output  # write_job's jobs run on the CPU
    assert "\n  power:      enabled=True, on_battery=continue, min_percent=10.0," in r.output
    r = CliRunner().invoke(main, ["validate", str(job), "--set", "stop.grace_s=-1"])
    assert r.exit_code == 2
    assert r.output == "Error: job.toml: [stop] grace_s must be > 0.0 (time for ranks to save), got -1\n"


def test_status_of_a_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    paths = runfiles.RunPaths(run_dir)
    run_dir.mkdir()
    store = CheckpointStore(paths.checkpoints)
    tmp = store.begin(120)
    (tmp / "model.safetensors").write_bytes(b"x")
    store.commit(tmp, 120, epoch=1, batch_in_epoch=20, reason="interval")
    runfiles.write_json_atomic(paths.status, {"attempt": 2, "state": "training", "step": 140, "max_steps": 300,
                                              "loss": 2.31, "tokens_per_s": 12345.6, "updated_at": time.time()})
    runfiles.write_json_atomic(paths.supervisor, {"state": "running", "pid": os.getpid(), "attempt": 2,
                                                  "restarts": 1, "watchers": {}})
    log = EventLog(paths.events)
    log.append("checkpoint", 1_700_000_000.0, step=120, reason="interval")
    log.close()
    r = CliRunner().invoke(main, ["status", str(run_dir)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1] == f"supervisor:      running (pid {os.getpid()})"
    assert lines[2] == "state:           running"
    assert lines[3] == "attempt:         2 (restarts: 1)"
    assert lines[4].startswith("step:            140/300  loss 2.3100  tokens/s 12,346")
    assert lines[5] == f"last checkpoint: step 120 (interval) {paths.checkpoints / 'step-00000120'}"
    assert lines[6].endswith("checkpoint step=120 reason=interval")
    r = CliRunner().invoke(main, ["status", str(run_dir), "--json"])
    st = json.loads(r.output)
    assert st["step"] == 140 and st["last_checkpoint"]["step"] == 120 and st["supervisor_running"] is True
    r = CliRunner().invoke(main, ["status", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "nope: no such directory; pass an existing RUN_DIR or JOB.toml" in r.output


def test_status_of_a_job_that_never_ran(tmp_path):
    """One run-dir resolution, one deliberate difference: `status` of a job whose run dir does
    not exist yet answers "never run"; the checkpoint commands have nothing to show and exit 2."""
    job = write_job(tmp_path, [])
    run_dir = load_job(job).run_dir
    assert not run_dir.exists()
    r = CliRunner().invoke(main, ["status", str(job)])
    assert r.exit_code == 0 and "state:           never run" in r.output
    assert not run_dir.exists()  # looking creates nothing
    r = CliRunner().invoke(main, ["checkpoints", "list", str(job)])
    assert r.exit_code == 2 and "the job has not run yet" in r.output
    run_dir.mkdir()
    st = collect_status(run_dir)
    assert st["state"] == "never run" and st["supervisor_running"] is False


def test_console_plain_and_tty():
    out = io.StringIO()
    c = Console(out, tty=False, plain_every_s=1000)
    c.child_output("[rank0]:hello")
    c.progress({"state": "running", "attempt": 1, "step": 3, "restarts": 0})
    c.progress({"state": "running", "attempt": 1, "step": 4, "restarts": 0})
    assert out.getvalue() == ("[rank0]:hello\n[trainsup] running attempt 1 | step 3 | loss - | tok/s - | "
                              "ckpt - | restarts 0\n")
    out = io.StringIO()
    c = Console(out, tty=True)
    c.progress({"state": "running", "attempt": 1, "step": 3, "restarts": 0})
    c.child_output("line")
    assert out.getvalue().endswith("\r\x1b[Kline\nrunning attempt 1 | step 3 | loss - | tok/s - | ckpt - | restarts 0")


def test_read_events_skips_torn_line(tmp_path):
    log = EventLog(tmp_path / "e.jsonl", durable=False)
    log.append("a", 1.0, x=1)
    log.close()
    with open(tmp_path / "e.jsonl", "a") as f:
        f.write('{"ts": 2, "ev')
    assert [e["event"] for e in read_events(tmp_path / "e.jsonl")] == ["a"]


def test_watcher_status_lines():
    from supervisor.cli.status import watcher_summary

    assert watcher_summary({"available": False, "reason": "no D-Bus system bus"}) == "unavailable: no D-Bus system bus"
    assert watcher_summary({"summary": "on battery 40%", "blocking": "on battery"}) == \
        "on battery 40% (waiting: on battery)"
    assert watcher_summary({"available": True, "lock_held": True, "budget_s": 4.5, "pending": "sleep"}) == \
        "inhibitor held, delay budget 4.5 s, waiting for a checkpoint before sleep"
    assert watcher_summary({"x": 1}) == '{"x": 1}'
