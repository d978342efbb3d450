"""The supervisor's states and the transitions allowed between them.

    (start) --no watcher blocks--> STARTING, else WAITING
    STARTING --first heartbeat--> RUNNING
    STARTING/RUNNING --stop request / hang / orphaned ranks--> STOPPING
    STARTING/RUNNING/STOPPING --attempt over--> BACKOFF | WAITING | EXITED | FATAL
    BACKOFF --delay over--> STARTING | WAITING (a watcher blocks the start)
    WAITING --no watcher blocks--> STARTING
    BACKOFF/WAITING --stop request--> EXITED

Anything else is a bug: Runner._transition raises TransitionError.
"""

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


ACTIVE = frozenset({State.STARTING, State.RUNNING, State.STOPPING})  # an attempt runs

ALLOWED: dict[State | None, frozenset[State]] = {
    None: frozenset({State.STARTING, State.WAITING}),
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
