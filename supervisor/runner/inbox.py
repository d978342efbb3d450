"""Signals in, wake-ups out. Signal handlers only enqueue (and wake the loop through
signal.set_wakeup_fd); the loop drains the queue. Nothing in the loop sleeps except `wait`.
"""

from __future__ import annotations

import collections
import os
import select
import signal
import time
from typing import Any, Callable

from supervisor import entry

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class SignalInbox:
    def __init__(self, sleep: Callable[[float], None] = time.sleep) -> None:
        self.pending: collections.deque[int] = collections.deque()
        self.sleep = sleep  # without handlers installed (tests): how `wait` passes the time
        self._r = self._w = -1
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        """Handle the stop signals (and SIGCHLD, which only wakes the loop) in this process."""
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, lambda s, f: self.pending.append(s))
        # SIGCHLD only wakes the loop (the default disposition is "ignore" without waking)
        self._old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda s, f: None)
        # a save request that came while the process was starting (entry.py); from here on they come
        # straight to `pending`
        self.pending.extend(entry.take_held())

    def restore(self) -> None:
        if self._r < 0:
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(-1)
        os.close(self._r)
        os.close(self._w)
        self._r = self._w = -1

    def wake(self) -> None:
        """Make the loop tick now; safe from any thread (a write to the self-pipe)."""
        if self._w >= 0:
            try:
                os.write(self._w, b"w")
            except OSError:  # pipe full: the loop is waking anyway
                pass

    def wait(self, timeout_s: float) -> None:
        """Until a signal, a wake-up or `timeout_s`, whichever comes first."""
        if self.pending:
            return
        if self._r < 0:
            self.sleep(timeout_s)
            return
        ready, _, _ = select.select([self._r], [], [], timeout_s)
        if ready:
            try:
                while os.read(self._r, 512):
                    pass
            except BlockingIOError:
                pass
