"""A scripted GPU with the real backend's interface (supervisor.watch.nvml.GpuBackend).

A fake script gives each GPU's readings over time, as a step function: tests, demos and the
benchmark run the whole GPU watch (thermal pause, VRAM warnings, NVML failing mid-run)
without a GPU. `[gpu] fake_script = "PATH"` (a .json or .toml file) selects it.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from supervisor.config import JobConfigError
from supervisor.watch.nvml import GpuUnavailable
from supervisor.watch.thermal import THROTTLE_NAMES, GpuProcess, GpuReading

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
    compute_capability: tuple[tuple[int, int] | None, ...] = ()  # per GPU; () = unknown for all

    @classmethod
    def from_obj(cls, obj: Any, source: str = "fake GPU script") -> "FakeScript":
        """A list of points, or {"points": [...], "device_count": N, "uuids": [...],
        "compute_capability": "8.6" (every GPU) or ["8.6", "7.5"] (one per GPU)}.

        A point: {t_s, gpu (default 0), temp_c, vram_used_bytes, vram_total_bytes,
        power_w, power_limit_w, throttle: [names], processes: [{pid, used_bytes}],
        fail: "reason"}. Keys left out keep the previous point's value for that GPU.
        Raises JobConfigError naming `source`, the point and the key.
        """
        table = _script_table(obj, source)
        by_gpu: dict[int, list[tuple[float, int, dict[str, Any]]]] = {}
        for n, p in enumerate(table["points"]):
            t_s, gpu = _check_point(p, f"{source}: point {n}")
            by_gpu.setdefault(gpu, []).append((t_s, n, p))
        count, uuids = _devices(table, max(by_gpu), source)
        points = {gpu: _step_function(gpu, uuids[gpu], items) for gpu, items in by_gpu.items()}
        return cls(points, count, uuids, _capabilities(table, count, source))

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


def _script_table(obj: Any, source: str) -> dict[str, Any]:
    """The script's top level as {"points": [...], ...}; a bare list is the points."""
    if isinstance(obj, list):
        obj = {"points": obj}
    if not isinstance(obj, dict):
        raise JobConfigError(f"{source}: must be a list of points or a table with `points` "
                          "(TOML: [[points]] t_s = 0 temp_c = 60)")
    unknown = set(obj) - {"points", "device_count", "uuids", "compute_capability"}
    if unknown:
        raise JobConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; "
                             "use points, device_count, uuids, compute_capability")
    points = obj.get("points")
    if not isinstance(points, list) or not points:
        raise JobConfigError(f"{source}: needs a non-empty list `points` of {{t_s, temp_c, vram_used_bytes, ...}}")
    return obj


def _check_point(p: Any, where: str) -> tuple[float, int]:
    """Type check one point (`where` is "SOURCE: point N"); -> (t_s, gpu)."""
    if not isinstance(p, dict):
        raise JobConfigError(f"{where} must be a table/object, got {p!r}")
    extra = set(p) - _POINT_KEYS
    if extra:
        raise JobConfigError(f"{where}: unknown key(s) {sorted(extra)}; known: {', '.join(sorted(_POINT_KEYS))}")
    t = p.get("t_s")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
        raise JobConfigError(f"{where}: t_s must be a number of seconds >= 0 since the start, got {t!r}")
    gpu = p.get("gpu", 0)
    if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
        raise JobConfigError(f"{where}: gpu must be an NVML index >= 0, got {gpu!r}")
    for k in _POINT_NUMBERS:
        if k in p and (isinstance(p[k], bool) or not isinstance(p[k], (int, float))):
            raise JobConfigError(f"{where}: {k} must be a number, got {p[k]!r}")
    for k in _POINT_INTS:
        if k in p and (isinstance(p[k], bool) or not isinstance(p[k], int) or p[k] < 0):
            raise JobConfigError(f"{where}: {k} must be an integer number of bytes >= 0, got {p[k]!r}")
    th = p.get("throttle", [])
    if not isinstance(th, list) or any(x not in THROTTLE_NAMES for x in th):
        raise JobConfigError(f"{where}: throttle must be a list of {', '.join(sorted(THROTTLE_NAMES))}, got {th!r}")
    pr = p.get("processes", [])
    if not isinstance(pr, list) or any(
        not isinstance(x, dict) or not isinstance(x.get("pid"), int) or set(x) - {"pid", "used_bytes"} for x in pr
    ):
        raise JobConfigError(f"{where}: processes must be a list of {{pid, used_bytes}}, got {pr!r}")
    if not isinstance(p.get("fail", ""), str):
        raise JobConfigError(f"{where}: fail must be a reason string, got {p['fail']!r}")
    return float(t), gpu


def _devices(table: Mapping[str, Any], top_gpu: int, source: str) -> tuple[int, tuple[str, ...]]:
    """(device_count, uuids): given, or enough GPUs for the points with made-up UUIDs."""
    count = table.get("device_count", top_gpu + 1)
    if isinstance(count, bool) or not isinstance(count, int) or count <= top_gpu:
        raise JobConfigError(f"{source}: device_count must be an integer above every point's gpu ({top_gpu}), "
                          f"got {count!r}")
    uuids = table.get("uuids", [f"GPU-00000000-0000-4000-8000-{i:012d}" for i in range(count)])
    if not isinstance(uuids, list) or len(uuids) != count or not all(isinstance(u, str) for u in uuids):
        raise JobConfigError(f"{source}: uuids must be a list of {count} strings, got {uuids!r}")
    return count, tuple(uuids)


def _capabilities(table: Mapping[str, Any], count: int, source: str) -> tuple[tuple[int, int] | None, ...]:
    """`compute_capability`: "M.m" for every GPU, or a list of one per GPU; () when absent."""
    raw = table.get("compute_capability")
    if raw is None:
        return ()
    items = [raw] * count if isinstance(raw, str) else raw
    fix = f'"8.6" (every GPU) or a list of {count} such strings'
    if not isinstance(items, list) or len(items) != count:
        raise JobConfigError(f"{source}: compute_capability must be {fix}, got {raw!r}")
    out = []
    for item in items:
        major, dot, minor = item.partition(".") if isinstance(item, str) else ("", "", "")
        if not (dot and major.isdigit() and minor.isdigit()):
            raise JobConfigError(f"{source}: compute_capability must be {fix}, got {item!r}")
        out.append((int(major), int(minor)))
    return tuple(out)


def _step_function(gpu: int, uuid: str, items: list[tuple[float, int, dict[str, Any]]]) -> tuple[_Point, ...]:
    """One GPU's points as full readings: each key left out keeps the previous point's value."""
    items = sorted(items, key=lambda x: (x[0], x[1]))  # by time, then file order
    cur: dict[str, Any] = {"throttle": (), "processes": ()}
    fail: str | None = None
    out = []
    for t_s, _, p in items:
        cur.update({k: p[k] for k in (*_POINT_NUMBERS, *_POINT_INTS) if k in p})
        if "throttle" in p:
            cur["throttle"] = tuple(p["throttle"])
        if "processes" in p:
            cur["processes"] = tuple(GpuProcess(x["pid"], x.get("used_bytes")) for x in p["processes"])
        fail = p.get("fail", fail)
        out.append(_Point(t_s, GpuReading(index=gpu, uuid=uuid, name="Fake GPU", **cur), fail))
    return tuple(out)


def load_fake_script(path: str | os.PathLike[str]) -> FakeScript:
    """Read a fake script from a .json or .toml file; JobConfigError names the file and the problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise JobConfigError(f"[gpu] fake_script {str(p)!r} cannot be read ({e.strerror}); fix the path") from e
    try:
        obj = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise JobConfigError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from e
    return FakeScript.from_obj(obj, source=str(p))


class FakeGpuBackend:
    """A scripted GPU: `read` returns the script's values at clock() - start_s."""

    name = "fake"

    def __init__(self, script: FakeScript, start_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.script = script
        self.start_s = start_s
        self.clock = clock
        self.reads = 0  # how many reads the watcher made (tests count them)

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

    def compute_capability(self, index: int) -> tuple[int, int] | None:
        caps = self.script.compute_capability
        return caps[index] if caps else None
