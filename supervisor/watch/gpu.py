"""GPU watch: the `GpuWatcher` and `build_gpu_watcher`, over a backend.

    backend (supervisor.watch.nvml.NvmlBackend | supervisor.watch.fake_gpu.FakeGpuBackend)
        read() in the watcher's own thread, every poll_interval_s
    GpuWatcher.poll(now)                      <- the supervisor's loop, ~1/s, never blocks
        takes the newest snapshot, runs the pure policies of supervisor.watch.thermal,
        returns Decisions (PAUSE / RESUME / STOP / NOTE)

NVML missing or failing is not an error of the run: one warning is logged, the
watcher reports {"available": false, "reason": ...} and the run goes on unmonitored.
Nothing here imports torch; pynvml is imported only when the NVML backend opens.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from supervisor.watch import Action, Decision
from supervisor.watch.fake_gpu import FakeGpuBackend, load_fake_script
from supervisor.watch.nvml import GpuBackend, GpuUnavailable, NvmlBackend
from supervisor.watch.thermal import GpuConfig, GpuReading, ThermalPhase, WatchState, blocking_reason, evaluate

__all__ = ["visible_nvml_indices", "GpuWatcher", "build_gpu_watcher", "gpu_backend"]

log = logging.getLogger(__name__)


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


def gpu_backend(config: GpuConfig, base_dir: str | os.PathLike[str], *,
                clock: Callable[[], float] = time.monotonic) -> GpuBackend:
    """The backend `[gpu]` names: its fake script (backend "fake", or "auto" with fake_script set;
    a relative path starts at `base_dir`), else NVML. Raises JobConfigError for a bad script."""
    if config.backend == "fake" or (config.backend == "auto" and config.fake_script):
        assert config.fake_script is not None
        path = Path(config.fake_script)
        if not path.is_absolute():
            path = Path(base_dir) / path
        return FakeGpuBackend(load_fake_script(path), start_s=clock(), clock=clock)
    return NvmlBackend()


def build_gpu_watcher(
    config: GpuConfig,
    *,
    base_dir: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    threaded: bool = True,
) -> GpuWatcher | None:
    """The watcher for `[gpu]` of a job (None when disabled). `env` is the child's environment.

    Raises JobConfigError (exit 2) for a bad fake script; never for NVML trouble, which
    only shows once the watcher starts.
    """
    if not config.enabled:
        return None
    env = os.environ if env is None else env
    return GpuWatcher(
        config, gpu_backend(config, base_dir, clock=clock),
        cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
        cuda_device_order=env.get("CUDA_DEVICE_ORDER"),
        threaded=threaded, clock=clock,
    )

