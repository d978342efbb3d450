"""The supervisor's watchers, wired in one place: the job.toml sections `[gpu]`, `[power]`,
`[logind]` and the watcher each one builds, and the disk-space watcher (no section).

`supervisor.config` fills its SECTION_PARSERS from `SECTIONS` (each parser reads its table
through supervisor.config.Section), and `supervisor.runner.watchers` its WATCHER_FACTORIES
from `WATCHERS`. Every import of a watcher module happens inside a
function, so `trainsup --help` pays for none of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from supervisor.config import JobConfig
    from supervisor.watch import Watcher


def parse_gpu(body: Mapping[str, Any]) -> Any:
    from supervisor.watch.thermal import GpuConfig

    return GpuConfig.from_dict(body)


def parse_power(body: Mapping[str, Any]) -> Any:
    from supervisor.watch.power import PowerConfig

    return PowerConfig.from_dict(body)


def parse_logind(body: Mapping[str, Any]) -> Any:
    from supervisor.watch.logind import LogindConfig

    return LogindConfig.from_dict(body)


SECTIONS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "gpu": parse_gpu,
    "power": parse_power,
    "logind": parse_logind,
}


def gpu_watcher(job: "JobConfig") -> "Watcher | None":
    from supervisor.watch.gpu import build_gpu_watcher

    cfg = job.sections.get("gpu")
    if cfg is None:
        return None
    if job.launch.cpu and not cfg.fake_script:
        return None  # a CPU job uses no GPU: no NVML, and no "GPU unmonitored" warning on every run
    base = job_dir(job)
    # The child gets CUDA_DEVICE_ORDER=PCI_BUS_ID unless the job sets another (supervisor.runner.launch).
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", **os.environ, **job.train.env}
    return build_gpu_watcher(cfg, base_dir=base, env=env)


def power_watcher(job: "JobConfig") -> "Watcher | None":
    """[power] sysfs_root (default /sys/class/power_supply; a relative path is taken from the
    job file's directory, like [train] script) is where tests put a fake tree."""
    from supervisor.watch.power import PowerWatcher, SysfsPowerSource

    cfg = job.sections.get("power")
    if cfg is None or not cfg.enabled:
        return None
    return PowerWatcher(cfg, source=SysfsPowerSource(str(job_dir(job) / cfg.sysfs_root)))


def logind_watcher(job: "JobConfig") -> "Watcher | None":
    """The bus is $DBUS_SYSTEM_BUS_ADDRESS, else /run/dbus/system_bus_socket: the variable every
    D-Bus library honours, so a test (or a container) points it at a private dbus-daemon without a
    job.toml key. The runner sets the watcher's `wakeup` to its self-pipe; the watcher watches the
    checkpoints dir while logind waits for a commit (see supervisor.watch.logind)."""
    from supervisor.watch.logind import LogindWatcher
    from train_core.runfiles import RunPaths

    cfg = job.sections.get("logind")
    if cfg is None or not cfg.enabled:
        return None
    return LogindWatcher(cfg, checkpoint_dir=job.paths.checkpoints)


def disk_watcher(job: "JobConfig") -> "Watcher | None":
    from supervisor.watch.disk import DiskWatcher

    return DiskWatcher(job.run_dir)  # always on: a full disk needs no opt-in


WATCHERS: list[Callable[["JobConfig"], "Watcher | None"]] = [gpu_watcher, power_watcher, logind_watcher, disk_watcher]


def job_dir(job: "JobConfig") -> Path:
    """Where a relative path in a watcher section starts: the job file's folder, like [train] script."""
    return job.job_file.parent if job.job_file else Path.cwd()
