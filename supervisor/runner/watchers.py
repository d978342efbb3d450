"""The loop's side of the watchers (supervisor.watch): build them for a job, poll them, ask
whether one blocks a start, and tell them about checkpoints and rank pids. A watcher that
raises is logged and skipped, never allowed to take the loop down.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Sequence

from supervisor.config import JobConfig
from supervisor.watch import Decision, Watcher
from supervisor.watch import registry

log = logging.getLogger(__name__)

# One factory per watcher kind: factory(job) -> Watcher, or None when the job does not want
# it. The built-in ones ([gpu], [power], [logind], disk) come from supervisor.watch.registry.
WATCHER_FACTORIES: list[Callable[[JobConfig], Watcher | None]] = list(registry.WATCHERS)


def build_watchers(job: JobConfig) -> list[Watcher]:
    return [w for w in (factory(job) for factory in WATCHER_FACTORIES) if w is not None]


class WatcherSet:
    def __init__(self, watchers: Sequence[Watcher], on_error: Callable[[str, Exception], None]) -> None:
        self.watchers = list(watchers)
        self.on_error = on_error  # (watcher name, exception) of a failed poll
        self._pids: list[int] | None = None  # rank pids last given to on_attempt

    def __iter__(self) -> Iterator[Watcher]:
        return iter(self.watchers)

    def poll(self, now: float) -> list[tuple[str, Decision]]:
        out = []
        for w in self.watchers:
            try:
                out += [(w.name, d) for d in w.poll(now)]
            except Exception as e:  # noqa: BLE001
                log.exception("watcher %s failed", w.name)
                self.on_error(w.name, e)
        return out

    def blocking(self, now: float) -> str | None:
        """Why no attempt may start now ("name: reason"), or None."""
        for w in self.watchers:
            reason = self._call(w, "blocking_reason", now)
            if reason:
                return f"{w.name}: {reason}"
        return None

    def on_checkpoint(self, step: int, now: float) -> None:
        for w in self.watchers:
            self._call(w, "on_checkpoint", step, now)

    def on_attempt(self, pids: list[int]) -> None:
        """Watchers with an `on_attempt(pids)` hook (the GPU watch: whose GPU processes are the
        job's) learn the ranks' pids whenever that set changes."""
        pids = sorted(pids)
        if pids == self._pids:
            return
        self._pids = pids
        for w in self.watchers:
            if getattr(w, "on_attempt", None) is not None:
                self._call(w, "on_attempt", pids)

    def status(self) -> dict[str, dict[str, Any]]:
        out = {}
        for w in self.watchers:
            try:
                out[w.name] = dict(w.status())
            except Exception as e:  # noqa: BLE001
                out[w.name] = {"error": f"{type(e).__name__}: {e}"}
        return out

    def set_wakeup(self, wake: Callable[[], None]) -> None:
        for w in self.watchers:  # a watcher with a thread of its own (logind) wakes the loop
            if getattr(w, "wakeup", False) is None:
                w.wakeup = wake

    def close(self) -> None:
        for w in self.watchers:
            self._call(w, "close")

    @staticmethod
    def _call(w: Watcher, method: str, *args: Any) -> Any:
        try:
            return getattr(w, method)(*args)
        except Exception:  # noqa: BLE001
            log.exception("watcher %s failed in %s", getattr(w, "name", w), method)
            return None
