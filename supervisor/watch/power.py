"""Power supply: read sysfs-class-power, decide what a laptop run should do.

Three layers (docs/architecture.md, "Design rules"):
- `SysfsPowerSource.read()` is the only I/O: it scans every supply under
  /sys/class/power_supply (root configurable, tests use a fake tree). Adapters
  are recognised by their `type` (Mains or USB), never by name: AC, AC0, ADP1,
  ACAD, USB-C, ucsi-source-psy-USBC000:001 all count. psutil.sensors_battery()
  only knows AC/AC0 (docs/platform.md, "Power supply (sysfs)"), which is why this exists.
- `decide(config, state, reading)` is a pure function with hysteresis.
- `PowerWatcher` implements supervisor.watch.Watcher around both.

Policy:
- on battery: `continue` (nothing), `pause` (ranks keep their state in memory),
  `stop` (save and exit 75; restart when back on AC).
- battery at or below `min_percent` while discharging: save and stop, whatever
  `on_battery` says (a paused run would lose its in-memory state when the
  battery dies). "Discharging" is what the battery says, so a charger too weak
  for the GPU load (on AC, battery still draining) also counts.
- the low-battery stop is latched: a restart is allowed only once the battery
  is back at `resume_percent` or more and no longer discharging. Without this
  gap a weak charger would bounce the run between restart and stop around
  `min_percent`.
- no supplies at all (desktop, server, VM): on AC.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import InitVar, asdict, dataclass, field, replace
from typing import Any, Mapping, Protocol

from supervisor.config import Section
from supervisor.watch import Action, Decision

log = logging.getLogger(__name__)

DEFAULT_SYSFS_ROOT = "/sys/class/power_supply"

ADAPTER_TYPES = frozenset({"Mains", "USB"})
ON_BATTERY_ACTIONS = ("continue", "pause", "stop")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PowerConfig:
    """The `[power]` section of job.toml."""

    enabled: bool = True
    on_battery: str = "continue"  # continue | pause | stop
    min_percent: float = 10.0  # at or below this while discharging: save and stop
    resume_percent: float = 20.0  # restart after a low-battery stop only from here
    poll_interval_s: float = 2.0
    sysfs_root: str = DEFAULT_SYSFS_ROOT
    where: InitVar[str] = "power"

    def __post_init__(self, where: str) -> None:
        # Built directly or by dataclasses.replace: checked exactly as if read from job.toml.
        s = Section(f"[{where}]", asdict(self))
        _check_power_keys_together(_read_power_keys(s), s)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "power") -> "PowerConfig":
        """Build from the parsed `[power]` table; JobConfigError names `[power] key` and the fix."""
        s = Section(f"[{where}]", d)
        values = _read_power_keys(s)
        s.done()
        return cls(**values, where=where)  # __post_init__ checks the keys together


def _read_power_keys(s: Section) -> dict[str, Any]:
    """Every [power] key, type- and range-checked; PowerConfig's defaults for those left out."""
    d, percent = PowerConfig, " (percent of battery charge)"
    return dict(
        enabled=s.bool("enabled", d.enabled),
        on_battery=s.str("on_battery", d.on_battery, choices=ON_BATTERY_ACTIONS),
        min_percent=s.float("min_percent", d.min_percent, low=0, high=100, hint=percent),
        resume_percent=s.float("resume_percent", d.resume_percent, low=0, high=100, hint=percent),
        poll_interval_s=s.float("poll_interval_s", d.poll_interval_s, low=0, low_open=True, hint=" (seconds)"),
        sysfs_root=s.str("sysfs_root", d.sysfs_root, nonempty=True, hint=f' (a directory, e.g. "{DEFAULT_SYSFS_ROOT}")'),
    )


def _check_power_keys_together(v: Mapping[str, Any], s: Section) -> None:
    if v["resume_percent"] <= v["min_percent"]:
        s.fail(f"must be above min_percent ({v['min_percent']:g}), got {v['resume_percent']:g}; "
               f"e.g. resume_percent = {min(100.0, v['min_percent'] + 10):g}", "resume_percent")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Supply:
    name: str
    type: str  # Mains, USB, Battery, UPS, Wireless, ...
    online: bool | None = None  # adapters
    status: str | None = None  # batteries: Charging, Discharging, Not charging, Full, Unknown
    capacity_percent: float | None = None
    energy_now: float | None = None  # energy_* (µWh) or charge_* (µAh), whichever the driver has
    energy_full: float | None = None
    energy_unit: str | None = None  # "uWh" (energy_*) or "uAh" (charge_*): never mix the two


@dataclass(frozen=True)
class PowerReading:
    """One snapshot of every relevant supply."""

    adapters: tuple[Supply, ...] = ()
    batteries: tuple[Supply, ...] = ()

    @property
    def has_supplies(self) -> bool:
        return bool(self.adapters or self.batteries)

    @property
    def discharging(self) -> bool:
        if any(b.status == "Discharging" for b in self.batteries):
            return True
        # Some drivers say "Unknown": then being off AC is what counts.
        return bool(self.batteries) and not self.on_ac

    @property
    def on_ac(self) -> bool:
        if self.adapters:
            return any(a.online for a in self.adapters)
        if self.batteries:
            # A battery but no adapter node (some firmware): trust the battery.
            return not any(b.status == "Discharging" for b in self.batteries)
        return True  # desktop / server / VM: no supplies at all

    @property
    def battery_percent(self) -> float | None:
        """Combined charge of all batteries (weighted by size when the driver says it)."""
        if not self.batteries:
            return None
        units = {b.energy_unit for b in self.batteries}
        if len(units) == 1 and None not in units and all(
                b.energy_now is not None and b.energy_full for b in self.batteries):
            now = sum(b.energy_now for b in self.batteries)  # type: ignore[misc]
            full = sum(b.energy_full for b in self.batteries)  # type: ignore[misc]
            return max(0.0, min(100.0, 100.0 * now / full))
        caps = [b.capacity_percent for b in self.batteries if b.capacity_percent is not None]
        return sum(caps) / len(caps) if caps else None

    def describe(self) -> str:
        if not self.has_supplies:
            return "no power supplies found (desktop/server): treated as on AC"
        pct = self.battery_percent
        where = "on AC" if self.on_ac else "on battery"
        if pct is None:
            return where
        state = "discharging" if self.discharging else "not discharging"
        return f"{where}, battery {pct:.0f}% {state}"


class PowerSource(Protocol):
    def read(self) -> PowerReading: ...


def _read_attr(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:  # supply unplugged mid-scan, attribute absent, EIO from the EC
        return None


def _num(s: str | None) -> float | None:
    if s is None:
        return None
    try:
        return float(s)
    except ValueError:
        return None


class SysfsPowerSource:
    """Reads /sys/class/power_supply (kernel ABI: sysfs-class-power)."""

    def __init__(self, root: str = DEFAULT_SYSFS_ROOT) -> None:
        self.root = root

    def read(self) -> PowerReading:
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return PowerReading()
        adapters: list[Supply] = []
        batteries: list[Supply] = []
        for name in names:
            d = os.path.join(self.root, name)
            kind = _read_attr(os.path.join(d, "type"))
            if kind is None:
                continue
            # Peripheral batteries (mouse, headset: scope "Device") do not power us.
            if _read_attr(os.path.join(d, "scope")) == "Device":
                continue
            if kind in ADAPTER_TYPES:
                online = _num(_read_attr(os.path.join(d, "online")))
                # USB "online" may be 2 (programmable supply); any non-zero is online.
                adapters.append(Supply(name, kind, online=bool(online) if online is not None else False))
            elif kind == "Battery":
                if _read_attr(os.path.join(d, "present")) == "0":
                    continue  # empty second battery bay
                unit: str | None = "uWh"
                now = _num(_read_attr(os.path.join(d, "energy_now")))
                full = _num(_read_attr(os.path.join(d, "energy_full")))
                if now is None or full is None:
                    unit = "uAh"
                    now = _num(_read_attr(os.path.join(d, "charge_now")))
                    full = _num(_read_attr(os.path.join(d, "charge_full")))
                if now is None or full is None:
                    unit = None
                batteries.append(Supply(
                    name, kind,
                    status=_read_attr(os.path.join(d, "status")),
                    capacity_percent=_num(_read_attr(os.path.join(d, "capacity"))),
                    energy_now=now, energy_full=full, energy_unit=unit,
                ))
        return PowerReading(tuple(adapters), tuple(batteries))


# --------------------------------------------------------------------------- policy


class PowerMode(enum.Enum):
    NORMAL = "normal"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class PowerState:
    mode: PowerMode = PowerMode.NORMAL
    low_battery_latched: bool = False


def _low(config: PowerConfig, r: PowerReading) -> bool:
    pct = r.battery_percent
    return pct is not None and r.discharging and pct <= config.min_percent


def _latch_clears(config: PowerConfig, r: PowerReading) -> bool:
    pct = r.battery_percent
    return pct is None or (pct >= config.resume_percent and not r.discharging)


def blocking_reason(config: PowerConfig, state: PowerState, r: PowerReading) -> str | None:
    """Why a new attempt must not start now, or None. Pure."""
    if not config.enabled:
        return None
    if state.low_battery_latched and not _latch_clears(config, r):
        pct = r.battery_percent
        return (f"battery low ({pct:.0f}%): waiting until it is charging and at "
                f"{config.resume_percent:g}% or more")
    if not r.on_ac and config.on_battery in ("pause", "stop"):
        return f"on battery (power.on_battery = {config.on_battery}): waiting for AC power"
    return None


def decide(config: PowerConfig, state: PowerState, r: PowerReading) -> tuple[PowerState, list[Decision]]:
    """Next state and the decisions for the loop. Pure: no I/O, no clock."""
    if not config.enabled:
        return state, []
    details = {"on_ac": r.on_ac, "battery_percent": r.battery_percent, "discharging": r.discharging}
    what = r.describe()

    if _low(config, r):
        if state.mode is PowerMode.STOPPED:
            return replace(state, low_battery_latched=True), []  # already stopping: just latch
        return PowerState(PowerMode.STOPPED, low_battery_latched=True), [Decision(
            Action.STOP, "low_battery",
            f"{what}, at or below power.min_percent = {config.min_percent:g}%: saving and stopping",
            details)]

    latched = state.low_battery_latched and not _latch_clears(config, r)
    if state.mode is PowerMode.NORMAL:
        if not r.on_ac and config.on_battery == "pause":
            return PowerState(PowerMode.PAUSED, latched), [Decision(
                Action.PAUSE, "on_battery", f"{what}: pausing (power.on_battery = pause)", details)]
        if not r.on_ac and config.on_battery == "stop":
            return PowerState(PowerMode.STOPPED, latched), [Decision(
                Action.STOP, "on_battery", f"{what}: saving and stopping (power.on_battery = stop)", details)]
        return PowerState(PowerMode.NORMAL, latched), []

    # PAUSED or STOPPED: come back once nothing blocks any more.
    new = PowerState(state.mode, latched)
    if blocking_reason(config, new, r) is None:
        verb = "resuming" if state.mode is PowerMode.PAUSED else "restart allowed"
        return PowerState(PowerMode.NORMAL, False), [Decision(
            Action.RESUME, "power_restored", f"{what}: {verb}", details)]
    return new, []


# --------------------------------------------------------------------------- watcher


@dataclass
class PowerWatcher:
    """supervisor.watch.Watcher for the power supply. Reading sysfs takes well under
    a millisecond, so it happens inline in poll(), at most every poll_interval_s."""

    config: PowerConfig
    source: PowerSource | None = None
    name: str = "power"
    state: PowerState = field(default_factory=PowerState)
    reading: PowerReading | None = None
    _last_read: float | None = None
    _pending: list[Decision] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.source is None:
            self.source = SysfsPowerSource(self.config.sysfs_root)

    def _refresh(self, now: float) -> None:
        if not self.config.enabled:
            return
        if self._last_read is not None and now - self._last_read < self.config.poll_interval_s:
            return
        assert self.source is not None
        first = self.reading is None
        self.reading = self.source.read()
        self._last_read = now
        if first:
            log.info("power: %s", self.reading.describe())
        self.state, decisions = decide(self.config, self.state, self.reading)
        self._pending.extend(decisions)  # the supervisor logs each decision it acts on

    def poll(self, now: float) -> list[Decision]:
        self._refresh(now)
        out, self._pending = self._pending, []
        return out

    def blocking_reason(self, now: float) -> str | None:
        self._refresh(now)
        if self.reading is None:
            return None
        return blocking_reason(self.config, self.state, self.reading)

    def on_checkpoint(self, step: int, now: float) -> None:
        pass  # power decisions do not depend on checkpoints

    def status(self) -> dict[str, Any]:
        if not self.config.enabled:
            return {"enabled": False}
        r = self.reading
        if r is None:
            return {"enabled": True, "read": False}
        return {
            "enabled": True,
            "summary": r.describe(),
            "on_ac": r.on_ac,
            "battery_percent": r.battery_percent,
            "discharging": r.discharging,
            "adapters": [{"name": a.name, "type": a.type, "online": a.online} for a in r.adapters],
            "batteries": [{"name": b.name, "status": b.status, "capacity_percent": b.capacity_percent}
                          for b in r.batteries],
            "mode": self.state.mode.value,
            "low_battery_latched": self.state.low_battery_latched,
            "on_battery": self.config.on_battery,
            "blocking": blocking_reason(self.config, self.state, r),
        }

    def close(self) -> None:
        pass
