"""What a rank tells the supervisor through the run dir: ranks/rank-R.json (who it is), what
goes into ranks/exit-R.json (train_core.contract writes it), and rank 0's status.json."""

from __future__ import annotations

import math
import os
import socket
import time
from typing import Any

import torch

from train_core.contract import EXIT_INTERNAL, EXIT_SAVED, ExitKind
from train_core.errors import ResumeFailed, StopTraining
from train_core.faults import is_oom, one_line
from train_core.runfiles import RunPaths, hold_alive_lock, write_json_atomic


def announce_rank(paths: RunPaths, *, rank: int, local_rank: int, world_size: int, attempt: int) -> int:
    """Hold alive.lock (returns its fd, held until the process exits), drop an earlier
    attempt's exit report, write ranks/rank-R.json."""
    paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    alive_fd = hold_alive_lock(paths)
    try:
        os.unlink(paths.exit_file(rank))  # a report from an earlier attempt is stale
    except FileNotFoundError:
        pass
    write_json_atomic(paths.rank_file(rank), {
        "pid": os.getpid(),
        "rank": rank,
        "local_rank": local_rank,
        "world_size": world_size,
        "attempt": attempt,
        "host": socket.gethostname(),
        "started_at": time.time(),
    })
    return alive_fd


def exit_report_for(exc: BaseException) -> tuple[ExitKind, int, dict[str, Any]]:
    """(kind, exit code, report fields) for a session that ends in `exc`."""
    if isinstance(exc, StopTraining):
        if exc.unsaved:  # stopped as asked, from the newest checkpoint; the steps since are lost
            return ExitKind.SAVED, EXIT_SAVED, {
                "checkpoint": exc.checkpoint.path if exc.checkpoint is not None else None,
                "detail": f"{exc.why}; not saved: {exc.unsaved}", "lost_steps": exc.lost_steps}
        return ExitKind.SAVED, EXIT_SAVED, {"checkpoint": exc.checkpoint.path, "detail": exc.why}
    if isinstance(exc, ResumeFailed):
        return ExitKind.RESUME_FAILED, EXIT_INTERNAL, {"checkpoint": exc.checkpoint, "detail": exc.problem,
                                                       "transient": exc.transient}
    if is_oom(exc):
        return ExitKind.OOM, EXIT_INTERNAL, {"detail": one_line(exc)}
    code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else EXIT_INTERNAL
    return ExitKind.ERROR, code, {"detail": one_line(exc)}


class RateMeter:
    """Tokens and samples per second over all ranks, from this rank's counters (which reset
    at each save), re-measured at most every 0.5 s."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._mark = (time.monotonic(), 0, 0)
        self._rates: tuple[float | None, float | None] = (None, None)

    def rates(self, tokens: int, samples: int) -> tuple[float | None, float | None]:
        now = time.monotonic()
        t0, tok0, smp0 = self._mark
        if now - t0 >= 0.5:
            dt = now - t0
            # counters reset at each save; a negative delta just means "no rate this beat"
            if tokens >= tok0 and samples >= smp0:
                self._rates = ((tokens - tok0) * self.world_size / dt, (samples - smp0) * self.world_size / dt)
            self._mark = (now, tokens, samples)
        return self._rates


def status(*, attempt: int, state: str, where: dict[str, Any], max_steps: int | None, loss: Any,
           rates: tuple[float | None, float | None], last: Any, metrics: dict[str, float]) -> dict[str, Any]:
    """Rank 0's status.json record. `last`: the last checkpoint (a Checkpoint) or None."""
    return {
        "attempt": attempt,
        "pid": os.getpid(),
        "state": state,
        **where,
        "max_steps": max_steps,
        "loss": loss_value(loss),
        "tokens_per_s": rates[0],
        "samples_per_s": rates[1],
        "last_checkpoint": {"step": last.step, "path": str(last.path), "reason": last.reason} if last else None,
        "metrics": {k: (v if math.isfinite(v) else None) for k, v in metrics.items()},
    }


def loss_value(loss: Any) -> float | None:
    """The last loss as a finite float for status.json, else None."""
    try:
        value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else (
            None if loss is None else float(loss))
    except Exception:  # noqa: BLE001
        return None
    return value if value is not None and math.isfinite(value) else None
