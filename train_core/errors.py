"""The exceptions a TrainSession raises (all importable from train_core.session too)."""

from __future__ import annotations

import os
from typing import Any


class SessionError(Exception):
    """Misuse of the session API or a run dir it cannot use; the message names the fix."""


class StreamStateError(SessionError):
    """A stream dataset's state_dict() returned something that is not plain data (bad input,
    exit 2: a checkpoint stores its state without code, train_core/streams.py)."""


class StopTraining(BaseException):
    """Raised out of the loop after the stop checkpoint is committed; the session turns it
    into exit code 75. A BaseException so a user's `except Exception` does not swallow it."""

    def __init__(self, checkpoint: Any, why: str, *, unsaved: str = "", lost_steps: int = 0):
        # checkpoint: a train_core.store.Checkpoint, the newest one; None only when `unsaved`
        # says why no save was made (the stop's budget could not hold one)
        where = f"checkpoint {checkpoint.path}" if checkpoint is not None else "no checkpoint"
        super().__init__(f"stopped on request ({why}); {where}" + (f"; not saved: {unsaved}" if unsaved else ""))
        self.checkpoint = checkpoint
        self.why = why
        self.unsaved = unsaved
        self.lost_steps = lost_steps


class ResumeFailed(Exception):
    """The checkpoint could not be restored; nothing of it was applied, or the run stops.

    `transient`: the fault says nothing about the checkpoint (out of memory, an I/O error, a
    timeout, all retried LOAD_RETRIES times): the supervisor falls back without quarantining it."""

    def __init__(self, checkpoint: str | os.PathLike, problem: str, *, transient: bool = False):
        super().__init__(f"cannot resume from {checkpoint}: {problem}")
        self.checkpoint = str(checkpoint)
        self.problem = problem
        self.transient = transient


class BadCheckpointChoice(Exception):
    """The checkpoint the user asked for (TRAINSUP_RESUME_FROM or resume=PATH, not chosen by the
    supervisor) is unusable: bad input, exit 2, no fallback to another one."""


class CheckpointSaveFailed(Exception):
    """A save failed on some rank; the message says what is still safe (and the fix for a full disk)."""
