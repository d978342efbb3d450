"""Pure GPU policies: the `[gpu]` config and the thermal state machine (the OOM back-off
that `[gpu]` configures is supervisor.runner.oom).

Nothing here does I/O, sleeps or reads a clock: every function takes the readings and an
explicit `now` and returns the new state plus the decisions for the supervisor's loop
(docs/architecture.md, "Design rules": policies are pure). `supervisor.watch.gpu.GpuWatcher`
feeds these functions from NVML (supervisor.watch.nvml) or a scripted fake (watch.fake_gpu).

Thermal state machine (hysteresis on the hottest GPU the job uses):

    OK ──temp >= pause_c──▶ PAUSED ──temp <= resume_c──▶ OK
    OK/PAUSED ──temp >= stop_c──▶ STOPPED ──temp <= resume_c──▶ OK

PAUSE asks ranks to hold at a step boundary, STOP asks them to save and exit 75;
while PAUSED or STOPPED no new attempt may start (`blocking_reason`). Between
`resume_c` and `pause_c` nothing changes, so a temperature hovering at a threshold
produces one transition, not a flapping stream.
"""

from __future__ import annotations

import enum
from dataclasses import InitVar, dataclass, fields, replace
from typing import Any, Iterable, Mapping, Sequence

from supervisor.config import Section
from supervisor.watch import Action, Decision


# Names for the bits of nvmlDeviceGetCurrentClocksEventReasons (nvml.h,
# nvmlClocksEventReason*). Bit 0x2 is both "applications clocks" and
# "user defined clocks" (same value in nvml.h).
THROTTLE_BITS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
}
THROTTLE_NAMES: frozenset[str] = frozenset(THROTTLE_BITS.values())


def decode_throttle(mask: int) -> tuple[str, ...]:
    """Bit mask from NVML -> reason names, in bit order; unknown bits as `unknown_0x...`."""
    names = [name for bit, name in sorted(THROTTLE_BITS.items()) if mask & bit]
    rest = mask & ~sum(THROTTLE_BITS)
    bit = 1
    while rest:
        if rest & bit:
            names.append(f"unknown_{bit:#x}")
            rest &= ~bit
        bit <<= 1
    return tuple(names)


# --------------------------------------------------------------------------- config

BACKENDS = ("auto", "nvml", "fake")


@dataclass(frozen=True)
class GpuConfig:
    """The `[gpu]` section of job.toml."""

    enabled: bool = True
    # "nvml": the real driver; "fake": readings from `fake_script` (tests, demos);
    # "auto": the fake when `fake_script` is set, NVML otherwise.
    backend: str = "auto"
    fake_script: str | None = None
    poll_interval_s: float = 2.0
    # Laptop GPUs sit at ~85 C under load and slow down near 87-90 C; datacenter
    # parts throttle around 85-90 C. Pausing at 85 and resuming at 75 gives the
    # cooler ~10 C of room, so a paused run does not bounce on the threshold.
    pause_c: float = 85.0
    resume_c: float = 75.0
    stop_c: float = 92.0
    vram_warn_fraction: float = 0.95
    # The VRAM warning re-arms only once usage is this far below the warning level,
    # so an allocator hovering at the level does not repeat the warning.
    vram_rearm_margin: float = 0.05
    # Throttle reasons worth an event. sw_power_cap and gpu_idle are routine.
    throttle_notice: tuple[str, ...] = ("hw_thermal", "sw_thermal", "hw_power_brake", "hw_slowdown")
    # A throttle episode ends after the reason has been absent this long
    # (NVML's bits flicker from one read to the next).
    throttle_rearm_s: float = 60.0
    oom_recovery: bool = True
    oom_min_micro_batch: int = 1
    where: InitVar[str] = "gpu"

    def __post_init__(self, where: str) -> None:
        # Built directly or by dataclasses.replace: checked exactly as if read from job.toml.
        s = Section(f"[{where}]", self.to_dict())
        _check_gpu_keys_together(_read_gpu_keys(s), s)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "gpu") -> "GpuConfig":
        """Build from the parsed `[gpu]` table; JobConfigError names `[gpu] key` and the fix."""
        s = Section(f"[{where}]", d)
        values = _read_gpu_keys(s)
        s.done()
        return cls(**values, where=where)  # __post_init__ checks the keys together

    def to_dict(self) -> dict[str, Any]:
        """The `[gpu]` table that reads back as this config (None left out, tuples as lists)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if v is not None}


def _read_gpu_keys(s: Section) -> dict[str, Any]:
    """Every [gpu] key, type- and range-checked; GpuConfig's defaults for those left out."""
    d, celsius = GpuConfig, " (degrees Celsius)"
    return dict(
        enabled=s.bool("enabled", d.enabled),
        backend=s.str("backend", d.backend, choices=BACKENDS),
        fake_script=s.str("fake_script", d.fake_script, nonempty=True,
                          hint=' (the path of a JSON or TOML script of readings, e.g. "gpu.json")'),
        poll_interval_s=s.float("poll_interval_s", d.poll_interval_s, low=0.1, high=3600, hint=" (seconds)"),
        pause_c=s.float("pause_c", d.pause_c, low=0, high=150, low_open=True, hint=celsius),
        resume_c=s.float("resume_c", d.resume_c, low=0, high=150, low_open=True, hint=celsius),
        stop_c=s.float("stop_c", d.stop_c, low=0, high=150, low_open=True, hint=celsius),
        vram_warn_fraction=s.float("vram_warn_fraction", d.vram_warn_fraction, low=0, high=1, low_open=True,
                                   hint=" (a fraction of VRAM, e.g. 0.95)"),
        vram_rearm_margin=s.float("vram_rearm_margin", d.vram_rearm_margin, low=0, hint=" (a fraction of VRAM)"),
        throttle_notice=s.str_list("throttle_notice", d.throttle_notice, choices=THROTTLE_NAMES,
                                   example='["hw_thermal", "hw_power_brake"]'),
        throttle_rearm_s=s.float("throttle_rearm_s", d.throttle_rearm_s, low=0, hint=" (seconds)"),
        oom_recovery=s.bool("oom_recovery", d.oom_recovery),
        oom_min_micro_batch=s.int("oom_min_micro_batch", d.oom_min_micro_batch, low=1, hint=" (samples per rank)"),
    )


def _check_gpu_keys_together(v: Mapping[str, Any], s: Section) -> None:
    if v["backend"] == "fake" and not v["fake_script"]:
        s.fail('= "fake" needs fake_script = "PATH" (a JSON or TOML script of readings)', "backend")
    if v["backend"] == "nvml" and v["fake_script"]:
        s.fail('is only read with backend = "fake" or "auto"; remove it or change backend, got backend = "nvml"',
               "fake_script")
    if not v["resume_c"] < v["pause_c"]:
        s.fail(f"must be below pause_c ({_num(v['pause_c'])}), got {_num(v['resume_c'])}", "resume_c")
    if not v["pause_c"] <= v["stop_c"]:
        s.fail(f"must be at or above pause_c ({_num(v['pause_c'])}), got {_num(v['stop_c'])}", "stop_c")
    if not v["vram_rearm_margin"] < v["vram_warn_fraction"]:
        s.fail(f"must be below vram_warn_fraction ({v['vram_warn_fraction']}), got {v['vram_rearm_margin']}",
               "vram_rearm_margin")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# --------------------------------------------------------------------------- readings


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None where the driver cannot tell (NVML_VALUE_NOT_AVAILABLE)


@dataclass(frozen=True)
class GpuReading:
    """One read of one GPU. Fields the device cannot report are None."""

    index: int  # NVML index (PCI bus order), not the CUDA ordinal inside the job
    vram_used_bytes: int | None = None
    vram_total_bytes: int | None = None
    temp_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    throttle: tuple[str, ...] = ()
    processes: tuple[GpuProcess, ...] = ()
    uuid: str | None = None
    name: str | None = None

    @property
    def vram_fraction(self) -> float | None:
        if self.vram_used_bytes is None or not self.vram_total_bytes:
            return None
        return self.vram_used_bytes / self.vram_total_bytes


# --------------------------------------------------------------------------- policies


class ThermalPhase(enum.Enum):
    OK = "ok"
    PAUSED = "paused"  # ranks hold at a step boundary until temp <= resume_c
    STOPPED = "stopped"  # ranks saved and exited; no restart until temp <= resume_c


@dataclass(frozen=True)
class ThermalStep:
    phase: ThermalPhase
    action: Action | None  # None: nothing to do this poll


def thermal_step(cfg: GpuConfig, phase: ThermalPhase, temp_c: float | None) -> ThermalStep:
    """One transition of the hysteresis machine for the hottest GPU's temperature.

    A missing reading (None) changes nothing: no decision is taken blind.
    """
    if temp_c is None:
        return ThermalStep(phase, None)
    if phase is ThermalPhase.OK:
        if temp_c >= cfg.stop_c:
            return ThermalStep(ThermalPhase.STOPPED, Action.STOP)
        if temp_c >= cfg.pause_c:
            return ThermalStep(ThermalPhase.PAUSED, Action.PAUSE)
        return ThermalStep(phase, None)
    if phase is ThermalPhase.PAUSED:
        if temp_c >= cfg.stop_c:
            return ThermalStep(ThermalPhase.STOPPED, Action.STOP)
        if temp_c <= cfg.resume_c:
            return ThermalStep(ThermalPhase.OK, Action.RESUME)
        return ThermalStep(phase, None)
    # STOPPED: ranks are gone (or going); only cooling down ends it. The NOTE
    # records the moment restarts are allowed again.
    if temp_c <= cfg.resume_c:
        return ThermalStep(ThermalPhase.OK, Action.NOTE)
    return ThermalStep(phase, None)


def vram_warning_step(cfg: GpuConfig, warned: bool, fraction: float | None) -> tuple[bool, bool]:
    """-> (warned_now, fire). Fires once per episode; re-arms below the level minus the margin."""
    if fraction is None:
        return warned, False
    if not warned and fraction > cfg.vram_warn_fraction:
        return True, True
    if warned and fraction < cfg.vram_warn_fraction - cfg.vram_rearm_margin:
        return False, False
    return warned, False


def throttle_step(
    cfg: GpuConfig,
    episodes: Mapping[str, float],
    active: Iterable[str],
    now: float,
) -> tuple[dict[str, float], list[str]]:
    """Per GPU: episodes maps reason -> last time seen. Returns (episodes, reasons that just started).

    An episode starts when a noticed reason appears and ends once it has been absent
    for `throttle_rearm_s`, so a bit that flickers on and off is one episode.
    """
    active_set = {r for r in active if r in cfg.throttle_notice}
    out: dict[str, float] = {}
    started: list[str] = []
    for reason, last_seen in episodes.items():
        if reason in active_set or now - last_seen < cfg.throttle_rearm_s:
            out[reason] = last_seen
    for reason in sorted(active_set):
        if reason not in out:
            started.append(reason)
        out[reason] = now
    return out, started


@dataclass(frozen=True)
class WatchState:
    """Everything the GPU policy remembers between polls (immutable; replaced each poll)."""

    phase: ThermalPhase = ThermalPhase.OK
    phase_since_s: float | None = None
    phase_temp_c: float | None = None  # the temperature that caused the current phase
    phase_gpu: int | None = None
    vram_warned: frozenset[int] = frozenset()
    # (gpu index, reason, last seen) of open throttle episodes
    throttle: tuple[tuple[int, str, float], ...] = ()


_THERMAL_EVENTS = {
    (ThermalPhase.PAUSED, Action.PAUSE): "thermal_pause",
    (ThermalPhase.STOPPED, Action.STOP): "thermal_stop",
    (ThermalPhase.OK, Action.RESUME): "thermal_resume",
    (ThermalPhase.OK, Action.NOTE): "thermal_cooled",
}


def evaluate(
    cfg: GpuConfig, state: WatchState, readings: Sequence[GpuReading], now: float
) -> tuple[WatchState, list[Decision]]:
    """Apply all GPU policies to one set of readings (one per GPU the job uses)."""
    state, thermal = _thermal_policy(cfg, state, readings, now)
    warned, vram = _vram_policy(cfg, state.vram_warned, readings)
    throttle, throttled = _throttle_policy(cfg, state.throttle, readings, now)
    return replace(state, vram_warned=warned, throttle=throttle), thermal + vram + throttled


def _thermal_policy(
    cfg: GpuConfig, state: WatchState, readings: Sequence[GpuReading], now: float
) -> tuple[WatchState, list[Decision]]:
    """The hottest GPU decides (one hot rank stalls all of them anyway)."""
    temps = [(r.temp_c, r.index) for r in readings if r.temp_c is not None]
    hot_c, hot_gpu = max(temps) if temps else (None, None)
    step = thermal_step(cfg, state.phase, hot_c)
    if step.action is None:
        return state, []
    assert hot_c is not None
    event = _THERMAL_EVENTS[(step.phase, step.action)]
    details = {"gpu": hot_gpu, "temp_c": hot_c, "pause_c": cfg.pause_c, "resume_c": cfg.resume_c, "stop_c": cfg.stop_c}
    decision = Decision(step.action, event, _thermal_reason(cfg, event, hot_gpu, hot_c, state, now), details)
    return replace(state, phase=step.phase, phase_since_s=now, phase_temp_c=hot_c, phase_gpu=hot_gpu), [decision]


def _vram_policy(
    cfg: GpuConfig, warned: frozenset[int], readings: Sequence[GpuReading]
) -> tuple[frozenset[int], list[Decision]]:
    """One warning per GPU per episode of VRAM use above vram_warn_fraction."""
    now_warned = set(warned)
    decisions: list[Decision] = []
    for r in readings:
        still, fire = vram_warning_step(cfg, r.index in now_warned, r.vram_fraction)
        if still:
            now_warned.add(r.index)
        else:
            now_warned.discard(r.index)
        if fire:
            frac = r.vram_fraction
            assert frac is not None
            decisions.append(Decision(
                Action.NOTE,
                "vram_warning",
                f"GPU {r.index} uses {frac:.0%} of its VRAM ({_gib(r.vram_used_bytes)} of "
                f"{_gib(r.vram_total_bytes)}), above vram_warn_fraction {cfg.vram_warn_fraction:.0%}: "
                "an out-of-memory error is near",
                {"gpu": r.index, "vram_used_bytes": r.vram_used_bytes,
                 "vram_total_bytes": r.vram_total_bytes, "vram_warn_fraction": cfg.vram_warn_fraction},
            ))
    return frozenset(now_warned), decisions


def _throttle_policy(
    cfg: GpuConfig, open_episodes: tuple[tuple[int, str, float], ...], readings: Sequence[GpuReading], now: float
) -> tuple[tuple[tuple[int, str, float], ...], list[Decision]]:
    """One note per GPU when noticed throttle reasons appear; -> (open episodes, decisions)."""
    by_gpu: dict[int, dict[str, float]] = {}
    for gpu, reason, last in open_episodes:
        by_gpu.setdefault(gpu, {})[reason] = last
    episodes: list[tuple[int, str, float]] = []
    decisions: list[Decision] = []
    for r in readings:
        gpu_episodes, started = throttle_step(cfg, by_gpu.get(r.index, {}), r.throttle, now)
        episodes += [(r.index, reason, last) for reason, last in gpu_episodes.items()]
        if started:
            decisions.append(_throttle_note(r, started))
    # A GPU missing from this read keeps its episodes (no reading is not "not throttled").
    seen = {r.index for r in readings}
    episodes += [(g, reason, last) for g, eps in by_gpu.items() if g not in seen for reason, last in eps.items()]
    return tuple(sorted(episodes)), decisions


def _throttle_note(r: GpuReading, started: list[str]) -> Decision:
    return Decision(
        Action.NOTE,
        "gpu_throttle",
        f"GPU {r.index} clocks are held back by {', '.join(started)}"
        + (f" at {_num(r.temp_c)} C" if r.temp_c is not None else "")
        + (f", {r.power_w:.0f} W of {r.power_limit_w:.0f} W" if r.power_w is not None and r.power_limit_w else "")
        + ": training slows down",
        {"gpu": r.index, "reasons": started, "all_reasons": list(r.throttle),
         "temp_c": r.temp_c, "power_w": r.power_w, "power_limit_w": r.power_limit_w},
    )


def _thermal_reason(cfg: GpuConfig, event: str, gpu: int | None, temp_c: float, state: WatchState, now: float) -> str:
    t = f"GPU {gpu} is at {_num(temp_c)} C"
    waited = f" after {now - state.phase_since_s:.0f} s" if state.phase_since_s is not None else ""
    if event == "thermal_pause":
        return f"{t}, at or above pause_c {_num(cfg.pause_c)} C: pausing at the next step boundary until it is at or below resume_c {_num(cfg.resume_c)} C"
    if event == "thermal_stop":
        return f"{t}, at or above stop_c {_num(cfg.stop_c)} C: saving and stopping; restart waits until it is at or below resume_c {_num(cfg.resume_c)} C"
    if event == "thermal_resume":
        return f"{t}, at or below resume_c {_num(cfg.resume_c)} C{waited}: resuming"
    return f"{t}, at or below resume_c {_num(cfg.resume_c)} C{waited}: cooled, restarts allowed again"


def blocking_reason(cfg: GpuConfig, state: WatchState) -> str | None:
    """Why a new attempt must not start now, or None."""
    if state.phase is ThermalPhase.OK:
        return None
    temp = f" (at {_num(state.phase_temp_c)} C)" if state.phase_temp_c is not None else ""
    what = "stopped" if state.phase is ThermalPhase.STOPPED else "paused"
    return f"GPU {state.phase_gpu} too hot{temp}: {what}, waiting until it is at or below resume_c {_num(cfg.resume_c)} C"


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"
