"""What the supervisor's watchers (GPU, power, logind, disk) tell its main loop.

A watcher turns readings of the outside world into `Decision`s. The supervisor's
loop calls `poll(now)` about once a second, acts on the decisions, and tells the
watchers what happened (`on_checkpoint`). Watchers never signal ranks themselves:
one loop owns the children (docs/architecture.md, "Design rules": handlers enqueue, the loop dispatches).

Contract for implementations:
- `poll` must return quickly (well under 100 ms): slow I/O (NVML, D-Bus) runs in
  the watcher's own thread and `poll` drains what it queued.
- `blocking_reason` says why a new attempt must not start now (too hot, on
  battery with action "stop", system going to sleep), or None.
- `status` is a JSON-able dict merged into `supervisor.json` under the watcher's
  `name`, shown by `trainsup status`.
- optional `on_attempt(pids)`: the current attempt's rank PIDs, called each time
  that set changes (the GPU watch uses it to tell the job's GPU processes apart).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol


class Action(enum.Enum):
    NOTE = "note"  # record an event only (e.g. throttling noticed, VRAM warning)
    PAUSE = "pause"  # ranks pause at the next step boundary, keep their state
    RESUME = "resume"  # paused ranks continue
    SAVE = "save"  # ranks commit a checkpoint at the next step boundary and continue
    STOP = "stop"  # ranks save and exit 75; restart once blocking_reason() is None


@dataclass(frozen=True)
class Decision:
    action: Action
    event: str  # events.jsonl "event" name, e.g. "thermal_pause", "on_battery"
    reason: str  # one human sentence: what was seen and why this follows
    details: dict[str, Any] = field(default_factory=dict)


class Watcher(Protocol):
    name: str

    def poll(self, now: float) -> list[Decision]: ...

    def blocking_reason(self, now: float) -> str | None: ...

    def on_checkpoint(self, step: int, now: float) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
