"""The supervisor's states and the transitions allowed between them."""

from __future__ import annotations

import enum


class State(enum.Enum):
    STARTING = "starting"  # launcher spawned, no heartbeat of this attempt yet
    RUNNING = "running"  # heartbeats arriving
    STOPPING = "stopping"  # save requested (or hung): waiting for exits, escalating
    BACKOFF = "backoff"  # waiting before the next attempt
    WAITING = "waiting"  # a watcher blocks the next attempt (too hot, on battery, ...)
    EXITED = "exited"  # done: finished, or stopped on request
    FATAL = "fatal"  # gave up

    @property
    def terminal(self) -> bool:
        return self in (State.EXITED, State.FATAL)


ALLOWED: dict[State | None, frozenset[State]] = {
    None: frozenset({State.STARTING, State.WAITING, State.EXITED}),
    State.STARTING: frozenset({State.RUNNING, State.STOPPING, State.BACKOFF, State.WAITING, State.EXITED, State.FATAL}),
    State.RUNNING: frozenset({State.STOPPING, State.BACKOFF, State.WAITING, State.EXITED, State.FATAL}),
    State.STOPPING: frozenset({State.BACKOFF, State.WAITING, State.EXITED, State.FATAL}),
    State.BACKOFF: frozenset({State.STARTING, State.WAITING, State.EXITED}),
    State.WAITING: frozenset({State.STARTING, State.EXITED}),
    State.EXITED: frozenset(),
    State.FATAL: frozenset(),
}


class TransitionError(RuntimeError):
    pass
