"""GPU watch: the I/O edge to NVML (or a scripted fake) and the `GpuWatcher`.

    backend (NvmlBackend | FakeGpuBackend)   <- the only code that touches NVML
        read() in the watcher's own thread, every poll_interval_s
    GpuWatcher.poll(now)                      <- the supervisor's loop, ~1/s, never blocks
        takes the newest snapshot, runs the pure policies of supervisor.watch.thermal,
        returns Decisions (PAUSE / RESUME / STOP / NOTE)

NVML missing or failing is not an error of the run: one warning is logged, the
watcher reports {"available": false, "reason": ...} and the run goes on unmonitored.
Nothing here imports torch; pynvml is imported only when the NVML backend opens.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

from supervisor.watch.thermal import (
    THROTTLE_NAMES,
    ConfigError,
    GpuConfig,
    GpuProcess,
    GpuReading,
    ThermalPhase,
    WatchState,
    blocking_reason,
    decode_throttle,
    evaluate,
)
from supervisor.watch import Action, Decision

__all__ = [
    "GpuBackend", "GpuUnavailable", "GpuReading", "GpuProcess", "NvmlBackend", "FakeGpuBackend",
    "FakeScript", "load_fake_script", "visible_nvml_indices", "GpuWatcher", "build_gpu_watcher",
]

log = logging.getLogger(__name__)


class GpuUnavailable(Exception):
    """The backend cannot open or read a GPU; str(e) is the one-line reason."""


class GpuBackend(Protocol):
    name: str

    def open(self) -> None:
        """Start talking to the devices; raise GpuUnavailable with the reason."""

    def device_count(self) -> int: ...

    def device_uuid(self, index: int) -> str: ...

    def read(self, index: int) -> GpuReading:
        """One reading of NVML device `index`; raise GpuUnavailable on a failure."""

    def close(self) -> None: ...


# --------------------------------------------------------------------------- NVML

# NVML return codes (nvml.h); pynvml's NVMLError carries them in `.value`.
_NVML_NOT_SUPPORTED = 3
_NVML_NO_PERMISSION = 4
_NVML_DRIVER_NOT_LOADED = 9
_NVML_LIBRARY_NOT_FOUND = 12
_NVML_FUNCTION_NOT_FOUND = 13
_NVML_GPU_IS_LOST = 15
_NVML_ARGUMENT_VERSION_MISMATCH = 25
_NVML_TEMPERATURE_GPU = 0  # NVML_TEMPERATURE_GPU: the die sensor

_INIT_REASONS = {
    _NVML_LIBRARY_NOT_FOUND: "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this machine",
    _NVML_DRIVER_NOT_LOADED: "the NVIDIA driver is not loaded (nvmlInit: Driver Not Loaded)",
    _NVML_NO_PERMISSION: "no permission to talk to the NVIDIA driver (nvmlInit: Insufficient Permissions)",
}


class NvmlBackend:
    """Real devices through nvidia-ml-py (module `pynvml`).

    Every call below was checked against nvidia-ml-py 13.615's signatures:
    nvmlDeviceGetHandleByIndex(index), nvmlDeviceGetUUID(handle) -> str,
    nvmlDeviceGetName(handle) -> str, nvmlDeviceGetMemoryInfo(handle) -> .total/.used
    (bytes), nvmlDeviceGetTemperatureV(handle, sensor) -> int C,
    nvmlDeviceGetPowerUsage(handle) -> mW, nvmlDeviceGetEnforcedPowerLimit(handle) -> mW,
    nvmlDeviceGetCurrentClocksEventReasons(handle) -> bit mask,
    nvmlDeviceGetComputeRunningProcesses(handle) -> [.pid, .usedGpuMemory (bytes|None)].
    `nvml` is the module (injectable so the decoding is testable without a GPU).
    """

    name = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = nvml
        self._handles: dict[int, Any] = {}
        self._open = False

    def open(self) -> None:
        if self._nvml is None:
            try:
                import pynvml  # nvidia-ml-py; the PyPI "pynvml" package is a deprecated shim
            except ImportError as e:
                raise GpuUnavailable(
                    "the nvidia-ml-py package (module pynvml) is not installed: pip install nvidia-ml-py"
                ) from e
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as e:
            code = getattr(e, "value", None)
            reason = _INIT_REASONS.get(code, f"nvmlInit failed: {e} (NVML error {code})")
            raise GpuUnavailable(reason) from e
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._handles.clear()
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as e:  # nothing to do about it at shutdown
                log.debug("nvmlShutdown failed: %s", e)

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount", None, self._nvml.nvmlDeviceGetCount))

    def device_uuid(self, index: int) -> str:
        return _text(self._call("nvmlDeviceGetUUID", index, self._nvml.nvmlDeviceGetUUID, self._handle(index)))

    def read(self, index: int) -> GpuReading:
        nv, h = self._nvml, self._handle(index)
        mem = self._optional("nvmlDeviceGetMemoryInfo", index, nv.nvmlDeviceGetMemoryInfo, h)
        power_mw = self._optional("nvmlDeviceGetPowerUsage", index, nv.nvmlDeviceGetPowerUsage, h)
        limit_mw = self._optional("nvmlDeviceGetEnforcedPowerLimit", index, nv.nvmlDeviceGetEnforcedPowerLimit, h)
        mask = self._throttle_mask(index, h)
        procs = self._processes(index, h)
        return GpuReading(
            index=index,
            vram_used_bytes=int(mem.used) if mem is not None else None,
            vram_total_bytes=int(mem.total) if mem is not None else None,
            temp_c=self._temperature(index, h),
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
            throttle=decode_throttle(int(mask)) if mask is not None else (),
            processes=procs,
            uuid=self.device_uuid(index),
            name=_text(self._optional("nvmlDeviceGetName", index, nv.nvmlDeviceGetName, h)),
        )

    # -- helpers: one place decides what an NVML error means

    def _handle(self, index: int) -> Any:
        if index not in self._handles:
            self._handles[index] = self._call(
                "nvmlDeviceGetHandleByIndex", index, self._nvml.nvmlDeviceGetHandleByIndex, index
            )
        return self._handles[index]

    def _call(self, what: str, index: int | None, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._nvml.NVMLError as e:
            raise GpuUnavailable(self._describe(what, index, e)) from e

    def _optional(self, what: str, index: int, fn: Callable[..., Any], *args: Any) -> Any:
        """A field some devices do not report (laptops: power): Not Supported -> None."""
        try:
            return fn(*args)
        except self._nvml.NVMLError as e:
            if getattr(e, "value", None) == _NVML_NOT_SUPPORTED:
                return None
            raise GpuUnavailable(self._describe(what, index, e)) from e

    def _describe(self, what: str, index: int | None, e: Exception) -> str:
        where = f" on GPU {index}" if index is not None else ""
        if getattr(e, "value", None) == _NVML_GPU_IS_LOST:
            return f"{what}{where}: the GPU is lost (fell off the bus); check `nvidia-smi` and the kernel log"
        return f"{what}{where} failed: {e}"

    def _temperature(self, index: int, h: Any) -> float | None:
        nv = self._nvml
        fn_v = getattr(nv, "nvmlDeviceGetTemperatureV", None)
        if fn_v is not None:
            try:
                t = fn_v(h, _NVML_TEMPERATURE_GPU)
                return float(getattr(t, "temperature", t))
            except nv.NVMLError as e:
                if getattr(e, "value", None) == _NVML_NOT_SUPPORTED:
                    return None
                # A driver older than the bindings lacks the V entry point: fall back.
                if getattr(e, "value", None) not in (_NVML_FUNCTION_NOT_FOUND, _NVML_ARGUMENT_VERSION_MISMATCH):
                    raise GpuUnavailable(self._describe("nvmlDeviceGetTemperatureV", index, e)) from e
        t = self._optional("nvmlDeviceGetTemperature", index, nv.nvmlDeviceGetTemperature, h, _NVML_TEMPERATURE_GPU)
        return float(t) if t is not None else None

    def _throttle_mask(self, index: int, h: Any) -> int | None:
        nv = self._nvml
        # "ClocksThrottleReasons" was renamed "ClocksEventReasons" (same bits) in NVML 12.2.
        for what in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            fn = getattr(nv, what, None)
            if fn is None:
                continue
            try:
                return int(fn(h))
            except nv.NVMLError as e:
                if getattr(e, "value", None) == _NVML_FUNCTION_NOT_FOUND:
                    continue
                if getattr(e, "value", None) == _NVML_NOT_SUPPORTED:
                    return None
                raise GpuUnavailable(self._describe(what, index, e)) from e
        return None

    def _processes(self, index: int, h: Any) -> tuple[GpuProcess, ...]:
        nv = self._nvml
        mismatch = getattr(nv, "NVMLLibraryMismatchError", ())
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(h)
        except mismatch:  # type: ignore[misc]  # driver lacks the _v3 call: processes unknown
            return ()
        except nv.NVMLError as e:
            if getattr(e, "value", None) in (_NVML_NOT_SUPPORTED, _NVML_NO_PERMISSION):
                return ()
            raise GpuUnavailable(self._describe("nvmlDeviceGetComputeRunningProcesses", index, e)) from e
        return tuple(
            GpuProcess(pid=int(p.pid), used_bytes=None if p.usedGpuMemory is None else int(p.usedGpuMemory))
            for p in procs
        )


def _text(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


# --------------------------------------------------------------------------- fake

_POINT_NUMBERS = ("temp_c", "power_w", "power_limit_w")
_POINT_INTS = ("vram_used_bytes", "vram_total_bytes")
_POINT_KEYS = {"t_s", "gpu", *(_POINT_NUMBERS), *(_POINT_INTS), "throttle", "processes", "fail"}


@dataclass(frozen=True)
class _Point:
    t_s: float
    reading: GpuReading
    fail: str | None  # from this time on the backend fails with this reason


@dataclass(frozen=True)
class FakeScript:
    """Readings over time per GPU. Values hold until the next point (a step function)."""

    points: Mapping[int, tuple[_Point, ...]]  # gpu index -> points sorted by t_s
    device_count: int
    uuids: tuple[str, ...]

    @classmethod
    def from_obj(cls, obj: Any, source: str = "fake GPU script") -> "FakeScript":
        """A list of points, or {"points": [...], "device_count": N, "uuids": [...]}.

        A point: {t_s, gpu (default 0), temp_c, vram_used_bytes, vram_total_bytes,
        power_w, power_limit_w, throttle: [names], processes: [{pid, used_bytes}],
        fail: "reason"}. Keys left out keep the previous point's value for that GPU.
        """
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"{source}: {msg}")

        if isinstance(obj, list):
            obj = {"points": obj}
        if not isinstance(obj, dict):
            raise bad('must be a list of points or a table with `points` (TOML: [[points]] t_s = 0 temp_c = 60)')
        unknown = set(obj) - {"points", "device_count", "uuids"}
        if unknown:
            raise bad(f"unknown top-level key(s) {sorted(unknown)}; use points, device_count, uuids")
        raw_points = obj.get("points")
        if not isinstance(raw_points, list) or not raw_points:
            raise bad("needs a non-empty list `points` of {t_s, temp_c, vram_used_bytes, ...}")
        by_gpu: dict[int, list[tuple[float, int, dict[str, Any]]]] = {}
        for n, p in enumerate(raw_points):
            where = f"point {n}"
            if not isinstance(p, dict):
                raise bad(f"{where} must be a table/object, got {p!r}")
            extra = set(p) - _POINT_KEYS
            if extra:
                raise bad(f"{where}: unknown key(s) {sorted(extra)}; known: {', '.join(sorted(_POINT_KEYS))}")
            t = p.get("t_s")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
                raise bad(f"{where}: t_s must be a number of seconds >= 0 since the start, got {t!r}")
            gpu = p.get("gpu", 0)
            if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
                raise bad(f"{where}: gpu must be an NVML index >= 0, got {gpu!r}")
            for k in _POINT_NUMBERS:
                if k in p and (isinstance(p[k], bool) or not isinstance(p[k], (int, float))):
                    raise bad(f"{where}: {k} must be a number, got {p[k]!r}")
            for k in _POINT_INTS:
                if k in p and (isinstance(p[k], bool) or not isinstance(p[k], int) or p[k] < 0):
                    raise bad(f"{where}: {k} must be an integer number of bytes >= 0, got {p[k]!r}")
            if "throttle" in p:
                th = p["throttle"]
                if not isinstance(th, list) or any(x not in THROTTLE_NAMES for x in th):
                    raise bad(f"{where}: throttle must be a list of {', '.join(sorted(THROTTLE_NAMES))}, got {th!r}")
            if "processes" in p:
                pr = p["processes"]
                if not isinstance(pr, list) or any(
                    not isinstance(x, dict) or not isinstance(x.get("pid"), int) or set(x) - {"pid", "used_bytes"}
                    for x in pr
                ):
                    raise bad(f"{where}: processes must be a list of {{pid, used_bytes}}, got {pr!r}")
            if "fail" in p and not isinstance(p["fail"], str):
                raise bad(f"{where}: fail must be a reason string, got {p['fail']!r}")
            by_gpu.setdefault(gpu, []).append((float(t), n, p))

        count = obj.get("device_count", max(by_gpu) + 1)
        if isinstance(count, bool) or not isinstance(count, int) or count <= max(by_gpu):
            raise bad(f"device_count must be an integer above every point's gpu ({max(by_gpu)}), got {count!r}")
        uuids = obj.get("uuids", [f"GPU-00000000-0000-4000-8000-{i:012d}" for i in range(count)])
        if not isinstance(uuids, list) or len(uuids) != count or not all(isinstance(u, str) for u in uuids):
            raise bad(f"uuids must be a list of {count} strings, got {uuids!r}")

        points: dict[int, tuple[_Point, ...]] = {}
        for gpu, items in by_gpu.items():
            items.sort(key=lambda x: (x[0], x[1]))  # by time, then file order
            cur: dict[str, Any] = {"throttle": (), "processes": ()}
            fail: str | None = None
            out = []
            for t, _, p in items:
                for k in (*_POINT_NUMBERS, *_POINT_INTS):
                    if k in p:
                        cur[k] = p[k]
                if "throttle" in p:
                    cur["throttle"] = tuple(p["throttle"])
                if "processes" in p:
                    cur["processes"] = tuple(GpuProcess(x["pid"], x.get("used_bytes")) for x in p["processes"])
                fail = p.get("fail", fail)
                out.append(_Point(t, GpuReading(index=gpu, uuid=uuids[gpu], name="Fake GPU", **cur), fail))
            points[gpu] = tuple(out)
        return cls(points, count, tuple(uuids))

    def at(self, index: int, t_s: float) -> GpuReading:
        """The reading of GPU `index` at `t_s` seconds after the start (pure)."""
        pts = self.points.get(index)
        if not pts:
            return GpuReading(index=index, uuid=self.uuids[index], name="Fake GPU")
        chosen = pts[0]
        for p in pts:
            if p.t_s <= t_s:
                chosen = p
            else:
                break
        if chosen.fail is not None and chosen.t_s <= t_s:
            raise GpuUnavailable(chosen.fail)
        return chosen.reading


def load_fake_script(path: str | os.PathLike[str]) -> FakeScript:
    """Read a fake script from a .json or .toml file; ConfigError names the file and the problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"[gpu] fake_script {str(p)!r} cannot be read ({e.strerror}); fix the path") from e
    try:
        obj = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from e
    return FakeScript.from_obj(obj, source=str(p))


class FakeGpuBackend:
    """A scripted GPU: `read` returns the script's values at clock() - start_s."""

    name = "fake"

    def __init__(self, script: FakeScript, start_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.script = script
        self.start_s = start_s
        self.clock = clock
        self.reads = 0  # for tests and the benchmark

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def device_count(self) -> int:
        return self.script.device_count

    def device_uuid(self, index: int) -> str:
        return self.script.uuids[index]

    def read(self, index: int) -> GpuReading:
        self.reads += 1
        return self.script.at(index, self.clock() - self.start_s)


# --------------------------------------------------------------------------- CUDA_VISIBLE_DEVICES


def visible_nvml_indices(
    cuda_visible_devices: str | None, device_count: int, uuid_of: Callable[[int], str]
) -> tuple[list[int], list[str]]:
    """NVML indices of the GPUs the job sees, in CUDA ordinal order, plus warnings.

    Follows CUDA's parsing: unset -> every GPU; "" -> none; entries are indices or
    (prefixes of) UUIDs, with or without "GPU-"; the list ends at the first invalid
    entry. Indices assume CUDA_DEVICE_ORDER=PCI_BUS_ID, which is NVML's order.
    MIG instances are not mapped (warning).
    """
    if cuda_visible_devices is None:
        return list(range(device_count)), []
    out: list[int] = []
    warnings: list[str] = []
    uuids: list[str] | None = None
    for raw in cuda_visible_devices.split(","):
        tok = raw.strip()
        if not tok:
            if cuda_visible_devices.strip():
                warnings.append(f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} has an empty entry; CUDA stops there")
            break
        if tok.startswith("MIG-"):
            warnings.append(f"CUDA_VISIBLE_DEVICES entry {tok!r} is a MIG instance; MIG instances are not monitored")
            continue
        if tok.lstrip("-").isdigit():
            i = int(tok)
            if not 0 <= i < device_count:
                warnings.append(
                    f"CUDA_VISIBLE_DEVICES entry {tok!r} is not a GPU index (0..{device_count - 1}); CUDA ignores it and the rest"
                )
                break
        else:
            if uuids is None:
                uuids = [uuid_of(i).lower() for i in range(device_count)]
            want = tok.lower() if tok.lower().startswith("gpu-") else "gpu-" + tok.lower()
            hits = [i for i, u in enumerate(uuids) if u.startswith(want)]
            if len(hits) != 1:
                what = "matches no GPU" if not hits else f"matches {len(hits)} GPUs"
                warnings.append(f"CUDA_VISIBLE_DEVICES entry {tok!r} {what}; CUDA ignores it and the rest")
                break
            i = hits[0]
        if i not in out:
            out.append(i)
    return out, warnings


# --------------------------------------------------------------------------- watcher


@dataclass(frozen=True)
class _Snapshot:
    seq: int
    taken_at: float  # watcher clock when the read started
    read_s: float  # how long reading every GPU took
    readings: tuple[GpuReading, ...]


class GpuWatcher:
    """Implements supervisor.watch.Watcher for the GPUs the job uses.

    threaded=True (the supervisor): a daemon thread opens the backend and reads all
    GPUs every poll_interval_s; poll() only takes the newest snapshot, so a slow or
    hung NVML call never blocks the loop. threaded=False (tests): poll() reads
    inline when poll_interval_s has passed on `clock`.
    """

    name = "gpu"

    def __init__(
        self,
        config: GpuConfig,
        backend: GpuBackend,
        *,
        cuda_visible_devices: str | None = None,
        cuda_device_order: str | None = None,
        threaded: bool = True,
        clock: Callable[[], float] = time.monotonic,
        stale_after_s: float | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self._cuda_visible = cuda_visible_devices
        self._cuda_order = cuda_device_order
        self._threaded = threaded
        self._clock = clock
        # NVML can hang in a wedged driver; readings this old are reported as stale.
        self._stale_after_s = stale_after_s if stale_after_s is not None else max(30.0, 10 * config.poll_interval_s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._opened = False
        self._devices: list[int] = []
        self._snapshot: _Snapshot | None = None
        self._unavailable: str | None = None
        # Owned by the loop's thread only:
        self._state = WatchState()
        self._consumed = 0
        self._announced = False
        self._unavailable_noted = False
        self._stale_noted = False
        self._job_pids: frozenset[int] | None = None

    # -- Watcher protocol

    def start(self) -> None:
        """Begin watching (idempotent; poll() calls it too). Never raises for NVML trouble."""
        if self._started:
            return
        self._started = True
        if self._threaded:
            self._thread = threading.Thread(target=self._run, name="trainsup-gpu-watch", daemon=True)
            self._thread.start()
        else:
            self._open()

    def poll(self, now: float) -> list[Decision]:
        self.start()
        if not self._threaded and self._opened and self._unavailable is None:
            snap = self._snapshot
            if snap is None or self._clock() - snap.taken_at >= self.config.poll_interval_s:
                self._sample_once()
        with self._lock:
            snap, unavailable = self._snapshot, self._unavailable
        decisions: list[Decision] = []

        if unavailable is not None:
            if not self._unavailable_noted:
                self._unavailable_noted = True
                decisions += self._go_unmonitored(unavailable)
            return decisions
        if snap is None:
            return decisions
        if not self._announced:
            self._announced = True
            decisions.append(Decision(
                Action.NOTE, "gpu_watch_started",
                f"watching {len(snap.readings)} GPU(s) through {self.backend.name} every {self.config.poll_interval_s:g} s",
                {"backend": self.backend.name, "gpus": [{"index": r.index, "uuid": r.uuid, "name": r.name} for r in snap.readings]},
            ))
        age_s = self._clock() - snap.taken_at
        if age_s > self._stale_after_s:
            if not self._stale_noted:
                self._stale_noted = True
                decisions.append(Decision(
                    Action.NOTE, "gpu_readings_stale",
                    f"no GPU reading for {age_s:.0f} s ({self.backend.name} is not answering); thermal policy holds its state",
                    {"age_s": round(age_s, 1)},
                ))
        else:
            self._stale_noted = False
        if snap.seq != self._consumed:
            self._consumed = snap.seq
            self._state, more = evaluate(self.config, self._state, snap.readings, now)
            decisions += more
        return decisions

    def blocking_reason(self, now: float) -> str | None:
        return blocking_reason(self.config, self._state)

    def on_checkpoint(self, step: int, now: float) -> None:
        pass  # the GPU policy does not depend on checkpoints

    def status(self) -> dict[str, Any]:
        with self._lock:
            snap, unavailable = self._snapshot, self._unavailable
        if unavailable is not None:
            return {"available": False, "reason": unavailable, "backend": self.backend.name}
        if snap is None:
            return {"available": False, "reason": "starting: no reading yet", "backend": self.backend.name}
        return {
            "available": True,
            "backend": self.backend.name,
            "poll_interval_s": self.config.poll_interval_s,
            "reading_age_s": round(self._clock() - snap.taken_at, 3),
            "read_ms": round(snap.read_s * 1000, 3),
            "thermal": self._state.phase.value,
            "blocking": blocking_reason(self.config, self._state),
            "gpus": [self._gpu_status(cuda_index, r) for cuda_index, r in enumerate(snap.readings)],
        }

    def close(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=2.0)  # a thread stuck inside NVML is a daemon: let it be
        if not self._threaded and self._opened:
            self._opened = False
            self.backend.close()

    # -- extras for the supervisor

    def set_job_pids(self, pids: Iterable[int] | None) -> None:
        """The ranks' PIDs: status() then lists only their GPU processes (None: all)."""
        self._job_pids = None if pids is None else frozenset(pids)

    def on_attempt(self, pids: Iterable[int]) -> None:
        """The runner's hook: the current attempt's rank PIDs (each time they change)."""
        self.set_job_pids(pids)

    @property
    def devices(self) -> list[int]:
        """NVML indices being watched, in CUDA ordinal order (empty until opened)."""
        return list(self._devices)

    # -- internals

    def _gpu_status(self, cuda_index: int, r: GpuReading) -> dict[str, Any]:
        procs = [p for p in r.processes if self._job_pids is None or p.pid in self._job_pids]
        frac = r.vram_fraction
        return {
            "index": r.index,
            "cuda_index": cuda_index,
            "uuid": r.uuid,
            "name": r.name,
            "vram_used_bytes": r.vram_used_bytes,
            "vram_total_bytes": r.vram_total_bytes,
            "vram_fraction": round(frac, 4) if frac is not None else None,
            "temp_c": r.temp_c,
            "power_w": round(r.power_w, 1) if r.power_w is not None else None,
            "power_limit_w": round(r.power_limit_w, 1) if r.power_limit_w is not None else None,
            "throttle": list(r.throttle),
            "processes": [{"pid": p.pid, "used_bytes": p.used_bytes} for p in procs],
        }

    def _go_unmonitored(self, reason: str) -> list[Decision]:
        out = [Decision(
            Action.NOTE, "gpu_unmonitored",
            f"GPU monitoring is off: {reason}; the run continues without thermal pause or VRAM warnings",
            {"reason": reason, "backend": self.backend.name},
        )]
        if self._state.phase is ThermalPhase.PAUSED:
            # Holding ranks forever on a sensor that is gone is worse than running:
            # the GPU's own thermal slowdown still protects the hardware.
            out.append(Decision(
                Action.RESUME, "thermal_resume",
                "GPU monitoring failed while paused for heat: resuming unmonitored (the GPU's own thermal slowdown still applies)",
                {"reason": reason},
            ))
        self._state = WatchState()  # no reading can ever lift a block again
        return out

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._unavailable is not None:
                return
            self._unavailable = reason
        log.warning(
            "GPU monitoring is off: %s. The run continues unmonitored (no thermal pause, no VRAM warning); "
            "set [gpu] enabled = false to silence this.", reason,
        )

    def _open(self) -> bool:
        try:
            self.backend.open()
            self._opened = True
            count = self.backend.device_count()
            devices, warnings = visible_nvml_indices(self._cuda_visible, count, self.backend.device_uuid)
        except GpuUnavailable as e:
            self._fail(str(e))
            return False
        except Exception as e:  # a bug or an unexpected binding error must not kill the run
            log.exception("GPU backend %s failed to open", self.backend.name)
            self._fail(f"{self.backend.name} failed to open: {e!r}")
            return False
        for w in warnings:
            log.warning("%s", w)
        if (
            len(devices) > 0 and count > 1 and self._cuda_visible is not None
            and any(t.strip().lstrip("-").isdigit() for t in self._cuda_visible.split(","))
            and self._cuda_order != "PCI_BUS_ID"
        ):
            log.info("CUDA_VISIBLE_DEVICES indices are mapped in PCI bus order; set CUDA_DEVICE_ORDER=PCI_BUS_ID "
                     "for the job so CUDA numbers GPUs the same way")
        if not devices:
            self._fail(f"no GPU visible to the job (CUDA_VISIBLE_DEVICES={self._cuda_visible!r}, {count} on the machine)")
            return False
        self._devices = devices
        return True

    def _sample_once(self) -> bool:
        t0 = self._clock()
        try:
            readings = tuple(self.backend.read(i) for i in self._devices)
        except GpuUnavailable as e:
            self._fail(str(e))
            return False
        except Exception as e:
            log.exception("GPU backend %s failed to read", self.backend.name)
            self._fail(f"{self.backend.name} read failed: {e!r}")
            return False
        t1 = self._clock()
        with self._lock:
            seq = self._snapshot.seq + 1 if self._snapshot else 1
            self._snapshot = _Snapshot(seq, t0, t1 - t0, readings)
        return True

    def _run(self) -> None:
        try:
            if not self._open():
                return
            while not self._stop.is_set():
                t0 = self._clock()
                if not self._sample_once():
                    return
                self._stop.wait(max(0.0, self.config.poll_interval_s - (self._clock() - t0)))
        finally:
            if self._opened:
                self._opened = False
                try:
                    self.backend.close()
                except Exception:
                    log.debug("closing GPU backend failed", exc_info=True)


def build_gpu_watcher(
    config: GpuConfig,
    *,
    base_dir: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    threaded: bool = True,
) -> GpuWatcher | None:
    """The watcher for `[gpu]` of a job (None when disabled). `env` is the child's environment.

    Raises ConfigError for a bad fake script (so `trainsup validate` catches it);
    never for NVML trouble, which only shows once the watcher starts.
    """
    if not config.enabled:
        return None
    env = os.environ if env is None else env
    backend: GpuBackend
    if config.backend == "fake" or (config.backend == "auto" and config.fake_script):
        assert config.fake_script is not None
        path = Path(config.fake_script)
        if not path.is_absolute():
            path = Path(base_dir) / path
        backend = FakeGpuBackend(load_fake_script(path), start_s=clock(), clock=clock)
    else:
        backend = NvmlBackend()
    return GpuWatcher(
        config, backend,
        cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
        cuda_device_order=env.get("CUDA_DEVICE_ORDER"),
        threaded=threaded, clock=clock,
    )

