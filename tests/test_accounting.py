"""supervisor/accounting.py on run dirs written by the test, with known durations per cause: a
crash past the last checkpoint (steps recomputed), an OOM back-off, a thermal pause, a sleep,
a preempting stop, a clean exit and a later restart (off time), waiting for power; a
supervisor SIGKILLed mid-attempt; runs without a supervisor; missing and bad files. Then
`trainsup status` (text, --json, --watch) on them."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from supervisor import accounting
from supervisor.accounting import CATEGORIES, LOST, STOP_CAUSES, account
from supervisor.cli import main
from supervisor.cli import status as status_mod
from supervisor_helpers import run_cli, write_job

T0 = 1_800_000_000.0
STEP = 1.0


class RunDir:
    """events.jsonl and metrics.jsonl as the supervisor and a TrainSession write them, times
    relative to T0."""

    def __init__(self, d: Path) -> None:
        self.d = d
        d.mkdir(parents=True, exist_ok=True)
        self.events: list[dict] = []
        self.metrics: list[dict] = []
        self.t = 0.0

    def ev(self, t: float, name: str, **fields) -> None:
        iso = dt.datetime.fromtimestamp(T0 + t, dt.timezone.utc).isoformat(timespec="milliseconds")
        self.events.append({"ts": round(T0 + t, 3), "time": iso, "event": name, **fields})

    def rec(self, t: float, kind: str, step: int, attempt: int, **fields) -> None:
        self.metrics.append({"kind": kind, "step": step, "ts": T0 + t, "attempt": attempt, **fields})

    def steps(self, attempt: int, first: int, last: int) -> None:
        for s in range(first, last + 1):
            self.t += STEP
            self.rec(self.t, "step", s, attempt, loss=1.0 / s)

    def save(self, attempt: int, step: int, blocked: float, reason: str = "interval", event: bool = True) -> None:
        self.t += blocked
        self.rec(self.t, "save", step, attempt, blocked_s=blocked, reasons=[reason], background=False)
        if event:
            self.ev(self.t, "checkpoint", step=step, reason=reason, attempt=attempt,
                    path=str(self.d / "checkpoints" / f"step-{step:08d}"))

    def start(self, t: float, attempt: int, resume: int | None) -> None:
        # as the supervisor writes it: null on a fresh start
        extra = {"resume_from": str(self.d / "checkpoints" / f"step-{resume:08d}") if resume else None}
        self.ev(t, "state", to="starting", cause=f"attempt {attempt}", attempt=attempt, **extra)

    def write(self, junk: bool = True) -> None:
        lines = [json.dumps(e) for e in self.events]
        mlines = [json.dumps(m) for m in self.metrics]
        if junk:  # untrusted files: none of these may count or break anything
            mlines[3:3] = ["not json", json.dumps({"kind": "step", "step": "7", "ts": T0}), json.dumps([1, 2]),
                           json.dumps({"kind": "step", "step": 3, "ts": "x"}), json.dumps({"kind": "nope", "step": 1,
                                                                                           "ts": T0})]
            lines[2:2] = ["{torn", json.dumps({"event": "state", "ts": "soon"})]
        (self.d / "events.jsonl").write_text("\n".join(lines) + "\n" + ('{"ts": 1, "ev' if junk else ""))
        (self.d / "metrics.jsonl").write_text("\n".join(mlines) + "\n" + ('{"kind": "st' if junk else ""))


def first_attempt(d: Path, last_step: int, *, pid: int = 1) -> RunDir:
    """A supervisor starts attempt 1 fresh at t=0; 1 s start-up, then steps 1..last_step (1 s each)."""
    r = RunDir(d)
    r.ev(0.0, "supervisor_start", pid=pid)
    r.start(0.0, 1, None)
    r.t = 1.0
    r.steps(1, 1, last_step)
    return r


def manifest(d: Path, step: int, t: float, attempt: int, reason: str) -> None:
    ck = d / "checkpoints" / f"step-{step:08d}"
    ck.mkdir(parents=True)
    iso = dt.datetime.fromtimestamp(T0 + t, dt.timezone.utc).isoformat(timespec="milliseconds")
    (ck / "manifest.json").write_text(json.dumps({"format": 2, "step": step, "epoch": 0, "batch_in_epoch": step,
                                                  "created_at": iso, "files": [], "reason": reason,
                                                  "attempt": attempt}))


def eventful_run(d: Path) -> RunDir:
    """Two supervisors, four attempts; the durations the test expects back are in comments."""
    r = RunDir(d)
    r.ev(0.0, "supervisor_start", pid=1)
    # attempt 1: 1 s start-up (restart), steps 1-5, a 0.5 s save (checkpoint 5), steps 6-8, then a
    # crash that takes 0.3 s to end the process (exit); steps 6-8 are recomputed (3 s)
    r.start(0.0, 1, None)
    r.t = 1.0
    r.steps(1, 1, 5)
    r.save(1, 5, 0.5)
    r.steps(1, 6, 8)
    r.ev(9.8, "attempt_exit", attempt=1, kind="error", detail="rank 0 failed: RuntimeError", step=8, duration_s=9.8)
    r.ev(9.8, "state", to="backoff", cause="restart in 1.0 s", attempt=1)
    # attempt 2: 1 s backoff + 1.5 s start-up (restart), steps 6-9 (recomputed, 4 s), out of memory,
    # 0.2 s to end (exit)
    r.start(10.8, 2, 5)
    r.t = 12.3
    r.steps(2, 6, 9)
    r.ev(16.5, "attempt_exit", attempt=2, kind="oom", detail="rank 0 ran out of memory", step=9, duration_s=5.7)
    r.ev(16.5, "oom_backoff", attempt=2, changed=True, new={"micro_batch": 8, "grad_accum": 2})
    r.ev(16.5, "state", to="backoff", cause="restart in 1.0 s", attempt=2)
    # attempt 3: 1 s backoff + 0.5 s start-up (restart), steps 6-10, a save (0.5 s), a thermal pause
    # of 4 s, steps 11-12, the system goes to sleep: a save (0.5 s), asleep 100 s, steps 13-15, SIGTERM,
    # step 16, the stop's save (0.5 s), 0.3 s to end (exit), and the supervisor exits 0.1 s later (exit)
    r.start(17.5, 3, 5)
    r.t = 18.0
    r.steps(3, 6, 10)
    r.save(3, 10, 0.5)
    r.ev(23.5, "thermal_pause", watcher="gpu", action="pause", reason="GPU 0 is at 88 C")
    r.ev(27.5, "thermal_resume", watcher="gpu", action="resume", reason="GPU 0 is at 74 C")
    r.t = 27.5
    r.rec(27.5, "pause", 10, 3, paused_s=4.0)
    r.steps(3, 11, 12)
    r.ev(29.5, "prepare_for_sleep", watcher="logind", action="save", reason="the system is going to sleep")
    r.save(3, 12, 0.5, "request")
    r.ev(130.0, "resumed_from_sleep", watcher="logind", action="note", reason="the system woke up")
    r.t = 130.0
    r.steps(3, 13, 15)
    r.ev(133.2, "stop_requested", signal="SIGTERM")
    r.ev(133.2, "state", to="stopping", cause="SIGTERM received: save and stop", attempt=3)
    r.steps(3, 16, 16)
    r.save(3, 16, 0.5, "preempt")
    r.ev(134.8, "attempt_exit", attempt=3, kind="saved", detail="ranks saved", step=16, duration_s=117.3)
    r.ev(134.8, "state", to="exited", cause="stopped on SIGTERM", attempt=3)
    r.ev(134.9, "supervisor_exit", exit_code=75)
    # off until a person starts it again (65.1 s, not the run's); then 3 s waiting for AC power
    r.ev(200.0, "supervisor_start", pid=2)
    r.ev(200.0, "state", to="waiting", cause="not starting: on battery")
    # attempt 4: 1 s start-up, steps 17-20, the final save (0.5 s), 0.2 + 0.1 s exit
    r.start(203.0, 4, 16)
    r.t = 204.0
    r.steps(4, 17, 20)
    r.save(4, 20, 0.5, "final")
    r.ev(208.7, "attempt_exit", attempt=4, kind="finished", detail="every rank finished", step=20, duration_s=5.7)
    r.ev(208.7, "state", to="exited", cause="training finished", attempt=4)
    r.ev(208.8, "supervisor_exit", exit_code=0)
    r.write()
    return r


EXPECTED_LOST = {"saving": 2.5, "exit": 1.2, "restart": 6.0, "recomputed": 7.0, "paused": 4.0, "waiting": 3.0}


def test_injected_durations_come_back_by_cause(tmp_path):
    eventful_run(tmp_path)
    acc = account(tmp_path, live=False)
    assert acc.productive_s == pytest.approx(20.0, abs=1e-3)  # steps 1-5 (a1), 6-16 (a3), 17-20 (a4)
    assert acc.lost_s == pytest.approx(EXPECTED_LOST, abs=1e-3)
    assert set(acc.lost_s) == set(LOST)
    assert acc.asleep_s == pytest.approx(100.0, abs=1e-3)
    assert acc.off_s == pytest.approx(65.1, abs=1e-3)
    assert acc.wall_s == pytest.approx(208.8 - 65.1, abs=1e-3)
    assert acc.wall_s == pytest.approx(acc.productive_s + sum(acc.lost_s.values()) + acc.asleep_s, abs=1e-6)
    assert acc.goodput == pytest.approx(20.0 / (143.7 - 100.0), abs=1e-4)
    assert (acc.final_step, acc.steps_in_history, acc.steps_recomputed) == (20, 20, 7)
    assert acc.attempts == 4 and not acc.live

    stops = [(round(s["ts"] - T0, 3), s["step"], s["cause"], s["kind"]) for s in acc.stops]
    assert stops == [(9.8, 8, "crash", "stop"), (16.5, 9, "oom", "stop"), (23.5, 10, "thermal", "pause"),
                     (29.5, 12, "sleep", "sleep"), (133.2, 16, "preempt", "stop")]
    assert all(s["cause"] in STOP_CAUSES for s in acc.stops)
    assert [(c["step"], round(c["ts"] - T0, 3)) for c in acc.checkpoints] == [
        (5, 6.5), (10, 23.5), (12, 30.0), (16, 134.5), (20, 208.5)]

    # the segments cover the wall clock but the off time, in order, each one category
    segs = acc.segments
    assert all(c in CATEGORIES for _, _, c in segs)
    assert all(a < b for a, b, _ in segs) and all(x[1] <= y[0] for x, y in zip(segs, segs[1:]))
    gaps = [(round(x[1] - T0, 3), round(y[0] - T0, 3)) for x, y in zip(segs, segs[1:]) if y[0] > x[1]]
    assert gaps == [(134.9, 200.0)]
    assert (segs[0][0] - T0, segs[-1][1] - T0) == pytest.approx((0.0, 208.8))
    by_cat = {c: sum(b - a for a, b, cc in segs if cc == c) for c in CATEGORIES}
    assert by_cat["training"] == pytest.approx(acc.productive_s)
    assert [c for a, b, c in segs if a - T0 < 31 and b - T0 > 29] == ["training", "saving", "asleep"]

    d = acc.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["goodput"] == pytest.approx(acc.goodput, abs=1e-4) and len(d["segments"]) == len(segs)
    assert set(d) >= {"productive_s", "wall_s", "lost_s", "asleep_s", "goodput", "segments", "stops", "checkpoints"}


def test_supervisor_sigkilled_mid_attempt(tmp_path):
    """No attempt_exit, no supervisor_exit: the attempt ends at the last sign of it (its ranks saved
    on their own: the manifest), the time until the next supervisor is restart, not off."""
    r = RunDir(tmp_path)
    r.ev(0.0, "supervisor_start", pid=1)
    r.start(0.0, 1, None)
    r.ev(1.0, "state", to="running", cause="first heartbeat", attempt=1)
    r.t = 1.0
    r.steps(1, 1, 6)
    r.save(1, 6, 0.5, event=False)
    r.steps(1, 7, 10)  # the supervisor was SIGKILLed meanwhile: no more events from it
    r.save(1, 10, 0.5, "preempt", event=False)  # its ranks saw it gone and saved (t = 12.0)
    manifest(tmp_path, 10, r.t, 1, "preempt")
    (tmp_path / "status.json").write_text(json.dumps({"attempt": 1, "step": 10, "updated_at": T0 + 11.9}))
    r.ev(20.0, "supervisor_start", pid=2)
    r.start(20.0, 2, 10)
    r.t = 21.0
    r.steps(2, 11, 12)
    r.save(2, 12, 0.5, "final")
    r.ev(23.6, "attempt_exit", attempt=2, kind="finished", step=12, duration_s=3.6)
    r.ev(23.7, "supervisor_exit", exit_code=0)
    r.write()
    acc = account(tmp_path, live=False)
    assert acc.productive_s == pytest.approx(12.0, abs=1e-3)
    assert acc.lost_s["saving"] == pytest.approx(1.5, abs=1e-3)
    assert acc.lost_s["restart"] == pytest.approx(1.0 + 8.0 + 1.0, abs=1e-3)  # start-up, the dead gap, start-up
    assert acc.lost_s["exit"] == pytest.approx(0.1 + 0.1, abs=1e-3)
    assert acc.off_s == 0 and acc.lost_s["recomputed"] == 0
    assert acc.wall_s == pytest.approx(23.7, abs=1e-3)
    [stop] = acc.stops
    assert (stop["cause"], stop["step"], round(stop["ts"] - T0, 3)) == ("crash", 10, 12.0)
    assert "supervisor" in stop["detail"]
    assert [c["step"] for c in acc.checkpoints] == [10, 12]  # 10 from its manifest: no event for it


def test_a_stop_that_could_not_save_keeps_none_of_its_steps(tmp_path):
    r = first_attempt(tmp_path, 10)
    r.ev(11.0, "stop_requested", signal="SIGTERM")
    r.ev(11.5, "stop_unsaved", attempt=1, lost_steps=10, step=10, checkpoint=None, reason="no time for a save")
    r.ev(11.5, "attempt_exit", attempt=1, kind="saved", detail="stopped; not saved", step=10, duration_s=11.5)
    r.ev(11.6, "supervisor_exit", exit_code=75)
    r.write(junk=False)
    acc = account(tmp_path, live=False)
    assert acc.productive_s == 0.0 and acc.lost_s["recomputed"] == pytest.approx(10.0, abs=1e-3)
    assert (acc.final_step, acc.steps_recomputed) == (0, 10)


def test_a_fresh_attempt_known_only_by_its_checkpoints(tmp_path):
    """A script without a TrainSession (no step records): a step a second, checkpoints at 100,
    200 and 300, finished. The starting event's resume_from is null, as the supervisor writes it."""
    r = RunDir(tmp_path)
    r.ev(0.0, "supervisor_start", pid=1)
    r.start(0.0, 1, None)
    for step in (100, 200, 300):
        manifest(tmp_path, step, step + 1.0, 1, "interval")
        r.ev(step + 1.0, "checkpoint", step=step, reason="interval", attempt=1)
    r.ev(301.5, "attempt_exit", attempt=1, kind="finished", detail="every rank finished", step=300,
         duration_s=301.5)
    r.ev(301.6, "supervisor_exit", exit_code=0)
    r.write(junk=False)
    (tmp_path / "metrics.jsonl").unlink()
    acc = account(tmp_path, live=False)
    assert acc.estimated and acc.steps_in_history == 300 and acc.final_step == 300
    assert acc.productive_s == pytest.approx(300.0, abs=1.0) and acc.lost_s["restart"] <= 1.5


def test_a_shutdown_stop_is_not_a_power_stop(tmp_path):
    r = first_attempt(tmp_path, 3)
    r.ev(4.0, "prepare_for_shutdown", watcher="logind", action="stop", reason="the system is shutting down")
    r.save(1, 3, 0.5, "preempt")
    r.ev(4.8, "attempt_exit", attempt=1, kind="saved", detail="ranks saved", step=3, duration_s=4.8)
    r.write(junk=False)
    assert [s["cause"] for s in account(tmp_path, live=False).stops] == ["shutdown"]


def test_hang_and_runs_without_a_supervisor(tmp_path):
    r = first_attempt(tmp_path / "hang", 3)  # then silent: hung at step 3 (t = 4.0)
    r.ev(10.0, "hung", attempt=1, step=3, reason="no heartbeat for 6.0 s")
    r.ev(10.0, "state", to="stopping", cause="no heartbeat for 6 s at step 3: hung", attempt=1)
    r.ev(10.5, "attempt_exit", attempt=1, kind="hung", step=3, duration_s=10.5)
    r.ev(10.5, "state", to="fatal", cause="gave up", attempt=1)
    r.ev(10.5, "supervisor_exit", exit_code=3)
    r.write(junk=False)
    acc = account(r.d, live=False)
    assert [s["cause"] for s in acc.stops] == ["hang"]
    assert acc.lost_s["exit"] == pytest.approx(6.5, abs=1e-3)
    # no checkpoint: nothing of it is in a model
    assert acc.productive_s == 0 and acc.lost_s["recomputed"] == pytest.approx(3.0, abs=1e-3)

    # plain `python train.py` twice: steps 1-5, then resumed from step 3 (steps 4, 5 again)
    p = RunDir(tmp_path / "plain")
    p.t = 0.0
    p.steps(0, 1, 5)
    p.t = 20.0
    p.steps(0, 4, 8)
    p.write(junk=False)
    manifest(p.d, 3, 3.0, 0, "interval")
    acc = account(p.d, live=False)
    assert (acc.final_step, acc.steps_in_history, acc.steps_recomputed) == (8, 8, 2)
    assert acc.productive_s == pytest.approx(8.0) and acc.lost_s["recomputed"] == pytest.approx(2.0)
    assert acc.lost_s["restart"] == pytest.approx(20.0 - 5.0)
    assert [s["cause"] for s in acc.stops] == ["other"]


def test_missing_and_empty_files(tmp_path):
    for d in (tmp_path / "nothing-here", tmp_path):
        acc = account(d, live=False)
        assert acc.wall_s == 0 and acc.goodput is None and acc.segments == [] and acc.stops == []
        json.dumps(acc.to_dict())
    (tmp_path / "events.jsonl").write_text("")
    (tmp_path / "metrics.jsonl").mkdir()  # not even a file
    assert account(tmp_path, live=False).wall_s == 0


def test_a_live_run_counts_until_now(tmp_path):
    r = first_attempt(tmp_path, 4, pid=os.getpid())
    r.write(junk=False)
    (tmp_path / "supervisor.json").write_text(json.dumps({"state": "running", "pid": os.getpid(), "attempt": 1}))
    acc = account(tmp_path, now=T0 + 5.5)  # live: detected from supervisor.json
    assert acc.live and acc.wall_s == pytest.approx(5.5)
    assert acc.productive_s == pytest.approx(4.0 + 0.5)  # the step under way counts as training
    assert acc.stops == []


# --------------------------------------------------------------------------- trainsup status


def test_status_shows_the_accounting(tmp_path):
    eventful_run(tmp_path)
    r = CliRunner().invoke(main, ["status", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    acc = json.loads(r.output)["accounting"]
    assert acc["productive_s"] == pytest.approx(20.0) and acc["wall_s"] == pytest.approx(143.7)
    assert acc["goodput"] == pytest.approx(20 / 43.7, abs=1e-3) and acc["asleep_s"] == pytest.approx(100.0)
    assert acc["lost_s"] == pytest.approx(EXPECTED_LOST)
    r = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    [good] = [line for line in lines if line.startswith("goodput:")]
    assert "0.458 = 20.0 s productive of 43.7 s wall awake; asleep 1m40s apart" in good and "7 step(s) run again" in good
    [lost] = [line for line in lines if line.startswith("lost:")]
    assert lost.split(None, 1)[1] == ("recomputed 7.0 s, restart 6.0 s, paused 4.0 s, waiting 3.0 s, "
                                      "saving 2.5 s, exit 1.2 s")


def test_status_survives_an_accounting_failure(tmp_path, monkeypatch):
    eventful_run(tmp_path)
    monkeypatch.setattr(accounting, "account", lambda *a, **k: 1 / 0)
    r = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert r.exit_code == 0 and "goodput:         unknown: ZeroDivisionError" in r.output


def _live_dir(tmp_path: Path, step: int) -> Path:
    (tmp_path / "supervisor.json").write_text(json.dumps({"state": "running", "pid": os.getpid(), "attempt": 2,
                                                          "restarts": 1}))
    (tmp_path / "status.json").write_text(json.dumps({
        "attempt": 2, "state": "training", "step": step, "max_steps": 300, "loss": 4.25, "tokens_per_s": 10512.0,
        "last_checkpoint": {"step": 100, "path": str(tmp_path / "checkpoints" / "step-00000100"),
                            "reason": "interval"}, "updated_at": T0}))
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 11):
            f.write(json.dumps({"kind": "step", "step": 140 + s, "ts": T0 + s * 0.5, "attempt": 2}) + "\n")
    return tmp_path


def test_watch_plain_lines_only_on_change_and_stops(tmp_path):
    _live_dir(tmp_path, 150)
    r = CliRunner().invoke(main, ["status", str(tmp_path), "--watch", "--count", "3", "--interval", "0"])
    assert r.exit_code == 0, r.output
    [line] = r.output.splitlines()  # three refreshes, nothing changed: one line
    assert ("running/training attempt 2 | step 150/300 | loss 4.2500 | tok/s 10,512 | ETA 1m15s | ckpt 100"
            in line)  # 150 steps left at 2 steps/s (metrics.jsonl's last steps)
    assert CliRunner().invoke(main, ["status", str(tmp_path), "--watch", "--json"]).exit_code == 2

    snaps = iter([150, 150, 151])

    def sleep(_s):
        try:
            _live_dir(tmp_path, next(snaps))
        except StopIteration:
            raise KeyboardInterrupt from None  # Ctrl-C: a quiet exit 0

    import time as time_mod

    real_sleep = time_mod.sleep
    try:
        status_mod.time.sleep = sleep
        r = CliRunner().invoke(main, ["status", str(tmp_path), "--watch"])
    finally:
        status_mod.time.sleep = real_sleep
    assert r.exit_code == 0, r.output
    assert [line.split(" | ")[1] for line in r.output.splitlines()] == ["step 150/300", "step 151/300"]
    assert "Aborted" not in r.output


def test_watch_redraws_in_place_on_a_terminal(tmp_path, monkeypatch):
    _live_dir(tmp_path, 150)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    monkeypatch.setattr(status_mod.sys, "stdout", out)
    monkeypatch.setattr(status_mod.shutil, "get_terminal_size", lambda fallback=None: os.terminal_size((100, 24)))
    status_mod.watch_status(tmp_path, count=2, interval=0)
    text = out.getvalue()
    first, second = text.split("\x1b[J")[:2]
    assert "\x1b[3F" in second and "\x1b[3F" not in first  # the second frame goes back up over the first
    assert "[====================>" in first and "150/300  50%" in first and "ETA 1m15s" in first
    assert "last checkpoint: step 100 (interval)" in first


# --------------------------------------------------------------------------- a real supervised run


@pytest.mark.slow
def test_a_supervised_run_with_a_crash_past_the_last_checkpoint(tmp_path, cleanup):
    """`trainsup run` (the torch-free fake rank writing metrics.jsonl as a session does): a crash
    at step 25 with the last checkpoint at 20; steps 21-25 are run again."""
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    job = write_job(tmp_path, ["--steps", "40", "--step-time", "0.05", "--save-every", "10", "--crash-at", "25",
                               "--fault-attempts", "1", "--metrics"], launch={"launcher": "python"})
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stdout + r.stderr
    acc = account(run_dir)
    assert not acc.live and acc.attempts == 2
    assert (acc.final_step, acc.steps_in_history, acc.steps_recomputed) == (40, 40, 5)
    [stop] = acc.stops
    assert (stop["cause"], stop["step"], stop["attempt"]) == ("crash", 25, 1)
    assert [c["step"] for c in acc.checkpoints] == [10, 20, 30, 40]
    assert 40 * 0.05 <= acc.productive_s < 40 * 0.05 + 2.0
    assert 5 * 0.05 <= acc.lost_s["recomputed"] < 5 * 0.05 + 0.5
    assert acc.lost_s["restart"] > 0.2  # the backoff at least
    assert acc.wall_s == pytest.approx(acc.productive_s + sum(acc.lost_s.values()) + acc.asleep_s)
    assert 0 < acc.goodput < 1
    st = json.loads(run_cli("status", str(run_dir), "--json").stdout)
    assert st["accounting"]["productive_s"] == pytest.approx(acc.productive_s, abs=1e-3)
