"""What a rank tells the supervisor through the run dir: ranks/rank-R.json (who it is), what
goes into ranks/exit-R.json (train_core.contract writes it), and rank 0's status.json."""

from __future__ import annotations

import math
import os
import socket
import time
from typing import Any

import torch

from train_core.contract import EXIT_INTERNAL, EXIT_SAVED, EXIT_USAGE, ExitKind
from train_core.errors import ResumeFailed, StopTraining, StreamStateError
from train_core.faults import is_oom, one_line
from train_core.runfiles import RunPaths, hold_alive_lock, write_json_atomic


def announce_rank(paths: RunPaths, *, rank: int, local_rank: int, world_size: int, attempt: int) -> int:
    """Hold alive.lock (returns its fd, held until the process exits), drop an earlier
    attempt's exit report, write ranks/rank-R.json."""
    paths.node_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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
    if isinstance(exc, StreamStateError):
        return ExitKind.BAD_INPUT, EXIT_USAGE, {"detail": str(exc)}
    if is_oom(exc):
        return ExitKind.OOM, EXIT_INTERNAL, {"detail": one_line(exc)}
    code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else EXIT_INTERNAL
    return ExitKind.ERROR, code, {"detail": one_line(exc)}


class RateMeter:
    """Tokens and samples per second over all ranks, from this rank's running totals, measured
    between optimizer steps: the main loop calls `stepped` at each one (a clock read), the
    heartbeat reads `rates` (any thread). Between steps (a slow step, an evaluation, a pause)
    the last measured rate stands: never a 0 because no step ended since the last beat."""

    MIN_WINDOW_S = 0.5

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._start: tuple[float, int, int] | None = None  # (monotonic, tokens, samples) at a step
        self._last: tuple[float, int, int] | None = None
        self._rates: tuple[float | None, float | None] = (None, None)

    def stepped(self, tokens: int, samples: int) -> None:
        """An optimizer step ended; `tokens`, `samples`: this rank's totals so far (never reset)."""
        self._last = (time.monotonic(), tokens, samples)
        if self._start is None:
            self._start = self._last

    def restart(self) -> None:
        """After a pause or a save: the time since the last step is not throughput; the next
        window starts now."""
        if self._last is not None:
            self._start = self._last = (time.monotonic(), self._last[1], self._last[2])

    def rates(self) -> tuple[float | None, float | None]:
        start, last = self._start, self._last
        if start is None or last is None:
            return self._rates
        dt = last[0] - start[0]
        if dt >= self.MIN_WINDOW_S and last[1] >= start[1] and last[2] >= start[2]:
            self._rates = ((last[1] - start[1]) * self.world_size / dt, (last[2] - start[2]) * self.world_size / dt)
            self._start = last
        return self._rates


class LossMean:
    """The mean of the losses given to step_done over one optimizer step (its micro-batches),
    kept on the device: no sync here (metrics.jsonl converts a second's worth at once)."""

    def __init__(self) -> None:
        self._total: Any = None
        self._n = 0

    def add(self, loss: Any) -> None:
        try:
            if isinstance(loss, torch.Tensor):
                v = loss.detach()
                v = (v.float() if v.dim() == 0 else v.float().mean())
            else:
                v = float(loss)
            self._total = v if self._total is None else self._total + v
            self._n += 1
        except Exception:  # noqa: BLE001 - a loss of an odd type is not recorded; training goes on
            pass

    def take(self) -> Any:
        """The mean since the last take (a tensor or a float), or None; starts over."""
        total, n = self._total, self._n
        self._total, self._n = None, 0
        if total is None or n == 0:
            return None
        return total / n if n > 1 else total


def losses_to_floats(values: list[Any]) -> list[float | None]:
    """Loss values (tensors, numbers) as finite floats or None: the tensors in one transfer."""
    out: list[float | None] = [None] * len(values)
    idx = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    if idx:
        try:
            got = torch.stack([values[i].detach().float().reshape(()) for i in idx]).tolist()
        except Exception:  # noqa: BLE001 - e.g. tensors on different devices: one by one
            got = [loss_value(values[i]) for i in idx]
        for i, v in zip(idx, got):
            out[i] = v
    for i, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            out[i] = loss_value(v)
    return [v if v is not None and math.isfinite(v) else None for v in out]


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
