"""A laptop, end to end: `trainsup run` with real `accelerate launch` children.

- power: a fake /sys/class/power_supply tree ([power] sysfs_root) that the test unplugs,
  drains and replugs; the ranks are tests/scripts/toy_train.py (torch + TrainSession).
- logind: a real private dbus-daemon with the fake org.freedesktop.login1 of
  tests/fake_login1.py; the supervisor finds it through $DBUS_SYSTEM_BUS_ADDRESS.
- sd_notify: a unix datagram socket as $NOTIFY_SOCKET; the ranks are the torch-free
  tests/scripts/sup_fake_rank.py (only the supervisor's messages matter there).

Every wait is on a condition (a heartbeat, a file, a lock, a message), never on time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from supervisor_helpers import CLI, REPO, env, events, kill_run, prerequisite, read_json, run_processes, wait_for, write_job
from train_core.store import CheckpointStore

sys.path.insert(0, os.path.dirname(__file__))
from fake_login1 import FakeLogind, PrivateBus, dbus_daemon_available  # noqa: E402

pytestmark = pytest.mark.slow

TOY = REPO / "tests" / "scripts" / "toy_train.py"
# ~0.1 s per optimizer step (3 micro-batches): long enough for the test to act mid-run.
TOY_ARGS = ["--steps", "40", "--sleep-s", "0.03", "--save-every", "0", "--eval-every", "0"]
NO_BUS = {"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent/trainsup-test-bus"}  # never the host's logind


# --------------------------------------------------------------------------- helpers


class Sysfs:
    """A fake /sys/class/power_supply; every attribute is replaced atomically (the supervisor
    reads it while the test writes)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()

    def set(self, name: str, **attrs: object) -> None:
        d = self.root / name
        d.mkdir(exist_ok=True)
        for key, value in attrs.items():
            tmp = d / f".{key}.tmp"
            tmp.write_text(f"{value}\n")
            os.replace(tmp, d / key)


class Run:
    """One `trainsup run` in its own session; `close()` leaves no process behind."""

    def __init__(self, tmp: Path, job: Path, extra_env: dict[str, str] | None = None) -> None:
        self.run_dir = tmp / "run"
        self.log = tmp / "sup.log"
        self.proc = subprocess.Popen([*CLI, "run", str(job)], env={**env(), **NO_BUS, **(extra_env or {})},
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=REPO)

    def sup(self) -> dict:
        return read_json(self.run_dir / "supervisor.json") or {}

    def hb(self) -> dict:
        return read_json(self.run_dir / "status.json") or {}

    def step(self) -> int:
        """The newest heartbeat's step while training (-1 otherwise)."""
        st = self.hb()
        return int(st.get("step", -1)) if st.get("state") == "training" else -1

    def kinds(self, event: str) -> list[dict]:
        return events(self.run_dir, event)

    def valid_steps(self) -> list[int]:
        return [c.step for c in CheckpointStore(self.run_dir / "checkpoints").scan() if c.valid]

    def wait(self, pred, what: str, timeout: float = 60):
        if self.proc.poll() is not None and not pred():
            raise AssertionError(f"supervisor exited {self.proc.returncode} while waiting for {what}:\n"
                                 + self.log.read_text()[-3000:])
        return wait_for(pred, timeout, what)

    def finish(self, timeout: float = 90) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("supervisor did not finish:\n" + self.log.read_text()[-3000:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        kill_run(self.run_dir)


@pytest.fixture
def runs():
    made: list[Run] = []
    yield made
    for r in made:
        r.close()


def new_heartbeats(run: Run, n: int) -> list[dict]:
    """The next `n` heartbeats (status.json rewrites) after this call."""
    seen = [run.hb()]
    while len(seen) <= n:
        last = seen[-1].get("updated_at")
        seen.append(run.wait(lambda: (h := run.hb()).get("updated_at") != last and h, "a new heartbeat", 10))
    return seen[1:]


# --------------------------------------------------------------------------- power


def test_on_battery_pause_then_low_battery_stops_and_waits_for_charge(tmp_path, runs):
    sysfs = Sysfs(tmp_path / "power_supply")
    sysfs.set("ADP1", type="Mains", online=1)
    sysfs.set("BAT0", type="Battery", status="Charging", capacity=80, present=1)
    job = write_job(tmp_path, TOY_ARGS, script=TOY, power={
        "on_battery": "pause", "min_percent": 10, "resume_percent": 20, "poll_interval_s": 0.1,
        "sysfs_root": str(sysfs.root)})
    run = Run(tmp_path, job)
    runs.append(run)
    run.wait(lambda: run.step() >= 3, "step 3", 90)

    # Unplugged: the ranks hold at a step boundary; heartbeats go on, the step does not move.
    sysfs.set("ADP1", online=0)
    sysfs.set("BAT0", status="Discharging", capacity=50)
    paused = run.wait(lambda: (h := run.hb()).get("state") == "paused" and h, "the ranks to pause")
    assert [(h["state"], h["step"]) for h in new_heartbeats(run, 2)] == [("paused", paused["step"])] * 2
    assert run.sup()["paused_by"] == ["power"] and run.sup()["state"] == "running"
    assert [e["action"] for e in run.kinds("on_battery")] == ["pause"]

    # Battery low while paused: save and stop (a paused run would lose its memory when it dies).
    sysfs.set("BAT0", capacity=5)
    run.wait(lambda: run.sup().get("state") == "waiting", "the supervisor to wait")
    [exit1] = run.kinds("attempt_exit")
    assert exit1["kind"] == "saved"
    assert run.valid_steps() == [paused["step"]]  # saved where it paused, nothing lost
    assert [e["action"] for e in run.kinds("low_battery")] == ["stop"]
    assert run_processes(run.run_dir) == [] and run.proc.poll() is None

    # Back on AC but still at 5 %: the low-battery latch holds the restart...
    sysfs.set("ADP1", online=1)
    sysfs.set("BAT0", status="Charging")
    run.wait(lambda: (run.sup().get("watchers", {}).get("power") or {}).get("on_ac") is True, "AC seen")
    sup = run.sup()
    assert sup["state"] == "waiting" and "battery low (5%)" in sup["blocked_by"]
    # ...until the battery has charged to resume_percent: restart from the checkpoint, finish.
    sysfs.set("BAT0", capacity=25)
    assert run.finish() == 0, run.log.read_text()[-3000:]
    starts = [e for e in run.kinds("state") if e["to"] == "starting"]
    assert len(starts) == 2 and starts[1]["resume_from"].endswith(f"step-{paused['step']:08d}")
    assert read_json(run.run_dir / "final_hash.json")["step"] == 40
    assert [e["event"] for e in events(run.run_dir) if e["event"] in ("on_battery", "low_battery",
                                                                      "power_restored")] == \
        ["on_battery", "low_battery", "power_restored"]
    # no D-Bus here (NO_BUS): the console says so once, not once per layer
    said = [line for line in run.log.read_text().splitlines() if "D-Bus" in line]
    assert len(said) == 1, said


def test_on_battery_stop_saves_exits_75_and_restarts_on_replug_usb_c(tmp_path, runs):
    sysfs = Sysfs(tmp_path / "power_supply")
    sysfs.set("USB-C", type="USB", online=2)  # a USB PD adapter: any non-zero online is online
    sysfs.set("BAT1", type="Battery", status="Full", capacity=100)
    job = write_job(tmp_path, TOY_ARGS, script=TOY, power={
        "on_battery": "stop", "poll_interval_s": 0.1, "sysfs_root": str(sysfs.root)})
    run = Run(tmp_path, job)
    runs.append(run)
    run.wait(lambda: run.step() >= 3, "step 3", 90)

    sysfs.set("USB-C", online=0)
    sysfs.set("BAT1", status="Discharging", capacity=97)
    run.wait(lambda: run.sup().get("state") == "waiting", "the supervisor to wait")
    [exit1] = run.kinds("attempt_exit")
    assert exit1["kind"] == "saved"
    assert read_json(run.run_dir / "ranks" / "exit-0.json")["code"] == 75  # the rank's exit (the launcher says 1)
    [ckpt] = CheckpointStore(run.run_dir / "checkpoints").scan()
    assert ckpt.valid and ckpt.reason == "preempt" and ckpt.step >= 3
    assert "on battery" in run.sup()["blocked_by"]
    assert run_processes(run.run_dir) == [] and run.proc.poll() is None  # no ranks; still supervising

    sysfs.set("USB-C", online=1)
    assert run.finish() == 0, run.log.read_text()[-3000:]
    starts = [e for e in run.kinds("state") if e["to"] == "starting"]
    assert len(starts) == 2 and starts[1]["resume_from"] == str(ckpt.path)
    assert read_json(run.run_dir / "final_hash.json")["step"] == 40


# --------------------------------------------------------------------------- logind


@prerequisite(dbus_daemon_available(), "dbus-daemon is not installed")
def test_logind_sleep_saves_before_release_then_shutdown_stops_and_restarts(tmp_path, runs):
    bus = PrivateBus(tmp_path / "bus")
    ckpts = tmp_path / "run" / "checkpoints"
    # At the moment logind sees the lock go: which checkpoints are committed?
    fake = FakeLogind(bus.address, delay_max_usec=5_000_000,
                      on_release=lambda lock: [c.step for c in CheckpointStore(ckpts).scan() if c.valid])
    try:
        job = write_job(tmp_path, [*TOY_ARGS[:1], "60", *TOY_ARGS[2:]], script=TOY)
        run = Run(tmp_path, job, {"DBUS_SYSTEM_BUS_ADDRESS": bus.address})
        runs.append(run)
        assert fake.wait_for(lambda f: len(f.held_locks()) == 1, 30), run.log.read_text()
        [lock1] = fake.locks
        assert (lock1.what, lock1.who, lock1.mode) == ("sleep:shutdown", "trainsup", "delay")
        run.wait(lambda: run.step() >= 3, "step 3", 90)
        assert run.valid_steps() == []

        # Lid closed: a checkpoint is committed, THEN the lock goes; training goes on.
        fake.prepare_for_sleep(True)
        assert fake.wait_for(lambda f: not lock1.held, 10), run.log.read_text()[-3000:]
        assert len(lock1.seen_at_release) == 1, "the lock was released before the checkpoint was committed"
        [sleep_ckpt] = CheckpointStore(ckpts).scan()
        assert sleep_ckpt.step == lock1.seen_at_release[0] and sleep_ckpt.reason == "request"
        assert sleep_ckpt.created_at.timestamp() <= lock1.released_wall
        release = run.wait(lambda: (run.sup().get("watchers", {}).get("logind") or {}).get("last_release"),
                           "the release in supervisor.json")
        assert release["for"] == "sleep" and release["why"] == f"checkpoint step {sleep_ckpt.step} committed"
        # Woken up: the lock is taken again and the same attempt trains on.
        fake.prepare_for_sleep(False)
        assert fake.wait_for(lambda f: len(f.held_locks()) == 1, 10)
        run.wait(lambda: run.step() >= sleep_ckpt.step + 3, "steps after the wake-up")
        assert len([e for e in run.kinds("state") if e["to"] == "starting"]) == 1
        # training never stopped, so the steps may run ahead of the loop's next watcher poll
        run.wait(lambda: run.kinds("resumed_from_sleep"), "the wake-up in events.jsonl")
        assert [e["event"] for e in events(run.run_dir) if e["event"] in (
            "prepare_for_sleep", "checkpoint", "resumed_from_sleep")] == \
            ["prepare_for_sleep", "checkpoint", "resumed_from_sleep"]

        # Shutdown: save and stop, release after the commit, no restart while it is pending.
        lock2 = fake.held_locks()[0]
        fake.prepare_for_shutdown(True)
        assert fake.wait_for(lambda f: not lock2.held, 10), run.log.read_text()[-3000:]
        newest = max(lock2.seen_at_release or [-1])
        assert newest > sleep_ckpt.step, "the lock was released before the shutdown checkpoint was committed"
        run.wait(lambda: run.sup().get("state") == "waiting", "the supervisor to wait")
        assert "shutting down" in run.sup()["blocked_by"]
        [stop_ckpt] = [c for c in CheckpointStore(ckpts).scan() if c.step == newest]
        assert stop_ckpt.reason == "preempt" and run.kinds("attempt_exit")[-1]["kind"] == "saved"
        assert run_processes(run.run_dir) == []
        # Shutdown cancelled: lock re-taken, the run restarts from that checkpoint and finishes.
        fake.prepare_for_shutdown(False)
        assert fake.wait_for(lambda f: len(f.held_locks()) == 1, 10)
        assert run.finish() == 0, run.log.read_text()[-3000:]
        starts = [e for e in run.kinds("state") if e["to"] == "starting"]
        assert len(starts) == 2 and starts[1]["resume_from"] == str(stop_ckpt.path)
        assert read_json(run.run_dir / "final_hash.json")["step"] == 60
        # the supervisor let go of it when it exited (the fake counts a release once its on_release
        # scan of the checkpoints, which now runs the pickle check in a child process, is done)
        assert fake.wait_for(lambda f: not f.held_locks(), 5)
    finally:
        fake.stop()
        bus.stop()


# --------------------------------------------------------------------------- sd_notify


class NotifySocket:
    """$NOTIFY_SOCKET: a datagram socket whose messages a thread collects in arrival order."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except socket.timeout:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_sd_notify_ready_status_watchdog_stopping_in_order(tmp_path, runs):
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        job = write_job(tmp_path, ["--steps", "400", "--step-time", "0.03"])  # the torch-free fake rank
        run = Run(tmp_path, job, {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
        runs.append(run)
        run.wait(lambda: any("running" in m and "step" in m for m in notify.messages), "a STATUS with a step")
        # The ranks never see systemd's socket (a rank's READY=1 would confuse systemd).
        procs = run.wait(lambda: run_processes(run.run_dir), "the run's processes")
        for p in procs:
            assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC"} & set(p.environ()), p.cmdline()
        run.wait(lambda: notify.messages.count("WATCHDOG=1") >= 2, "a second watchdog ping")
        os.kill(run.proc.pid, signal.SIGTERM)
        assert run.finish() == 75, run.log.read_text()[-3000:]
        run.wait(lambda: notify.messages and notify.messages[-1].startswith("STATUS=exited 75"), "the last STATUS")
    finally:
        notify.close()
    msgs = notify.messages
    assert msgs[0].startswith("READY=1\nSTATUS=starting (attempt 1)"), msgs[:3]
    life = [m for m in msgs if m != "WATCHDOG=1"]
    keys = [m.split("\n")[0].split("=")[0] for m in life]
    stopping = keys.index("STOPPING")
    assert keys[0] == "READY" and set(keys[1:stopping]) == {"STATUS"}
    assert keys[stopping:stopping + 2] == ["STOPPING", "EXTEND_TIMEOUT_USEC"]
    assert set(keys[stopping + 2:]) == {"STATUS"}  # the stop's progress, then how it ended
    running = [m for m in life[1:stopping] if m.startswith("STATUS=running (attempt 1), step ")]
    assert running and "loss " in running[-1]
    assert msgs[-1].startswith("STATUS=exited 75: stopped on SIGTERM: checkpoint step ")
    # [stop] grace_s 20 + kill_after_s 2 + 20 s margin: systemd must not kill the run first.
    assert "EXTEND_TIMEOUT_USEC=42000000" in msgs
    # WatchdogSec=1s: pinged every 0.5 s from the first loop turn until the stop.
    assert msgs.index("WATCHDOG=1") == 1 and msgs.count("WATCHDOG=1") >= 2
