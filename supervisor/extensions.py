"""The supervisor's optional watchers, wired in one place: the job.toml sections
`[gpu]`, `[power]`, `[logind]` and the watcher each one builds.

`supervisor.config` fills its SECTION_PARSERS from `SECTIONS`, and `supervisor.runner`
its WATCHER_FACTORIES from `WATCHERS`. Every import of a watcher module happens inside a
function, so `trainsup --help` pays for none of them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from supervisor.config import JobConfig
    from supervisor.watch import Watcher


def parse_gpu(body: Mapping[str, Any]) -> Any:
    from supervisor.thermal import GpuConfig

    return GpuConfig.from_dict(body)


def parse_power(body: Mapping[str, Any]) -> Any:
    from supervisor.power import PowerConfig

    return PowerConfig.from_dict(body)


def parse_logind(body: Mapping[str, Any]) -> Any:
    from supervisor.logind import LogindConfig

    return LogindConfig.from_dict(body)


SECTIONS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "gpu": parse_gpu,
    "power": parse_power,
    "logind": parse_logind,
}


def gpu_watcher(job: "JobConfig") -> "Watcher | None":
    from supervisor.gpu import build_gpu_watcher

    cfg = job.sections.get("gpu")
    if cfg is None:
        return None
    base = job.job_file.parent if job.job_file else job.run_dir
    return build_gpu_watcher(cfg, base_dir=base, env={**os.environ, **job.train.env})


def power_watcher(job: "JobConfig") -> "Watcher | None":
    from supervisor.power import PowerWatcher

    cfg = job.sections.get("power")
    return PowerWatcher(cfg) if cfg is not None and cfg.enabled else None


def logind_watcher(job: "JobConfig") -> "Watcher | None":
    from supervisor.logind import LogindWatcher

    cfg = job.sections.get("logind")
    return LogindWatcher(cfg) if cfg is not None and cfg.enabled else None


WATCHERS: list[Callable[["JobConfig"], "Watcher | None"]] = [gpu_watcher, power_watcher, logind_watcher]

