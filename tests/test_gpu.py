"""GPU watch I/O edge: scripted fake backend, the real NVML path up to "library not found",
the NvmlBackend's calls checked against pynvml's real signatures, CUDA_VISIBLE_DEVICES mapping."""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from types import SimpleNamespace

import pytest

from supervisor_helpers import wait_for
from supervisor.watch.fake_gpu import FakeGpuBackend, FakeScript, load_fake_script
from supervisor.watch.gpu import GpuWatcher, build_gpu_watcher, visible_nvml_indices
from supervisor.watch.nvml import GpuUnavailable, NvmlBackend
from supervisor.config import JobConfigError
from supervisor.watch.thermal import GpuConfig, GpuReading
from supervisor.watch import Action

GIB = 2**30


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


CFG = GpuConfig(pause_c=80, resume_c=70, stop_c=90, poll_interval_s=1.0)


def fake_watcher(points, *, cfg=CFG, cvd=None, clock=None, **script):
    clock = clock or Clock()
    backend = FakeGpuBackend(FakeScript.from_obj({"points": points, **script}), start_s=clock(), clock=clock)
    return GpuWatcher(cfg, backend, cuda_visible_devices=cvd, threaded=False, clock=clock), clock


def drive(watcher, clock, seconds, step_s=1.0):
    """Advance time second by second, polling like the supervisor loop; [(t, action, event, blocked)]."""
    out = []
    start = clock.t
    for k in range(int(seconds / step_s) + 1):
        clock.t = start + k * step_s
        for d in watcher.poll(clock.t):
            out.append((round(clock.t - start), d.action, d.event))
    return out


def thermal(events):
    return [e for e in events if e[2].startswith("thermal")]


# --------------------------------------------------------------------------- fake backend + watcher


def test_temperature_ramp_pauses_then_resumes():
    ramp = [{"t_s": t, "temp_c": c, "vram_used_bytes": GIB, "vram_total_bytes": 4 * GIB}
            for t, c in [(0, 60), (5, 75), (10, 80), (15, 84), (20, 79), (25, 72), (30, 70), (35, 65)]]
    w, clock = fake_watcher(ramp)
    events = drive(w, clock, 40)
    assert events[0] == (0, Action.NOTE, "gpu_watch_started")
    assert thermal(events) == [(10, Action.PAUSE, "thermal_pause"), (30, Action.RESUME, "thermal_resume")]
    # blocking while paused too: a crashed attempt must not restart into the heat
    w2, clock2 = fake_watcher(ramp)
    drive(w2, clock2, 12)
    assert w2.blocking_reason(clock2.t) == "GPU 0 too hot (at 80 C): paused, waiting until it is at or below resume_c 70 C"


def test_spike_over_stop_c_stops_and_blocks_until_cooled():
    points = [{"t_s": 0, "temp_c": 60}, {"t_s": 3, "temp_c": 95}, {"t_s": 6, "temp_c": 85},
              {"t_s": 12, "temp_c": 71}, {"t_s": 18, "temp_c": 70}, {"t_s": 20, "temp_c": 60}]
    w, clock = fake_watcher(points)
    blocked = {}
    events = []
    for t in range(0, 25):
        clock.t = 1000.0 + t
        events += [(t, d.action, d.event) for d in w.poll(clock.t)]
        blocked[t] = w.blocking_reason(clock.t)
    assert thermal(events) == [(3, Action.STOP, "thermal_stop"), (18, Action.NOTE, "thermal_cooled")]
    assert all(blocked[t] is None for t in (0, 1, 2, 18, 19, 24))
    assert all(blocked[t] is not None for t in range(3, 18))
    assert "stopped" in blocked[10] and "95 C" in blocked[10]
    assert w.status()["thermal"] == "ok"


def test_status_reports_each_visible_gpu():
    points = [
        {"t_s": 0, "gpu": 0, "temp_c": 50, "vram_used_bytes": GIB, "vram_total_bytes": 4 * GIB,
         "power_w": 30.04, "power_limit_w": 80, "processes": [{"pid": 11, "used_bytes": GIB}, {"pid": 99, "used_bytes": 5}]},
        {"t_s": 0, "gpu": 1, "temp_c": 88, "vram_used_bytes": 3 * GIB, "vram_total_bytes": 4 * GIB,
         "throttle": ["hw_thermal", "sw_power_cap"]},
    ]
    w, clock = fake_watcher(points)
    assert w.status() == {"available": False, "reason": "starting: no reading yet", "backend": "fake"}
    events = drive(w, clock, 0)
    assert [e[2] for e in events] == ["gpu_watch_started", "thermal_pause", "gpu_throttle"]
    w.set_job_pids([11])
    s = w.status()
    json.dumps(s)  # JSON-able for supervisor.json
    assert s["available"] is True and s["thermal"] == "paused" and s["backend"] == "fake"
    assert s["blocking"].startswith("GPU 1 too hot")
    g0, g1 = s["gpus"]
    assert g0 == {
        "index": 0, "cuda_index": 0, "uuid": "GPU-00000000-0000-4000-8000-000000000000", "name": "Fake GPU",
        "vram_used_bytes": GIB, "vram_total_bytes": 4 * GIB, "vram_fraction": 0.25, "temp_c": 50,
        "power_w": 30.0, "power_limit_w": 80.0, "throttle": [], "processes": [{"pid": 11, "used_bytes": GIB}],
    }
    assert g1["throttle"] == ["hw_thermal", "sw_power_cap"] and g1["temp_c"] == 88 and g1["power_w"] is None


def test_values_hold_between_points_and_missing_keys_carry_over():
    s = FakeScript.from_obj([
        {"t_s": 0, "temp_c": 40, "vram_used_bytes": 1, "vram_total_bytes": 10, "throttle": ["hw_slowdown"]},
        {"t_s": 10, "temp_c": 90},
        {"t_s": 20, "throttle": []},
    ])
    assert s.at(0, 0).temp_c == 40 and s.at(0, 9.99).temp_c == 40
    assert s.at(0, 10).temp_c == 90 and s.at(0, 10).vram_used_bytes == 1 and s.at(0, 10).throttle == ("hw_slowdown",)
    assert s.at(0, 25) == GpuReading(index=0, temp_c=90, vram_used_bytes=1, vram_total_bytes=10, throttle=(),
                                     uuid=s.uuids[0], name="Fake GPU")


def test_vram_warning_once_per_episode_through_the_watcher():
    used = [0.5, 0.97, 0.99, 0.98, 0.5, 0.96, 0.97]
    points = [{"t_s": t, "temp_c": 50, "vram_used_bytes": int(f * 4 * GIB), "vram_total_bytes": 4 * GIB}
              for t, f in enumerate(used)]
    w, clock = fake_watcher(points)
    events = drive(w, clock, 8)
    assert [t for t, a, e in events if e == "vram_warning"] == [1, 5]


def test_backend_failure_mid_run_goes_unmonitored_once_and_resumes(caplog):
    points = [{"t_s": 0, "temp_c": 85}, {"t_s": 4, "fail": "nvmlDeviceGetMemoryInfo on GPU 0: the GPU is lost"}]
    w, clock = fake_watcher(points)
    with caplog.at_level(logging.WARNING, logger="supervisor.watch.gpu"):
        events = drive(w, clock, 10)
    assert events == [
        (0, Action.NOTE, "gpu_watch_started"),
        (0, Action.PAUSE, "thermal_pause"),
        (4, Action.NOTE, "gpu_unmonitored"),
        (4, Action.RESUME, "thermal_resume"),  # never hold ranks on a sensor that is gone
    ]
    assert w.blocking_reason(clock.t) is None
    assert w.status() == {"available": False, "reason": "nvmlDeviceGetMemoryInfo on GPU 0: the GPU is lost", "backend": "fake"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "The run continues unmonitored" in warnings[0].getMessage()


def test_poll_interval_is_respected():
    w, clock = fake_watcher([{"t_s": 0, "temp_c": 50}], cfg=GpuConfig(poll_interval_s=5))
    for k in range(21):
        clock.t = 1000.0 + k
        w.poll(clock.t)
    assert w.backend.reads == 5  # t = 0, 5, 10, 15, 20


# --------------------------------------------------------------------------- script files


def test_script_loads_from_json_and_toml(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps([{"t_s": 0, "temp_c": 50}, {"t_s": 5, "temp_c": 81}]))
    (tmp_path / "s.toml").write_text('device_count = 2\n[[points]]\nt_s = 0\ntemp_c = 50\n[[points]]\nt_s = 5\ngpu = 1\ntemp_c = 81\n')
    j, t = load_fake_script(tmp_path / "s.json"), load_fake_script(tmp_path / "s.toml")
    assert j.at(0, 6).temp_c == 81 and j.device_count == 1
    assert t.device_count == 2 and t.at(1, 6).temp_c == 81 and t.at(0, 6).temp_c == 50


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"points": []}, "needs a non-empty list `points`"),
        ("x", "must be a list of points or a table with `points`"),
        ([{"temp_c": 5}], "point 0: t_s must be a number of seconds >= 0"),
        ([{"t_s": 0, "temp": 5}], "point 0: unknown key(s) ['temp']"),
        ([{"t_s": 0}, {"t_s": 1, "temp_c": "hot"}], "point 1: temp_c must be a number, got 'hot'"),
        ([{"t_s": 0, "vram_used_bytes": 1.5}], "point 0: vram_used_bytes must be an integer number of bytes"),
        ([{"t_s": 0, "throttle": ["thermal"]}], "point 0: throttle must be a list of"),
        ({"points": [{"t_s": 0, "gpu": 2}], "device_count": 2}, "device_count must be an integer above every point's gpu (2)"),
        ({"points": [{"t_s": 0}], "gpus": 2}, "unknown top-level key(s) ['gpus']"),
    ],
)
def test_bad_script_names_the_point_and_key(obj, message):
    with pytest.raises(JobConfigError) as e:
        FakeScript.from_obj(obj, source="gpu.json")
    assert str(e.value).startswith("gpu.json: ") and message in str(e.value)


def test_unreadable_or_malformed_script_file(tmp_path):
    with pytest.raises(JobConfigError, match=r"fake_script .*nope.toml' cannot be read .*fix the path"):
        load_fake_script(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[[points]\n")
    with pytest.raises(JobConfigError, match=r"bad.toml: not valid TOML"):
        load_fake_script(tmp_path / "bad.toml")


def test_build_gpu_watcher_from_config(tmp_path):
    assert build_gpu_watcher(GpuConfig(enabled=False), base_dir=tmp_path) is None
    (tmp_path / "heat.json").write_text(json.dumps([{"t_s": 0, "temp_c": 99}]))
    clock = Clock()
    w = build_gpu_watcher(GpuConfig.from_dict({"fake_script": "heat.json"}), base_dir=tmp_path,
                          env={"CUDA_VISIBLE_DEVICES": "0"}, clock=clock, threaded=False)
    assert isinstance(w.backend, FakeGpuBackend)  # backend "auto" + fake_script -> the fake
    assert all(callable(getattr(w, m)) for m in ("poll", "blocking_reason", "on_checkpoint", "status", "close"))
    assert w.name == "gpu"
    assert [d.event for d in w.poll(clock.t)] == ["gpu_watch_started", "thermal_stop"]
    w.close()
    nv = build_gpu_watcher(GpuConfig(), base_dir=tmp_path, env={})
    assert isinstance(nv.backend, NvmlBackend)
    nv.close()
    with pytest.raises(JobConfigError, match="cannot be read"):
        build_gpu_watcher(GpuConfig(backend="fake", fake_script="missing.json"), base_dir=tmp_path)


# --------------------------------------------------------------------------- threads


class HangingBackend(FakeGpuBackend):
    """Reads hang (a wedged driver) once `hang` is set, until `release` is set."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.hang = threading.Event()
        self.release = threading.Event()
        self.in_read = threading.Event()

    def read(self, index):
        if self.hang.is_set():
            self.in_read.set()
            self.release.wait(30)
        return super().read(index)


def test_threaded_poll_never_waits_for_a_hung_backend():
    clock = Clock()
    backend = HangingBackend(FakeScript.from_obj([{"t_s": 0, "temp_c": 85}]), start_s=clock(), clock=clock)
    w = GpuWatcher(GpuConfig(poll_interval_s=0.1), backend, threaded=True, clock=clock, stale_after_s=30)
    try:
        w.start()
        wait_for(lambda: w.status()["available"] is True, 10, "the sampler's first reading", interval=0.01)
        assert [d.event for d in w.poll(clock.t)] == ["gpu_watch_started", "thermal_pause"]
        backend.hang.set()
        assert backend.in_read.wait(10)  # the sampler thread is now stuck inside read()
        result: list = []
        poller = threading.Thread(target=lambda: result.append((w.poll(clock.t), w.status(), w.blocking_reason(clock.t))))
        poller.start()
        poller.join(5)
        assert not poller.is_alive(), "poll() blocked on the backend"
        clock.t += 31  # no reading for 31 s: noted once as stale, thermal state held
        events = [d.event for d in w.poll(clock.t)] + [d.event for d in w.poll(clock.t)]
        assert events == ["gpu_readings_stale"]
        assert w.blocking_reason(clock.t) is not None
    finally:
        backend.release.set()
        w.close()
    assert w._thread is not None and not w._thread.is_alive()


# --------------------------------------------------------------------------- the real NVML path


def test_real_nvml_path_without_a_driver_warns_once_and_continues(caplog):
    w = GpuWatcher(GpuConfig(poll_interval_s=0.1), NvmlBackend(), threaded=True)
    with caplog.at_level(logging.WARNING, logger="supervisor.watch.gpu"):
        w.start()
        w._thread.join(10)  # opening fails fast: the thread ends
        first = w.poll(time.monotonic())
        again = w.poll(time.monotonic()) + w.poll(time.monotonic())
    w.close()
    status = w.status()
    assert status["available"] is False and status["backend"] == "nvml"
    assert status["reason"] == "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this machine"
    assert [(d.action, d.event) for d in first] == [(Action.NOTE, "gpu_unmonitored")]
    assert again == []
    assert w.blocking_reason(time.monotonic()) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "GPU monitoring is off: NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this machine. "
        "The run continues unmonitored (no thermal pause, no VRAM warning); set [gpu] enabled = false to silence this."
    ]


def test_nvml_backend_open_raises_the_clear_reason():
    b = NvmlBackend()
    with pytest.raises(GpuUnavailable, match="^NVML library not found"):
        b.open()
    b.close()  # harmless when never opened


class FakeNvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


def fake_pynvml(calls, *, temp_v=True, power=True, temp_v_missing_in_driver=False, lost=False, mismatch=False,
                cc=lambda h: (8, 6) if h == "h1" else (7, 5)):
    """A stand-in for the pynvml module: records every call so it can be checked against the real signatures."""
    def rec(name, result):
        def fn(*args):
            calls.append((name, args))
            return result(*args) if callable(result) else result
        return fn

    def raise_(code):
        def r(*args):
            raise FakeNvmlError(code)
        return r

    class Mismatch(Exception):
        pass

    def temp_v_impl(h, sensor):
        if temp_v_missing_in_driver:
            raise FakeNvmlError(13)
        return 71

    def procs(h):
        if mismatch:
            raise Mismatch("driver too old")
        return [SimpleNamespace(pid=42, usedGpuMemory=512), SimpleNamespace(pid=43, usedGpuMemory=None)]

    mod = SimpleNamespace(
        NVMLError=FakeNvmlError,
        NVMLLibraryMismatchError=Mismatch,
        nvmlInit=rec("nvmlInit", None),
        nvmlShutdown=rec("nvmlShutdown", None),
        nvmlDeviceGetCount=rec("nvmlDeviceGetCount", 2),
        nvmlDeviceGetHandleByIndex=rec("nvmlDeviceGetHandleByIndex", lambda i: f"h{i}"),
        nvmlDeviceGetUUID=rec("nvmlDeviceGetUUID", lambda h: f"GPU-{h}-uuid"),
        nvmlDeviceGetName=rec("nvmlDeviceGetName", b"NVIDIA Fake 4GB Laptop"),
        nvmlDeviceGetMemoryInfo=rec("nvmlDeviceGetMemoryInfo", raise_(15) if lost else SimpleNamespace(total=4 * GIB, used=GIB, free=3 * GIB)),
        nvmlDeviceGetTemperature=rec("nvmlDeviceGetTemperature", 66),
        nvmlDeviceGetPowerUsage=rec("nvmlDeviceGetPowerUsage", 35500 if power else raise_(3)),
        nvmlDeviceGetEnforcedPowerLimit=rec("nvmlDeviceGetEnforcedPowerLimit", 80000 if power else raise_(3)),
        nvmlDeviceGetCurrentClocksEventReasons=rec("nvmlDeviceGetCurrentClocksEventReasons", 0x40 | 0x4),
        nvmlDeviceGetComputeRunningProcesses=rec("nvmlDeviceGetComputeRunningProcesses", procs),
        nvmlDeviceGetCudaComputeCapability=rec("nvmlDeviceGetCudaComputeCapability", cc),
    )
    if temp_v:
        mod.nvmlDeviceGetTemperatureV = rec("nvmlDeviceGetTemperatureV", temp_v_impl)
    return mod


def assert_calls_fit_real_pynvml(calls):
    import pynvml

    assert calls
    for name, args in calls:
        inspect.signature(getattr(pynvml, name)).bind(*args)  # TypeError if our call does not fit


def test_nvml_backend_decodes_a_device():
    calls: list = []
    b = NvmlBackend(fake_pynvml(calls))
    b.open()
    assert b.device_count() == 2
    r = b.read(1)
    assert r == GpuReading(
        index=1, vram_used_bytes=GIB, vram_total_bytes=4 * GIB, temp_c=71.0, power_w=35.5, power_limit_w=80.0,
        throttle=("sw_power_cap", "hw_thermal"), processes=r.processes, uuid="GPU-h1-uuid", name="NVIDIA Fake 4GB Laptop",
    )
    assert [(p.pid, p.used_bytes) for p in r.processes] == [(42, 512), (43, None)]
    assert ("nvmlDeviceGetTemperatureV", ("h1", 0)) in calls
    assert not any(name == "nvmlDeviceGetTemperature" for name, _ in calls)  # deprecated one not used
    b.close()
    assert calls[-1] == ("nvmlShutdown", ())
    assert_calls_fit_real_pynvml(calls)


def test_nvml_backend_reads_the_compute_capability():
    """What [launch] mixed_precision = "auto" reads on CUDA (supervisor/precision.py)."""
    calls: list = []
    b = NvmlBackend(fake_pynvml(calls))
    b.open()
    assert (b.compute_capability(0), b.compute_capability(1)) == ((7, 5), (8, 6))
    assert ("nvmlDeviceGetCudaComputeCapability", ("h1",)) in calls
    assert_calls_fit_real_pynvml(calls)

    def unsupported(h):
        raise FakeNvmlError(3)

    for cc, expected in ((unsupported, None), (lambda h: (8, "6"), None), (lambda h: None, None), (lambda h: (9, 0), (9, 0))):
        other = NvmlBackend(fake_pynvml([], cc=cc))
        other.open()
        assert other.compute_capability(0) == expected


@pytest.mark.parametrize("variant", [{"temp_v": False}, {"temp_v_missing_in_driver": True}])
def test_nvml_backend_falls_back_to_the_old_temperature_call_only_when_v_is_missing(variant):
    calls: list = []
    b = NvmlBackend(fake_pynvml(calls, **variant))
    b.open()
    assert b.read(0).temp_c == 66.0
    assert ("nvmlDeviceGetTemperature", ("h0", 0)) in calls
    assert_calls_fit_real_pynvml(calls)


def test_nvml_backend_unsupported_fields_are_none_and_a_lost_gpu_is_unavailable():
    calls: list = []
    b = NvmlBackend(fake_pynvml(calls, power=False, mismatch=True))
    b.open()
    r = b.read(0)
    assert (r.power_w, r.power_limit_w, r.processes) == (None, None, ())
    lost = NvmlBackend(fake_pynvml([], lost=True))
    lost.open()
    with pytest.raises(GpuUnavailable, match=r"^nvmlDeviceGetMemoryInfo on GPU 0: the GPU is lost \(fell off the bus\)"):
        lost.read(0)


def test_nvml_backend_through_the_watcher_maps_cuda_visible_devices():
    calls: list = []
    clock = Clock()
    w = GpuWatcher(CFG, NvmlBackend(fake_pynvml(calls)), cuda_visible_devices="GPU-h1", threaded=False, clock=clock)
    w.poll(clock.t)
    assert w.devices == [1]
    s = w.status()
    assert [g["index"] for g in s["gpus"]] == [1] and s["gpus"][0]["cuda_index"] == 0
    assert not any(args == ("h0",) and name == "nvmlDeviceGetMemoryInfo" for name, args in calls)
    w.close()
    assert_calls_fit_real_pynvml(calls)


# --------------------------------------------------------------------------- CUDA_VISIBLE_DEVICES

UUIDS = ["GPU-aaaa1111-0000", "GPU-aaaa2222-0000", "GPU-bbbb3333-0000", "GPU-cccc4444-0000"]


@pytest.mark.parametrize(
    "value, indices, warning",
    [
        (None, [0, 1, 2, 3], None),
        ("", [], None),
        ("2", [2], None),
        ("3,1", [3, 1], None),
        (" 1 , 2 ", [1, 2], None),
        ("1,1,0", [1, 0], None),
        ("0,7,1", [0], "'7' is not a GPU index (0..3)"),
        ("-1,0", [], "'-1' is not a GPU index"),
        ("0,,1", [0], "has an empty entry"),
        ("GPU-bbbb3333-0000", [2], None),
        ("GPU-cccc", [3], None),  # unique prefix, like CUDA
        ("bbbb3333", [2], None),  # without the GPU- prefix
        ("gpu-BBBB3333", [2], None),
        ("GPU-aaaa,0", [], "'GPU-aaaa' matches 2 GPUs"),
        ("GPU-ffff,0", [], "'GPU-ffff' matches no GPU"),
        ("1,GPU-cccc4444-0000", [1, 3], None),
        ("MIG-1234,1", [1], "MIG instances are not monitored"),
        ("nope", [], "matches no GPU"),
    ],
)
def test_visible_nvml_indices(value, indices, warning):
    got, warnings = visible_nvml_indices(value, 4, lambda i: UUIDS[i])
    assert got == indices
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warning in warnings[0]


def test_only_the_jobs_gpus_are_watched():
    # GPU 0 (someone else's) is on fire; the job uses 2 and 3, which are cool.
    points = [{"t_s": 0, "gpu": 0, "temp_c": 99}, {"t_s": 0, "gpu": 2, "temp_c": 50}, {"t_s": 0, "gpu": 3, "temp_c": 55}]
    w, clock = fake_watcher(points, cvd="3,2", device_count=4)
    events = drive(w, clock, 3)
    assert [e[2] for e in events] == ["gpu_watch_started"]
    assert w.devices == [3, 2]
    assert [(g["index"], g["cuda_index"]) for g in w.status()["gpus"]] == [(3, 0), (2, 1)]
    assert w.backend.reads == 4 * 2


def test_no_visible_gpu_is_unmonitored_not_an_error(caplog):
    w, clock = fake_watcher([{"t_s": 0, "temp_c": 99}], cvd="")
    with caplog.at_level(logging.WARNING, logger="supervisor.watch.gpu"):
        events = drive(w, clock, 2)
    assert [e[2] for e in events] == ["gpu_unmonitored"]
    assert w.status()["reason"] == "no GPU visible to the job (CUDA_VISIBLE_DEVICES='', 1 on the machine)"
