"""RUN_DIR/metrics.jsonl: what a TrainSession measured, one JSON object per line (torch-free).

Written by the main process only, appended (O_APPEND, whole lines), never rewritten:

  {"kind": "start", "step": 100, "ts": ..., "attempt": 2, "resumed": true}
                                                      one per session, when its loop starts
                                                      (step: where it starts, after resuming)
  {"kind": "step", "step": 120, "ts": 1796627145.6, "attempt": 2, "loss": 4.81, "lr": 0.002,
   "tokens_per_s": 10512.3}                            one per optimizer step
  {"kind": "metrics", "step": 100, "ts": ..., "attempt": 2, "val_loss": 4.9, ...}
                                                      one per report_metrics call
  {"kind": "save", "step": 100, "ts": ..., "attempt": 2, "blocked_s": 0.05, "reasons": [...],
   "background": true}                                one per save the loop made (ts: its end)
  {"kind": "pause", "step": 130, "ts": ..., "attempt": 2, "paused_s": 12.5}
                                                      one per pause of the loop (ts: its end)

Step records are buffered and written about once a second (a loss tensor becomes a float only
then: one device sync per write, not one per step), every other record at once, after the
buffered ones; nothing is fsynced. A process killed by SIGKILL loses at most the last second
of step records. Readers (`read_metrics`, the supervisor's accounting) treat the file as
untrusted: a line that is not a JSON object with an integer step and a finite ts is skipped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from train_core.runfiles import is_number

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
KINDS = ("start", "step", "metrics", "save", "pause")
RESERVED = ("kind", "step", "ts", "attempt")  # a metric of one of these names is written as metric_<name>
FLUSH_S = 1.0
MAX_PENDING = 512
MAX_LINE = 1 << 16  # a reader skips longer lines


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return v if math.isfinite(v) else None


def _plain_floats(values: Sequence[Any]) -> list[float | None]:
    return [_finite(v) for v in values]


class MetricsLog:
    """The writer. `to_floats` turns a list of loss values (tensors, numbers) into floats or
    None in one go (the session's does it with one device sync); `clock` gives ts."""

    def __init__(self, path: str | os.PathLike, *, attempt: int, group_shared: bool = False,
                 to_floats: Callable[[Sequence[Any]], list[float | None]] = _plain_floats,
                 flush_s: float = FLUSH_S, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.attempt = attempt
        self.mode = 0o660 if group_shared else 0o600
        self.to_floats = to_floats
        self.flush_s = flush_s
        self.clock = clock
        self._fd = -1
        self._pending: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self._failing = False

    def _record(self, kind: str, step: int, ts: float | None = None) -> dict[str, Any]:
        return {"kind": kind, "step": int(step), "ts": round(self.clock() if ts is None else ts, 4),
                "attempt": self.attempt}

    def start(self, step: int, *, resumed: bool) -> None:
        """The session's loop starts at `step` (a fresh start: 0)."""
        rec = self._record("start", step)
        rec["resumed"] = bool(resumed)
        self._pending.append(rec)
        self.flush()

    def step(self, step: int, *, loss: Any = None, lr: Any = None, tokens_per_s: Any = None) -> None:
        """An optimizer step just ended (buffered: written within about a second)."""
        rec = self._record("step", step)
        if loss is not None:
            rec["loss"] = loss  # converted at flush (a tensor: no sync now)
        if (v := _finite(lr)) is not None:
            rec["lr"] = v
        if (v := _finite(tokens_per_s)) is not None:
            rec["tokens_per_s"] = round(v, 1)
        self._pending.append(rec)
        if len(self._pending) >= MAX_PENDING or time.monotonic() - self._last_flush >= self.flush_s:
            self.flush(keep_newest=True)  # its loss may still be computing on a device: not waited for

    def metrics(self, step: int, values: Mapping[str, Any]) -> None:
        rec = self._record("metrics", step)
        for name, value in values.items():
            key = f"metric_{name}" if name in RESERVED else str(name)
            rec[key] = _finite(value)
        self._pending.append(rec)
        self.flush()

    def save(self, step: int, *, blocked_s: float, reasons: Sequence[str], background: bool) -> None:
        rec = self._record("save", step)
        rec.update(blocked_s=round(max(0.0, blocked_s), 4), reasons=list(reasons), background=bool(background))
        self._pending.append(rec)
        self.flush()

    def pause(self, step: int, *, paused_s: float) -> None:
        rec = self._record("pause", step)
        rec["paused_s"] = round(max(0.0, paused_s), 4)
        self._pending.append(rec)
        self.flush()

    def flush(self, *, keep_newest: bool = False) -> None:
        """Write what is buffered (but the newest record with `keep_newest`), complete lines in one
        write. A failure (a full disk) is logged once and the lines are dropped: metrics never stop
        training."""
        self._last_flush = time.monotonic()
        cut = len(self._pending) - 1 if keep_newest else len(self._pending)
        if cut <= 0:
            return
        pending, self._pending = self._pending[:cut], self._pending[cut:]
        with_loss = [r for r in pending if "loss" in r]
        if with_loss:
            try:
                floats = self.to_floats([r["loss"] for r in with_loss])
            except Exception as e:  # noqa: BLE001 - e.g. a device in an error state after an OOM
                log.debug("metrics.jsonl: losses not converted: %s", e)
                floats = [None] * len(with_loss)
            for r, v in zip(with_loss, floats):
                if v is None:
                    del r["loss"]
                else:
                    r["loss"] = v
        data = "".join(json.dumps(r, allow_nan=False, default=str) + "\n" for r in pending).encode()
        try:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   self.mode)
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            if not self._failing:
                log.warning("cannot write %s (%s): metrics are not recorded until it can", self.path, e)
            self._failing = True
        else:
            self._failing = False

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _valid(obj: Any) -> bool:
    if not isinstance(obj, dict):
        return False
    step = obj.get("step")
    return (isinstance(step, int) and not isinstance(step, bool) and step >= 0
            and is_number(obj.get("ts", obj.get("time"))))


def iter_metrics(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The valid records of a metrics.jsonl, in file order; nothing when it is missing.

    A record without "kind" (what the demo wrote before TrainSession did: step, metrics, time)
    is read as kind "metrics", with "time" as its ts. Lines that are not JSON objects with an
    integer step >= 0 and a finite ts, or longer than 64 KiB, are skipped."""
    try:
        f = open(path, "rb")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        return
    with f:
        for raw in f:
            if (obj := parse_line(raw)) is not None:
                yield obj


def parse_line(raw: bytes) -> dict[str, Any] | None:
    """One line of a metrics.jsonl as a valid record (see iter_metrics), else None."""
    if len(raw) > MAX_LINE:
        return None
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
        return None
    if not _valid(obj):
        return None
    if "kind" not in obj:
        return {**obj, "kind": "metrics", "ts": obj.get("ts", obj.get("time"))}
    return obj if obj["kind"] in KINDS else None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    return list(iter_metrics(path))
