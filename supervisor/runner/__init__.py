"""The supervisor's loop and what it drives: states, attempts, the run's checkpoints, the
OOM back-off, the restart policy, and the process seam to the OS (procs, launch)."""

from supervisor.runner.loop import Runner, acquire_run_lock, build_watchers
from supervisor.runner.states import State, TransitionError

__all__ = ["Runner", "State", "TransitionError", "acquire_run_lock", "build_watchers"]
