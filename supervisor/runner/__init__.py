"""The supervisor's loop and what it drives: states, attempts, the run's checkpoints, the
OOM back-off, the restart policy, and the process seam to the OS (procs, launch)."""

from supervisor.runner.loop import Runner
from supervisor.runner.states import State, TransitionError

__all__ = ["Runner", "State", "TransitionError"]
