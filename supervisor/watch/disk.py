"""Free space where the run writes: a full disk must not cost a checkpoint or spin restarts.

A save that does not fit fails, train_core removes what it wrote, and the newest checkpoint
stays valid. Restarting into the same full disk would only fail again, so this watcher holds
new attempts (the supervisor WAITs, with the fix in the reason) while the file system of the
run dir has less free space than the next checkpoint needs, and notes once per episode when
space runs low during training. Always on: no job.toml section.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.watch import Action, Decision

log = logging.getLogger(__name__)

MARGIN_BYTES = 8 << 20  # logs, events.jsonl, status files beside the checkpoints
CHECKPOINT_FACTOR = 1.1  # the next save is a whole new checkpoint, a little larger at most


def space_needed(checkpoint_bytes: int) -> int:
    """Free bytes a run needs to write its next checkpoint (the newest one's size as the guide)."""
    return MARGIN_BYTES + int(CHECKPOINT_FACTOR * max(0, checkpoint_bytes))


def disk_problem(free_bytes: int, need_bytes: int, run_dir: Path) -> str | None:
    """Why the run cannot write its next checkpoint, with the fix; None when it can."""
    if free_bytes >= need_bytes:
        return None
    return (f"disk full: {_mib(free_bytes)} free on the file system of {run_dir}, the next checkpoint needs "
            f"~{_mib(need_bytes)}; free space or lower [retention] keep_last (training resumes by itself)")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def checkpoint_bytes(checkpoints_dir: Path) -> int:
    """Size of the newest step-* directory (0 when there is none); links are not followed."""
    try:
        steps = sorted(p for p in checkpoints_dir.iterdir() if p.name.startswith("step-") and not p.is_symlink())
    except OSError:
        return 0
    if not steps:
        return 0
    total = 0
    for root, _dirs, files in os.walk(steps[-1]):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


@dataclass
class DiskWatcher:
    """supervisor.watch.Watcher for free space on the run dir's file system."""

    run_dir: Path
    poll_interval_s: float = 5.0
    name: str = "disk"
    free_bytes: int | None = None
    need_bytes: int = MARGIN_BYTES
    _low: bool = False
    _last_read: float | None = None
    _pending: list[Decision] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.need_bytes = space_needed(checkpoint_bytes(self.run_dir / "checkpoints"))

    def _read(self, now: float) -> None:
        try:
            st = os.statvfs(self.run_dir)
        except OSError as e:
            log.debug("statvfs %s: %s", self.run_dir, e)
            return
        self._last_read = now
        self.free_bytes = st.f_bavail * st.f_frsize
        low = self.free_bytes < self.need_bytes
        if low and not self._low:
            self._pending.append(Decision(Action.NOTE, "disk_low",
                                          disk_problem(self.free_bytes, self.need_bytes, self.run_dir) or "",
                                          {"free_bytes": self.free_bytes, "need_bytes": self.need_bytes}))
        self._low = low

    def poll(self, now: float) -> list[Decision]:
        if self._last_read is None or now - self._last_read >= self.poll_interval_s:
            self._read(now)
        out, self._pending = self._pending, []
        return out

    def blocking_reason(self, now: float) -> str | None:
        self._read(now)  # one statvfs: asked only between attempts
        if self.free_bytes is None:
            return None
        return disk_problem(self.free_bytes, self.need_bytes, self.run_dir)

    def on_checkpoint(self, step: int, now: float) -> None:
        self.need_bytes = space_needed(checkpoint_bytes(self.run_dir / "checkpoints"))

    def status(self) -> dict[str, Any]:
        if self.free_bytes is None:
            return {"summary": "free space not read yet"}
        problem = disk_problem(self.free_bytes, self.need_bytes, self.run_dir)
        return {"free_bytes": self.free_bytes, "need_bytes": self.need_bytes, "blocking": problem,
                "summary": f"{_mib(self.free_bytes)} free, the next checkpoint needs ~{_mib(self.need_bytes)}"}

    def close(self) -> None:
        pass
