"""Power supply reading (fake sysfs trees) and the on-battery / low-battery policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor.config import JobConfigError
from supervisor.watch.power import (
    PowerConfig,
    PowerMode,
    PowerReading,
    PowerState,
    PowerWatcher,
    Supply,
    SysfsPowerSource,
    blocking_reason,
    decide,
)
from supervisor.watch import Action


class FakeSysfs:
    """A /sys/class/power_supply lookalike: one directory per supply, one file per attribute."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def supply(self, name: str, **attrs: object) -> None:
        d = self.root / name
        d.mkdir(exist_ok=True)
        for k, v in attrs.items():
            (d / k).write_text(f"{v}\n")

    def set(self, name: str, **attrs: object) -> None:
        self.supply(name, **attrs)

    def remove(self, name: str) -> None:
        d = self.root / name
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "power_supply")


def watcher(sysfs: FakeSysfs, **cfg: object) -> PowerWatcher:
    return PowerWatcher(PowerConfig.from_dict({"sysfs_root": str(sysfs.root), "poll_interval_s": 1, **cfg}))


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("adapter,kind", [
    ("AC", "Mains"), ("AC0", "Mains"), ("ADP1", "Mains"), ("ACAD", "Mains"),
    ("USB-C", "USB"), ("ucsi-source-psy-USBC000:001", "USB"),
])
def test_any_adapter_name_is_read_by_type(sysfs: FakeSysfs, adapter: str, kind: str) -> None:
    sysfs.supply("BAT0", type="Battery", status="Charging", capacity=55)
    sysfs.supply(adapter, type=kind, online=1)
    r = SysfsPowerSource(str(sysfs.root)).read()
    assert [a.name for a in r.adapters] == [adapter]
    assert r.on_ac and not r.discharging and r.battery_percent == 55
    sysfs.set(adapter, online=0)
    sysfs.set("BAT0", status="Discharging")
    r = SysfsPowerSource(str(sysfs.root)).read()
    assert not r.on_ac and r.discharging


def test_any_online_adapter_means_on_ac_and_usb_online_2_counts(sysfs: FakeSysfs) -> None:
    sysfs.supply("ADP1", type="Mains", online=0)
    sysfs.supply("ucsi-source-psy-USBC000:001", type="USB", online=0)
    sysfs.supply("ucsi-source-psy-USBC000:002", type="USB", online=2)  # programmable supply
    sysfs.supply("BAT1", type="Battery", status="Charging", capacity=40)
    assert SysfsPowerSource(str(sysfs.root)).read().on_ac


def test_peripheral_batteries_and_empty_bays_are_ignored(sysfs: FakeSysfs) -> None:
    sysfs.supply("AC", type="Mains", online=1)
    sysfs.supply("hid-00:11:22-battery", type="Battery", scope="Device", status="Discharging", capacity=3)
    sysfs.supply("BAT1", type="Battery", present=0, status="Unknown", capacity=0)
    sysfs.supply("BAT0", type="Battery", status="Full", capacity=100)
    r = SysfsPowerSource(str(sysfs.root)).read()
    assert [b.name for b in r.batteries] == ["BAT0"]
    assert r.battery_percent == 100 and not r.discharging


def test_two_batteries_combine_by_energy(sysfs: FakeSysfs) -> None:
    # A ThinkPad-style pair: a big empty one and a small full one is not "50%".
    sysfs.supply("BAT0", type="Battery", status="Discharging", capacity=10,
                 energy_now=5_000_000, energy_full=50_000_000)
    sysfs.supply("BAT1", type="Battery", status="Discharging", capacity=100,
                 charge_now=2_000_000, charge_full=2_000_000)  # charge_* only: falls back to capacity
    r = SysfsPowerSource(str(sysfs.root)).read()
    assert r.battery_percent == pytest.approx(55.0)  # mixed units: plain mean of capacity
    sysfs.set("BAT1", energy_now=10_000_000, energy_full=10_000_000)
    r = SysfsPowerSource(str(sysfs.root)).read()
    assert r.battery_percent == pytest.approx(100 * 15 / 60)


def test_no_supplies_is_on_ac_and_status_says_so(tmp_path: Path) -> None:
    for root in (tmp_path / "empty", tmp_path / "missing"):
        if root.name == "empty":
            root.mkdir()
        w = PowerWatcher(PowerConfig(on_battery="stop", sysfs_root=str(root)))
        assert w.poll(0.0) == []
        assert w.blocking_reason(0.0) is None
        st = w.status()
        assert st["on_ac"] is True
        assert "no power supplies found" in st["summary"]


def test_battery_without_adapter_node_trusts_battery_status() -> None:
    r = PowerReading(batteries=(Supply("BAT0", "Battery", status="Discharging", capacity_percent=50),))
    assert not r.on_ac and r.discharging
    r = PowerReading(batteries=(Supply("BAT0", "Battery", status="Charging", capacity_percent=50),))
    assert r.on_ac and not r.discharging


def test_supply_vanishing_mid_read_is_tolerated(sysfs: FakeSysfs) -> None:
    sysfs.supply("AC", type="Mains", online=1)
    (sysfs.root / "USB-C").mkdir()  # a hotplugged node without attributes yet
    assert [a.name for a in SysfsPowerSource(str(sysfs.root)).read().adapters] == ["AC"]


# --------------------------------------------------------------------------- policy tables

AC = lambda pct=80.0, status="Charging": PowerReading(  # noqa: E731
    (Supply("ADP1", "Mains", online=True),), (Supply("BAT0", "Battery", status=status, capacity_percent=pct),))
BATT = lambda pct=80.0: PowerReading(  # noqa: E731
    (Supply("ADP1", "Mains", online=False),), (Supply("BAT0", "Battery", status="Discharging", capacity_percent=pct),))
NORMAL, PAUSED, STOPPED = PowerState(), PowerState(PowerMode.PAUSED), PowerState(PowerMode.STOPPED)
LATCHED = PowerState(PowerMode.STOPPED, low_battery_latched=True)


@pytest.mark.parametrize("on_battery,state,reading,action,event,mode", [
    # unplug -> the configured action
    ("continue", NORMAL, BATT(80), None, None, PowerMode.NORMAL),
    ("pause", NORMAL, BATT(80), Action.PAUSE, "on_battery", PowerMode.PAUSED),
    ("stop", NORMAL, BATT(80), Action.STOP, "on_battery", PowerMode.STOPPED),
    # replug -> resume / restart allowed
    ("pause", PAUSED, AC(79), Action.RESUME, "power_restored", PowerMode.NORMAL),
    ("stop", STOPPED, AC(79), Action.RESUME, "power_restored", PowerMode.NORMAL),
    # still on battery -> stay
    ("pause", PAUSED, BATT(70), None, None, PowerMode.PAUSED),
    ("stop", STOPPED, BATT(70), None, None, PowerMode.STOPPED),
    # low battery while discharging -> save and stop, whatever on_battery says
    ("continue", NORMAL, BATT(10), Action.STOP, "low_battery", PowerMode.STOPPED),
    ("pause", PAUSED, BATT(9), Action.STOP, "low_battery", PowerMode.STOPPED),
    ("stop", STOPPED, BATT(5), None, None, PowerMode.STOPPED),  # already stopping: latch only
    # charger too weak for the load: on AC but draining
    ("continue", NORMAL, AC(8, "Discharging"), Action.STOP, "low_battery", PowerMode.STOPPED),
    # low but charging: fine
    ("continue", NORMAL, AC(8, "Charging"), None, None, PowerMode.NORMAL),
    # hysteresis after a low-battery stop
    ("continue", LATCHED, AC(15, "Charging"), None, None, PowerMode.STOPPED),
    ("continue", LATCHED, AC(20, "Charging"), Action.RESUME, "power_restored", PowerMode.NORMAL),
    ("continue", LATCHED, AC(25, "Discharging"), None, None, PowerMode.STOPPED),
    ("stop", LATCHED, AC(20, "Full"), Action.RESUME, "power_restored", PowerMode.NORMAL),
])
def test_policy_table(on_battery, state, reading, action, event, mode) -> None:
    cfg = PowerConfig(on_battery=on_battery, min_percent=10, resume_percent=20)
    new, decisions = decide(cfg, state, reading)
    assert [d.action for d in decisions] == ([action] if action else [])
    assert [d.event for d in decisions] == ([event] if event else [])
    assert new.mode is mode
    if action is Action.RESUME:
        assert blocking_reason(cfg, new, reading) is None and not new.low_battery_latched


@pytest.mark.parametrize("on_battery,state,reading,blocked", [
    ("continue", NORMAL, BATT(50), None),
    ("pause", PAUSED, BATT(50), "on battery"),
    ("stop", STOPPED, BATT(50), "on battery"),
    ("stop", STOPPED, AC(50), None),
    ("continue", LATCHED, AC(12), "battery low (12%)"),
    ("continue", LATCHED, BATT(12), "battery low (12%)"),
])
def test_blocking_reason_table(on_battery, state, reading, blocked) -> None:
    cfg = PowerConfig(on_battery=on_battery)
    reason = blocking_reason(cfg, state, reading)
    if blocked is None:
        assert reason is None
    else:
        assert reason is not None and blocked in reason


def test_disabled_does_nothing() -> None:
    cfg = PowerConfig(enabled=False, on_battery="stop")
    assert decide(cfg, NORMAL, BATT(1)) == (NORMAL, [])
    assert blocking_reason(cfg, NORMAL, BATT(1)) is None


# --------------------------------------------------------------------------- watcher on a fake tree


def test_watcher_unplug_low_battery_replug_sequence(sysfs: FakeSysfs) -> None:
    sysfs.supply("ADP1", type="Mains", online=1)
    sysfs.supply("BAT0", type="Battery", status="Charging", capacity=30)
    w = watcher(sysfs, on_battery="pause", min_percent=10, resume_percent=20)
    assert w.poll(0.0) == [] and w.blocking_reason(0.0) is None

    sysfs.set("ADP1", online=0)
    sysfs.set("BAT0", status="Discharging", capacity=25)
    assert w.poll(0.5) == []  # poll_interval_s = 1: not read yet
    [d] = w.poll(1.0)
    assert (d.action, d.event) == (Action.PAUSE, "on_battery")
    assert "on battery" in w.blocking_reason(1.0)

    sysfs.set("BAT0", capacity=10)
    [d] = w.poll(2.0)
    assert (d.action, d.event) == (Action.STOP, "low_battery")
    assert d.details["battery_percent"] == 10

    sysfs.set("ADP1", online=1)
    sysfs.set("BAT0", status="Charging", capacity=11)
    assert w.poll(3.0) == []
    assert "battery low (11%)" in w.blocking_reason(3.0)
    sysfs.set("BAT0", capacity=20)
    [d] = w.poll(4.0)
    assert (d.action, d.event) == (Action.RESUME, "power_restored")
    assert w.blocking_reason(4.0) is None
    assert w.status()["mode"] == "normal"


def test_watcher_stop_on_unplug_and_restart_on_replug_usb_c(sysfs: FakeSysfs) -> None:
    sysfs.supply("ucsi-source-psy-USBC000:001", type="USB", online=1)
    sysfs.supply("BAT0", type="Battery", status="Charging", capacity=90)
    w = watcher(sysfs, on_battery="stop")
    assert w.poll(0.0) == []
    sysfs.set("ucsi-source-psy-USBC000:001", online=0)
    sysfs.set("BAT0", status="Discharging")
    assert [d.action for d in w.poll(1.0)] == [Action.STOP]
    assert w.poll(2.0) == []  # no repeat
    assert w.blocking_reason(2.0) is not None
    sysfs.set("ucsi-source-psy-USBC000:001", online=1)
    sysfs.set("BAT0", status="Charging")
    assert [d.action for d in w.poll(3.0)] == [Action.RESUME]
    st = w.status()
    assert st["adapters"] == [{"name": "ucsi-source-psy-USBC000:001", "type": "USB", "online": True}]
    assert st["blocking"] is None


def test_blocking_reason_reads_before_first_poll(sysfs: FakeSysfs) -> None:
    # Started unplugged with on_battery = stop: the first attempt must wait.
    sysfs.supply("AC", type="Mains", online=0)
    sysfs.supply("BAT0", type="Battery", status="Discharging", capacity=70)
    w = watcher(sysfs, on_battery="stop")
    assert "waiting for AC" in w.blocking_reason(0.0)


# --------------------------------------------------------------------------- config


def test_config_defaults_and_from_dict() -> None:
    c = PowerConfig.from_dict({})
    assert c == PowerConfig()
    c = PowerConfig.from_dict({"on_battery": "stop", "min_percent": 5, "resume_percent": 15})
    assert (c.on_battery, c.min_percent, c.resume_percent) == ("stop", 5.0, 15.0)


@pytest.mark.parametrize("d,message", [
    ({"min_percnt": 5}, "[power] unknown key 'min_percnt' (did you mean 'min_percent'?); known keys: enabled, "
                        "min_percent, on_battery, poll_interval_s, resume_percent, sysfs_root"),
    ({"bogus": 1}, "[power] unknown key 'bogus'; known keys: enabled, min_percent, on_battery, poll_interval_s, "
                   "resume_percent, sysfs_root"),
    ({"on_battery": "stopp"}, '[power] on_battery must be one of "continue", "pause", "stop", got \'stopp\' '
                              "(did you mean 'stop'?)"),
    ({"on_battery": 1}, '[power] on_battery must be one of "continue", "pause", "stop", got an integer 1'),
    ({"enabled": "yes"}, "[power] enabled must be true or false, got a string 'yes'"),
    ({"min_percent": True}, "[power] min_percent must be a number (percent of battery charge), got a boolean True"),
    ({"min_percent": 150}, "[power] min_percent must be <= 100 (percent of battery charge), got 150"),
    ({"resume_percent": -1}, "[power] resume_percent must be >= 0 (percent of battery charge), got -1"),
    ({"min_percent": 30, "resume_percent": 20},
     "[power] resume_percent must be above min_percent (30), got 20; e.g. resume_percent = 40"),
    ({"poll_interval_s": 0}, "[power] poll_interval_s must be > 0 (seconds), got 0"),
    ({"sysfs_root": ""}, '[power] sysfs_root must not be empty (a directory, e.g. "/sys/class/power_supply")'),
])
def test_config_errors_name_key_and_fix(d, message) -> None:
    with pytest.raises(JobConfigError) as e:
        PowerConfig.from_dict(d)
    assert str(e.value) == message
    assert e.value.exit_code == 2  # the one job.toml error type: exit 2 from any command


def test_config_error_uses_where() -> None:
    with pytest.raises(JobConfigError, match=r"^\[job\.power\] min_percent"):
        PowerConfig.from_dict({"min_percent": 101}, where="job.power")
    with pytest.raises(JobConfigError, match=r"^\[power\] min_percent"):
        PowerConfig(min_percent=101)


def test_real_sysfs_root_reads_without_error() -> None:
    # Whatever this machine has (nothing, on the CI box), reading must not raise.
    r = SysfsPowerSource().read()
    assert isinstance(r.on_ac, bool)
    if not os.path.isdir("/sys/class/power_supply") or not os.listdir("/sys/class/power_supply"):
        assert r.on_ac and not r.has_supplies
