"""LogindWatcher against a real private dbus-daemon and a fake org.freedesktop.login1."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fake_login1 import FakeLogind, PrivateBus, dbus_daemon_available  # noqa: E402

from supervisor_helpers import prerequisite, wait_for  # noqa: E402
from supervisor.config import JobConfigError  # noqa: E402
from supervisor.watch.logind import LogindConfig, LogindWatcher, system_bus_address  # noqa: E402
from supervisor.watch import Action, Decision  # noqa: E402

pytestmark = prerequisite(dbus_daemon_available(), "dbus-daemon is not installed")


@pytest.fixture
def bus(tmp_path: Path):
    b = PrivateBus(tmp_path / "bus")
    yield b
    b.stop()


@pytest.fixture
def make(bus: PrivateBus, monkeypatch: pytest.MonkeyPatch):
    """make(delay_max_usec=..., **watcher kwargs) -> (fake logind, connected watcher)."""
    made: list = []
    # The watcher finds the bus the way it would find the real system bus.
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)

    def _make(delay_max_usec: int = 5_000_000, margin_s: float = 0.5, deny_inhibit: bool = False, wakeup=None,
              checkpoint_dir=None):
        fake = FakeLogind(bus.address, delay_max_usec=delay_max_usec, deny_inhibit=deny_inhibit)
        w = LogindWatcher(LogindConfig(release_margin_s=margin_s), wakeup=wakeup, checkpoint_dir=checkpoint_dir)
        made.append((fake, w))
        assert w.wait_ready(5)
        return fake, w

    yield _make
    for fake, w in made:
        w.close()
        fake.stop()


def wait_decisions(w: LogindWatcher, n: int = 1, timeout_s: float = 5.0) -> list[Decision]:
    out: list[Decision] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out += w.poll(time.monotonic())
        time.sleep(0.01)
    return out


def test_system_bus_address_default_and_env() -> None:
    assert system_bus_address({}) == "unix:path=/run/dbus/system_bus_socket"
    assert system_bus_address({"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/x"}) == "unix:path=/x"


def test_takes_delay_lock_and_reads_delay_budget(make) -> None:
    fake, w = make(delay_max_usec=3_000_000)
    assert fake.wait_for(lambda f: len(f.held_locks()) == 1)
    [lock] = fake.held_locks()
    assert (lock.what, lock.who, lock.mode) == ("sleep:shutdown", "trainsup", "delay")
    st = w.status()
    assert st["available"] is True and st["lock_held"] is True
    assert st["delay_max_s"] == 3.0 and st["budget_s"] == 2.5
    assert w.poll(0.0) == [] and w.blocking_reason(0.0) is None


@pytest.mark.parametrize("kind,action,event,blocking", [
    ("sleep", Action.SAVE, "prepare_for_sleep", "going to sleep"),
    ("shutdown", Action.STOP, "prepare_for_shutdown", "shutting down"),
])
def test_lock_released_only_after_a_new_checkpoint_then_retaken(make, kind, action, event, blocking) -> None:
    fake, w = make(delay_max_usec=30_000_000)  # long budget: only the checkpoint may release
    w.on_checkpoint(100, 0.0)  # a checkpoint from before the request
    emit = fake.prepare_for_sleep if kind == "sleep" else fake.prepare_for_shutdown

    emit(True)
    [d] = wait_decisions(w)
    assert (d.action, d.event) == (action, event)
    assert blocking in w.blocking_reason(0.0)

    time.sleep(0.3)  # the lock must still be held: nothing was committed yet
    assert len(fake.held_locks()) == 1
    w.on_checkpoint(100, 0.0)  # the same old checkpoint reported again: not a new commit
    time.sleep(0.1)
    assert len(fake.held_locks()) == 1

    committed_at = time.monotonic()
    w.on_checkpoint(104, 0.0)  # the save the decision asked for
    assert fake.wait_for(lambda f: not f.held_locks(), 2.0)
    released_at = fake.locks[0].released_at
    assert released_at is not None and released_at >= committed_at
    assert w.status()["last_release"]["why"] == "checkpoint step 104 committed"
    assert blocking in w.blocking_reason(0.0)  # still asleep / shutting down

    emit(False)
    [d] = wait_decisions(w)
    assert d.action is Action.NOTE
    assert d.event == ("resumed_from_sleep" if kind == "sleep" else "shutdown_cancelled")
    assert fake.wait_for(lambda f: len(f.held_locks()) == 1, 2.0)
    assert len(fake.locks) == 2  # a fresh lock for the next sleep
    assert w.blocking_reason(0.0) is None
    assert w.status()["lock_held"] is True

    # ...and the cycle works a second time
    emit(True)
    assert [x.action for x in wait_decisions(w)] == [action]
    w.on_checkpoint(108, 0.0)
    assert fake.wait_for(lambda f: not f.held_locks(), 2.0)


@pytest.mark.parametrize("kind", ["sleep", "shutdown"])
def test_budget_expiry_releases_without_a_checkpoint(make, kind) -> None:
    fake, w = make(delay_max_usec=1_000_000, margin_s=0.5)  # budget 0.5 s
    emit = fake.prepare_for_sleep if kind == "sleep" else fake.prepare_for_shutdown
    t0 = emit(True)
    assert fake.wait_for(lambda f: not f.held_locks(), 3.0)
    waited = fake.locks[0].released_at - t0
    assert waited >= 0.45  # not before the budget (small slack for clock reads)
    assert w.status()["last_release"]["why"] == "delay budget ran out before a checkpoint was committed"
    assert len(wait_decisions(w)) == 1
    w.on_checkpoint(5, 0.0)  # a late commit changes nothing
    emit(False)
    assert fake.wait_for(lambda f: len(f.held_locks()) == 1, 2.0)


def test_signals_from_anyone_but_login1_are_ignored(make, bus: PrivateBus) -> None:
    fake, w = make()
    from jeepney import DBusAddress, new_signal
    from jeepney.io.blocking import open_dbus_connection

    with open_dbus_connection(bus=bus.address) as impostor:
        impostor.send(new_signal(DBusAddress("/org/freedesktop/login1",
                                             interface="org.freedesktop.login1.Manager"),
                                 "PrepareForSleep", "b", (True,)))
        time.sleep(0.4)
    assert w.poll(0.0) == []
    assert len(fake.held_locks()) == 1 and w.blocking_reason(0.0) is None
    fake.prepare_for_sleep(True)  # the real owner still gets through
    assert [d.action for d in wait_decisions(w)] == [Action.SAVE]


def test_wakeup_callback_and_any_other_step_releases(make) -> None:
    import threading

    woke = threading.Event()
    fake, w = make(delay_max_usec=30_000_000, wakeup=lambda: (w.status(), woke.set()))
    w.on_checkpoint(104, 0.0)
    fake.prepare_for_sleep(True)
    assert woke.wait(2.0)  # the loop can wake at once instead of at its next tick
    assert [d.action for d in w.poll(0.0)] == [Action.SAVE]
    w.on_checkpoint(50, 0.0)  # a run resumed from an older checkpoint commits lower steps
    assert fake.wait_for(lambda f: not f.held_locks(), 2.0)


def test_a_change_in_checkpoint_dir_wakes_the_loop_only_while_a_request_waits(make, tmp_path: Path) -> None:
    import threading

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    wakes: list[str] = []
    woke = threading.Event()
    fake, w = make(delay_max_usec=30_000_000, checkpoint_dir=ckpts,
                   wakeup=lambda: (wakes.append("x"), woke.set()))
    (ckpts / "step-00000001").mkdir()  # no request pending: nobody is woken for this
    time.sleep(0.1)
    assert wakes == []
    fake.prepare_for_sleep(True)
    assert woke.wait(2.0)  # the decision itself
    woke.clear()
    assert [d.action for d in w.poll(0.0)] == [Action.SAVE]
    time.sleep(0.1)  # several stat rounds of an unchanged dir: no wake-up
    assert not woke.is_set()
    (ckpts / "step-00000002").mkdir()  # what a commit's rename does to the dir
    assert woke.wait(2.0)
    assert fake.held_locks()  # a change only wakes the loop; the loop's on_checkpoint releases
    w.on_checkpoint(2, 0.0)
    assert fake.wait_for(lambda f: not f.held_locks(), 2.0)


def test_inhibit_denied_still_asks_for_a_save(make) -> None:
    fake, w = make(deny_inhibit=True)
    st = w.status()
    assert st["available"] is True and st["lock_held"] is False
    assert "AccessDenied" in st["lock_error"]
    fake.prepare_for_sleep(True)
    assert [d.action for d in wait_decisions(w)] == [Action.SAVE]


def test_no_bus_is_one_note_and_run_continues(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="supervisor.watch.logind")
    w = LogindWatcher(bus_address=f"unix:path={tmp_path}/no-such-bus")
    try:
        assert w.wait_ready(5)
        st = w.status()
        assert st["available"] is False
        assert "no D-Bus system bus at unix:path=" in st["reason"]
        [d] = w.poll(0.0)
        assert (d.action, d.event) == (Action.NOTE, "logind_unavailable")
        assert w.poll(1.0) == [] and w.blocking_reason(1.0) is None
        w.on_checkpoint(1, 1.0)
        # said once, by the runner printing the note: the watcher itself logs nothing more
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        assert "sleep/shutdown will not wait for a checkpoint" in d.reason
    finally:
        w.close()


def test_bus_without_logind(bus: PrivateBus) -> None:
    w = LogindWatcher(bus_address=bus.address)
    try:
        assert w.wait_ready(5)
        assert w.status() == {"available": False, "reason": "logind (org.freedesktop.login1) is not on the "
                              "system bus (org.freedesktop.DBus.Error.NameHasNoOwner)"}
    finally:
        w.close()


def test_losing_the_bus_mid_run_is_reported(make, bus: PrivateBus) -> None:
    fake, w = make()
    fake.prepare_for_sleep(True)
    assert [d.action for d in wait_decisions(w)] == [Action.SAVE]
    bus.stop()
    wait_for(lambda: not w.status()["available"], 5, "the watcher to notice the bus is gone")
    st = w.status()
    assert st["available"] is False and "lost the D-Bus system bus" in st["reason"]
    assert [d.event for d in w.poll(0.0)] == ["logind_unavailable"]
    assert w.blocking_reason(0.0) is None  # no wake-up signal can come any more


def test_disabled_never_connects() -> None:
    w = LogindWatcher(LogindConfig(enabled=False), bus_address="unix:path=/nonexistent")
    assert w.status() == {"available": False, "reason": "disabled in job.toml ([logind] enabled = false)"}
    assert w.poll(0.0) == []
    w.close()


@pytest.mark.parametrize("d,message", [
    ({"release_margin": 1}, "[logind] unknown key 'release_margin' (did you mean 'release_margin_s'?); "
                            "known keys: enabled, release_margin_s, what"),
    ({"release_margin_s": -1}, "[logind] release_margin_s must be >= 0 (seconds), got -1"),
    ({"enabled": 1}, "[logind] enabled must be true or false, got an integer 1"),
    ({"what": "idle"}, '[logind] what must be "sleep", "shutdown" or "sleep:shutdown", got \'idle\''),
])
def test_logind_config_errors(d, message) -> None:
    with pytest.raises(JobConfigError) as e:
        LogindConfig.from_dict(d)
    assert str(e.value) == message
    assert LogindConfig.from_dict({"release_margin_s": 1}).release_margin_s == 1.0
