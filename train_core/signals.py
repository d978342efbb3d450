"""Stop requests by signal: the handler only records, the training loop acts.

docs/platform.md ("Signal handlers"): a handler that does I/O can crash on a second signal ("reentrant call"), so
`StopFlag`'s handler stores the signal number and returns. A second (third, ...) signal
while the first is being handled changes nothing: the save already under way goes on.

DataLoader workers are separate processes that receive the same SIGTERM/SIGINT when a
launcher forwards them to the process group; if they die, the rank raises "DataLoader
worker exited unexpectedly" before it can save. `ignore_stop_signals_worker_init` makes
workers ignore them (chaining the user's own worker_init_fn).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Iterable

from train_core.runfiles import ENV_SAVE_SIGNAL

DEFAULT_SAVE_SIGNAL = "SIGUSR1"


def parse_signal(name: str) -> signal.Signals:
    """'SIGUSR1', 'USR1' or '10' -> signal.SIGUSR1; a clear error otherwise."""
    text = name.strip().upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text))
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise ValueError(
            f"{ENV_SAVE_SIGNAL}={name!r} is not a signal name; use e.g. SIGUSR1 or SIGUSR2"
        ) from None


def save_signal_from_env() -> signal.Signals:
    return parse_signal(os.environ.get(ENV_SAVE_SIGNAL) or DEFAULT_SAVE_SIGNAL)


def stop_signals() -> tuple[signal.Signals, ...]:
    sigs = [save_signal_from_env(), signal.SIGTERM, signal.SIGINT]
    return tuple(dict.fromkeys(sigs))  # keep order, drop duplicates


class StopFlag:
    """Set by a signal handler or a watcher thread; read by the loop at step boundaries."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None
        self.reason: str = ""
        self.set_at: float | None = None  # time.monotonic() when first set: a stop's budget runs from here
        self._previous: dict[int, object] = {}

    # The handler: attribute stores and an Event.set, nothing that can block or do I/O.
    def _handler(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        if self.set_at is None:
            self.set_at = time.monotonic()
        self._event.set()

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self.set_at = time.monotonic()
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def describe(self) -> str:
        if self.signum is not None:
            return f"signal {signal.Signals(self.signum).name}"
        return self.reason or "stop requested"

    def install(self, signums: Iterable[int] | None = None) -> None:
        """Route `signums` (default: the save signal, SIGTERM, SIGINT) to this flag.

        Must run in the main thread. An inherited SIG_IGN (a child of a non-interactive shell
        ignores SIGINT) is replaced too: the supervisor's requests must get through.
        """
        for sig in signums if signums is not None else stop_signals():
            self._previous[int(sig)] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            try:
                signal.signal(sig, prev)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
        self._previous.clear()


def ignore_stop_signals_worker_init(
    user_fn: Callable[[int], None] | None = None,
) -> Callable[[int], None]:
    """A DataLoader worker_init_fn that ignores stop signals, then calls `user_fn`."""
    if getattr(user_fn, "_trainsup_wrapped", False):
        return user_fn  # type: ignore[return-value]
    sigs = tuple(int(s) for s in stop_signals())
    fn = _WorkerInit(sigs, user_fn)
    return fn


class _WorkerInit:
    """Picklable (spawn/forkserver start methods pickle the worker_init_fn)."""

    _trainsup_wrapped = True

    def __init__(self, sigs: tuple[int, ...], user_fn: Callable[[int], None] | None):
        self.sigs = sigs
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        for sig in self.sigs:
            signal.signal(sig, signal.SIG_IGN)
        if self.user_fn is not None:
            self.user_fn(worker_id)
