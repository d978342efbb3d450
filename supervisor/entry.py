"""The `trainsup` command (and `python -m supervisor`). Its first act: keep a save request that
comes while the supervisor is still starting.

SIGUSR1's default action ends a process, and the supervisor takes a third of a second (more on a
loaded machine) to import and reach its run loop, which handles it: a SIGUSR1 in that window ended
it with exit 138 and nothing saved, and Slurm's warning can come in a job's first second
(docs/platform.md). So the signal is held from the first line on, and the run loop replays it once
its own handlers are in (runner/inbox.py): the attempt starts and saves at its first step
boundary. Commands other than `run` drop it.
"""

from __future__ import annotations

import signal

HELD_SIGNALS = (signal.SIGUSR1,)
_held: list[int] = []


def _hold(signum: int, frame: object) -> None:
    _held.append(signum)


def take_held() -> list[int]:
    """The signals held since start-up, oldest first; each is handed out once."""
    held = _held[:]
    del _held[:len(held)]
    return held


def main() -> None:
    for sig in HELD_SIGNALS:
        signal.signal(sig, _hold)
    from supervisor.cli import main as cli

    cli(prog_name="trainsup")
