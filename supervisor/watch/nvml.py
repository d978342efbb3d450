"""The NVML edge of the GPU watch: the backend interface and the real backend.

`GpuBackend` is what `supervisor.watch.gpu.GpuWatcher` reads from: `NvmlBackend` here (the
only code of trainsup that touches NVML) or the scripted `supervisor.watch.fake_gpu.FakeGpuBackend`.
A backend that cannot open or read raises `GpuUnavailable` with a one-line reason; the
watcher then runs unmonitored. pynvml is imported only when `NvmlBackend.open()` runs.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

from supervisor.watch.thermal import GpuProcess, GpuReading, decode_throttle

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

    def compute_capability(self, index: int) -> tuple[int, int] | None:
        """CUDA compute capability (major, minor) of device `index` (None: unknown); raise
        GpuUnavailable on a failure. Read by supervisor/precision.py ("auto")."""

    def close(self) -> None: ...


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
    nvmlDeviceGetComputeRunningProcesses(handle) -> [.pid, .usedGpuMemory (bytes|None)],
    nvmlDeviceGetCudaComputeCapability(handle) -> (major, minor).
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

    def compute_capability(self, index: int) -> tuple[int, int] | None:
        cc = self._optional("nvmlDeviceGetCudaComputeCapability", index,
                            self._nvml.nvmlDeviceGetCudaComputeCapability, self._handle(index))
        return _capability(cc)

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


def _capability(cc: Any) -> tuple[int, int] | None:
    """(major, minor) as two small non-negative ints, or None for anything else."""
    try:
        major, minor = cc
    except (TypeError, ValueError):
        return None
    ok = all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 100 for x in (major, minor))
    return (major, minor) if ok else None


def _text(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
