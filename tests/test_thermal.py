"""Pure GPU policies: [gpu] config validation, thermal hysteresis, VRAM/throttle episodes, OOM back-off."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.runner.oom import next_batch_shape, oom_give_up_reason
from supervisor.watch.thermal import (
    THROTTLE_BITS,
    GpuConfig,
    GpuReading,
    ThermalPhase,
    WatchState,
    blocking_reason,
    decode_throttle,
    evaluate,
    thermal_step,
    throttle_step,
    vram_warning_step,
)
from supervisor.config import JobConfigError
from supervisor.watch import Action

CFG = GpuConfig(pause_c=80, resume_c=70, stop_c=90)
OK, PAUSED, STOPPED = ThermalPhase.OK, ThermalPhase.PAUSED, ThermalPhase.STOPPED

# --------------------------------------------------------------------------- config


def test_defaults_are_valid_and_ints_become_floats():
    c = GpuConfig.from_dict({"pause_c": 80, "resume_c": 70, "stop_c": 95, "poll_interval_s": 1})
    assert (c.pause_c, c.resume_c, c.stop_c, c.poll_interval_s) == (80.0, 70.0, 95.0, 1.0)
    assert isinstance(c.pause_c, float)
    assert GpuConfig.from_dict({}) == GpuConfig()
    assert GpuConfig.from_dict({"throttle_notice": ["hw_thermal"]}).throttle_notice == ("hw_thermal",)
    # round trip through to_dict (what the manifest/validate would show)
    assert GpuConfig.from_dict(GpuConfig(pause_c=81).to_dict()) == GpuConfig(pause_c=81)


@pytest.mark.parametrize(
    "table, message",
    [
        ({"pause_c": 80, "resume_c": 85}, "[gpu] resume_c must be below pause_c (80), got 85"),
        ({"pause_c": 80, "resume_c": 80}, "[gpu] resume_c must be below pause_c (80), got 80"),
        ({"pause_c": 90, "stop_c": 88}, "[gpu] stop_c must be at or above pause_c (90), got 88"),
        ({"pause_temp_c": 80}, "[gpu] unknown key 'pause_temp_c' (did you mean 'pause_c'?); known keys: backend,"),
        ({"oom_min_microbatch": 2}, "did you mean 'oom_min_micro_batch'?"),
        ({"frobnicate": 1}, "[gpu] unknown key 'frobnicate'; known keys: backend, enabled,"),
        ({"pause_c": "85"}, "[gpu] pause_c must be a number (degrees Celsius), got a string '85'"),
        ({"pause_c": True}, "[gpu] pause_c must be a number"),
        ({"enabled": 1}, "[gpu] enabled must be true or false, got an integer 1"),
        ({"oom_min_micro_batch": 1.5}, "[gpu] oom_min_micro_batch must be an integer (samples per rank), got a number 1.5"),
        ({"oom_min_micro_batch": 0}, "[gpu] oom_min_micro_batch must be >= 1 (samples per rank), got 0"),
        ({"backend": "nvlm"}, '[gpu] backend must be one of "auto", "nvml", "fake", got \'nvlm\' (did you mean \'nvml\'?)'),
        ({"backend": "fake"}, '[gpu] backend = "fake" needs fake_script = "PATH"'),
        ({"backend": "nvml", "fake_script": "x.toml"}, "[gpu] fake_script is only read with backend"),
        ({"poll_interval_s": 0}, "[gpu] poll_interval_s must be >= 0.1 (seconds), got 0"),
        ({"vram_warn_fraction": 1.5}, "[gpu] vram_warn_fraction must be <= 1 (a fraction of VRAM, e.g. 0.95), got 1.5"),
        ({"vram_warn_fraction": 0.5, "vram_rearm_margin": 0.6}, "[gpu] vram_rearm_margin must be below vram_warn_fraction (0.5), got 0.6"),
        ({"stop_c": 200}, "[gpu] stop_c must be <= 150 (degrees Celsius), got 200"),
        ({"pause_c": float("nan")}, "[gpu] pause_c must be a finite number"),
        ({"throttle_notice": "hw_thermal"}, '[gpu] throttle_notice must be an array of strings such as ["hw_thermal", "hw_power_brake"]'),
        ({"throttle_notice": ["hw_thermall"]}, "[gpu] throttle_notice has unknown entry 'hw_thermall' (did you mean 'hw_thermal'?)"),
        ({"throttle_rearm_s": -1}, "[gpu] throttle_rearm_s must be >= 0 (seconds), got -1"),
        ({"fake_script": ""}, "[gpu] fake_script must not be empty"),
    ],
)
def test_bad_config_names_key_and_fix(table, message):
    with pytest.raises(JobConfigError) as e:
        GpuConfig.from_dict(table)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert e.value.exit_code == 2  # the one job.toml error type: exit 2 from any command


def test_where_is_the_key_path_and_direct_construction_validates_too():
    with pytest.raises(JobConfigError, match=r"^\[jobs\.a\.gpu\] resume_c must be below"):
        GpuConfig.from_dict({"resume_c": 99}, where="jobs.a.gpu")
    with pytest.raises(JobConfigError, match=r"^\[gpu\] must be a table"):
        GpuConfig.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(JobConfigError, match=r"^\[gpu\] resume_c must be below pause_c \(85\), got 90"):
        GpuConfig(resume_c=90)
    with pytest.raises(JobConfigError):
        dataclasses.replace(CFG, stop_c=10)


# --------------------------------------------------------------------------- thermal machine


@pytest.mark.parametrize(
    "phase, temp, new_phase, action",
    [
        (OK, None, OK, None),
        (OK, 60, OK, None),
        (OK, 79.9, OK, None),
        (OK, 80, PAUSED, Action.PAUSE),  # at pause_c: pause
        (OK, 89, PAUSED, Action.PAUSE),
        (OK, 90, STOPPED, Action.STOP),  # at stop_c: straight to stop
        (OK, 120, STOPPED, Action.STOP),
        (PAUSED, None, PAUSED, None),
        (PAUSED, 85, PAUSED, None),
        (PAUSED, 79, PAUSED, None),  # below pause_c but above resume_c: hold (hysteresis)
        (PAUSED, 70.1, PAUSED, None),
        (PAUSED, 70, OK, Action.RESUME),  # at resume_c: resume
        (PAUSED, 90, STOPPED, Action.STOP),  # still heating while paused: stop
        (STOPPED, None, STOPPED, None),
        (STOPPED, 95, STOPPED, None),
        (STOPPED, 85, STOPPED, None),
        (STOPPED, 71, STOPPED, None),
        (STOPPED, 70, OK, Action.NOTE),  # cooled: restarts allowed
    ],
)
def test_thermal_step_table(phase, temp, new_phase, action):
    step = thermal_step(CFG, phase, temp)
    assert (step.phase, step.action) == (new_phase, action)


def run_temps(temps, cfg=CFG, throttle=()):
    """Feed one GPU's temperatures, one per second; return [(t, action, event)]."""
    state, out = WatchState(), []
    for t, temp in enumerate(temps):
        state, ds = evaluate(cfg, state, [GpuReading(index=0, temp_c=temp, throttle=throttle)], float(t))
        out += [(t, d.action, d.event) for d in ds]
    return state, out


def test_no_flapping_at_the_pause_threshold():
    # Hovering at pause_c +- 1 for a while, then at resume_c +- 1: one pause, one resume.
    temps = [60, 79, 80, 79, 80, 81, 79, 80, 79, 75, 71, 70, 71, 70, 69, 71, 79, 70]
    _, actions = run_temps(temps)
    assert actions == [(2, Action.PAUSE, "thermal_pause"), (11, Action.RESUME, "thermal_resume")]


@pytest.mark.parametrize("wobble", [0.0, 0.5, 1.0, 5.0, 9.9])
def test_hysteresis_holds_for_any_wobble_inside_the_band(wobble):
    # Oscillating anywhere strictly between resume_c and pause_c never changes phase.
    temps = [80] + [75 + (wobble if i % 2 else -wobble) / 2 for i in range(50)]
    state, actions = run_temps(temps)
    assert actions == [(0, Action.PAUSE, "thermal_pause")]
    assert state.phase is PAUSED


def test_stop_blocks_until_cooled_then_allows_restart():
    temps = [60, 85, 91, 92, 88, 80, 71, 70, 60, 80]
    state, out = WatchState(), []
    blocked = []
    for t, temp in enumerate(temps):
        state, ds = evaluate(CFG, state, [GpuReading(index=0, temp_c=temp)], float(t))
        out += [(t, d.action, d.event) for d in ds]
        blocked.append(blocking_reason(CFG, state) is not None)
    assert out == [
        (1, Action.PAUSE, "thermal_pause"),
        (2, Action.STOP, "thermal_stop"),
        (7, Action.NOTE, "thermal_cooled"),
        (9, Action.PAUSE, "thermal_pause"),
    ]
    assert blocked == [False, True, True, True, True, True, True, False, False, True]


def test_reasons_name_temperatures_and_thresholds():
    state, ds = evaluate(CFG, WatchState(), [GpuReading(index=3, temp_c=91)], 10.0)
    (d,) = ds
    assert d.reason == "GPU 3 is at 91 C, at or above stop_c 90 C: saving and stopping; restart waits until it is at or below resume_c 70 C"
    assert d.details == {"gpu": 3, "temp_c": 91, "pause_c": 80.0, "resume_c": 70.0, "stop_c": 90.0}
    assert blocking_reason(CFG, state) == "GPU 3 too hot (at 91 C): stopped, waiting until it is at or below resume_c 70 C"
    state, (d,) = evaluate(CFG, state, [GpuReading(index=3, temp_c=65)], 55.0)
    assert d.reason == "GPU 3 is at 65 C, at or below resume_c 70 C after 45 s: cooled, restarts allowed again"


def test_hottest_gpu_decides_and_missing_temps_change_nothing():
    readings = [GpuReading(index=0, temp_c=60), GpuReading(index=1, temp_c=None), GpuReading(index=2, temp_c=83)]
    state, ds = evaluate(CFG, WatchState(), readings, 0.0)
    assert [(d.action, d.details["gpu"]) for d in ds] == [(Action.PAUSE, 2)]
    # No temperature at all (sensor not supported): stays paused, no decision taken blind.
    state, ds = evaluate(CFG, state, [GpuReading(index=2, temp_c=None)], 1.0)
    assert ds == [] and state.phase is PAUSED


# --------------------------------------------------------------------------- VRAM


@pytest.mark.parametrize(
    "warned, fraction, expect",
    [
        (False, None, (False, False)),
        (False, 0.5, (False, False)),
        (False, 0.95, (False, False)),  # at the level: not above
        (False, 0.951, (True, True)),
        (True, 0.99, (True, False)),  # same episode: silent
        (True, 0.93, (True, False)),  # below the level but inside the margin: still the same episode
        (True, 0.899, (False, False)),  # below level - margin: re-armed
        (True, None, (True, False)),
    ],
)
def test_vram_warning_step_table(warned, fraction, expect):
    assert vram_warning_step(GpuConfig(vram_warn_fraction=0.95, vram_rearm_margin=0.05), warned, fraction) == expect


def test_vram_warning_fires_once_per_episode_per_gpu():
    cfg = GpuConfig(vram_warn_fraction=0.9, vram_rearm_margin=0.1)
    total = 4 * 2**30
    fractions = [0.5, 0.91, 0.95, 0.99, 0.89, 0.92, 0.7, 0.79, 0.85, 0.93, 0.93]
    state, fired = WatchState(), []
    for t, f in enumerate(fractions):
        readings = [
            GpuReading(index=0, vram_used_bytes=int(f * total), vram_total_bytes=total),
            GpuReading(index=1, vram_used_bytes=int(0.95 * total), vram_total_bytes=total),
        ]
        state, ds = evaluate(cfg, state, readings, float(t))
        fired += [(t, d.details["gpu"]) for d in ds if d.event == "vram_warning"]
    # GPU 0: first episode at t=1 (0.89/0.92 stay inside the margin), re-armed at t=7 (< 0.8), again at t=9.
    # GPU 1: constantly high -> exactly once.
    assert fired == [(0, 1), (1, 0), (9, 0)]


def test_vram_warning_reason_is_readable():
    used = int(3.9 * 2**30)
    _, (d,) = evaluate(GpuConfig(), WatchState(), [GpuReading(index=0, vram_used_bytes=used, vram_total_bytes=4 * 2**30)], 0.0)
    assert d.action is Action.NOTE
    assert d.reason == ("GPU 0 uses 97% of its VRAM (3.90 GiB of 4.00 GiB), above vram_warn_fraction 95%: "
                        "an out-of-memory error is near")


# --------------------------------------------------------------------------- throttling


def test_throttle_noted_once_per_episode_with_time_rearm():
    cfg = GpuConfig(throttle_rearm_s=10)
    seq = [(), ("hw_thermal",), ("hw_thermal",), (), ("hw_thermal",), (), (), ("sw_power_cap",), ("gpu_idle",)]
    episodes: dict[str, float] = {}
    started_at = []
    for t, active in enumerate(seq):
        episodes, started = throttle_step(cfg, episodes, active, float(t))
        started_at += [(t, r) for r in started]
    # flickering off at t=3 and t=5-6 is shorter than 10 s: one episode; routine reasons ignored
    assert started_at == [(1, "hw_thermal")]
    episodes, started = throttle_step(cfg, episodes, [], 14.0)
    assert episodes == {}  # last seen at 4, absent for 10 s: episode over
    _, started = throttle_step(cfg, episodes, ["hw_thermal", "hw_power_brake"], 15.0)
    assert started == ["hw_power_brake", "hw_thermal"]


def test_throttle_note_through_evaluate_names_gpu_and_power():
    r = GpuReading(index=1, temp_c=88, power_w=249.6, power_limit_w=250, throttle=("sw_power_cap", "hw_power_brake"))
    state, ds = evaluate(GpuConfig(), WatchState(), [r], 0.0)
    (d,) = [d for d in ds if d.event == "gpu_throttle"]
    assert d.action is Action.NOTE
    assert d.details["reasons"] == ["hw_power_brake"]
    assert d.reason == "GPU 1 clocks are held back by hw_power_brake at 88 C, 250 W of 250 W: training slows down"
    _, ds = evaluate(GpuConfig(), state, [r], 1.0)
    assert [d for d in ds if d.event == "gpu_throttle"] == []


@pytest.mark.parametrize(
    "mask, names",
    [
        (0, ()),
        (0x40, ("hw_thermal",)),
        (0x1 | 0x4, ("gpu_idle", "sw_power_cap")),
        (0x20 | 0x80 | 0x8, ("hw_slowdown", "sw_thermal", "hw_power_brake")),
        (0x200 | 0x40, ("hw_thermal", "unknown_0x200")),
    ],
)
def test_decode_throttle(mask, names):
    assert decode_throttle(mask) == names


def test_throttle_bits_match_pynvml_constants():
    import pynvml

    expect = {
        "gpu_idle": "GpuIdle", "applications_clocks": "ApplicationsClocksSetting", "sw_power_cap": "SwPowerCap",
        "hw_slowdown": "HwSlowdown", "sync_boost": "SyncBoost", "sw_thermal": "SwThermalSlowdown",
        "hw_thermal": "HwThermalSlowdown", "hw_power_brake": "HwPowerBrakeSlowdown", "display_clocks": "DisplayClockSetting",
    }
    for bit, name in THROTTLE_BITS.items():
        assert getattr(pynvml, "nvmlClocksEventReason" + expect[name]) == bit, name


# --------------------------------------------------------------------------- OOM


@pytest.mark.parametrize(
    "mb, ga, floor, expect",
    [
        (32, 1, 1, (16, 2)),
        (16, 2, 1, (8, 4)),
        (2, 8, 1, (1, 16)),
        (1, 16, 1, None),  # at the floor: give up
        (8, 1, 4, (4, 2)),
        (4, 2, 4, None),  # 2 would be below the floor
        (6, 1, 1, (3, 2)),
        (3, 2, 1, (1, 6)),  # odd: largest divisor of 6 that is <= 1
        (5, 2, 1, (2, 5)),  # odd: 2 divides 10, 2.5 is not a batch
        (7, 1, 1, (1, 7)),  # prime effective batch: straight to 1
        (9, 4, 1, (4, 9)),
        (9, 4, 3, (4, 9)),
        (7, 1, 2, None),  # only 1 divides 7, below the floor
    ],
)
def test_next_batch_shape_table(mb, ga, floor, expect):
    assert next_batch_shape(mb, ga, floor) == expect


@pytest.mark.parametrize("args", [(0, 1), (4, 0), (4, 1, 0), (2.0, 1), (True, 1)])
def test_next_batch_shape_rejects_bad_input(args):
    with pytest.raises(ValueError):
        next_batch_shape(*args)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4096), st.integers(1, 512), st.integers(1, 64))
def test_next_batch_shape_preserves_effective_batch(mb, ga, floor):
    shape = next_batch_shape(mb, ga, floor)
    if shape is None:
        # giving up only when no divisor of the effective batch lies in [floor, mb // 2]
        assert not any((mb * ga) % c == 0 for c in range(floor, mb // 2 + 1))
        return
    new_mb, new_ga = shape
    assert new_mb * new_ga == mb * ga
    assert floor <= new_mb <= mb // 2
    assert new_ga >= 2 * ga or mb % 2 == 1


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 1024), st.integers(1, 64))
def test_repeated_backoff_terminates_at_the_floor(mb, ga):
    effective, steps = mb * ga, 0
    shape: tuple[int, int] | None = (mb, ga)
    while shape is not None:
        last = shape
        shape = next_batch_shape(*shape)
        steps += 1
        assert shape is None or shape[0] * shape[1] == effective
    assert last[0] == 1 and steps <= mb.bit_length() + 1


def test_give_up_reason_names_the_fix():
    msg = oom_give_up_reason(1, 16, 1)
    assert "micro-batch 1" in msg and "effective batch 16" in msg and "oom_min_micro_batch" in msg


def test_policies_import_neither_torch_nor_pynvml():
    code = "import sys, supervisor.watch.thermal, supervisor.watch.gpu; bad = {'torch', 'accelerate', 'pynvml'} & set(sys.modules); assert not bad, bad"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
