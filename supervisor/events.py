"""events.jsonl: one JSON object per line saying what the supervisor did and why.

Each record: {"ts": unix seconds, "time": ISO-8601 UTC, "event": name, ...fields}.
Appends are a single write() of one line to a file opened O_APPEND, then fsync: a crash
loses at most the line being written, and a reader never sees two records interleaved.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EventLog:
    def __init__(self, path: str | os.PathLike, *, durable: bool = True) -> None:
        self.path = Path(path)
        self.durable = durable
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        from supervisor.rundir import open_nofollow  # a symlinked events.jsonl: a one-line refusal

        self._fd = open_nofollow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self.last: dict[str, Any] | None = None
        self._failing = False

    def append(self, event: str, now: float, **fields: Any) -> dict[str, Any]:
        record = {
            "ts": round(now, 3),
            "time": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "event": event,
        }
        record.update({k: v for k, v in fields.items() if v is not None})
        line = (json.dumps(record, sort_keys=False, default=str) + "\n").encode()
        try:
            os.write(self._fd, line)
            if self.durable:
                os.fsync(self._fd)
        except OSError as e:  # a full disk must not take the supervisor down: the log still has it
            if not self._failing:
                log.warning("cannot write %s (%s): events go to this log only until it can", self.path, e)
            self._failing = True
        else:
            self._failing = False
        self.last = record
        return record

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_events(path: str | os.PathLike, last: int | None = None) -> list[dict[str, Any]]:
    """The records of an events.jsonl (the last `last` ones), skipping a torn final line."""
    out: deque[dict[str, Any]] = deque(maxlen=last)
    try:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    obj = json.loads(raw)
                except (ValueError, RecursionError):  # torn, not UTF-8, or nested too deep
                    continue
                if isinstance(obj, dict):
                    out.append(obj)
    except FileNotFoundError:
        return []
    return list(out)
