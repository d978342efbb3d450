"""The small files through which the supervisor and the ranks talk (torch-free).

RUN_DIR/
  status.json        rank 0's heartbeat (atomic replace)
  control.json       the supervisor's standing requests to the ranks (atomic replace)
  ranks/rank-R.json  each rank's PID for the current attempt (the supervisor signals these)
  ranks/exit-R.json  each rank's own account of why it exited (the launcher's exit code
                     is not reliable: with 2+ ranks it exits 1 even when all exit 0)

Every write here is "write a temp file in the same directory, fsync, rename": a reader
never sees half a file, and a crash leaves the old version.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

# Environment contract (docs/contract.md, "Environment"): names may grow, never change.
ENV_RUN_DIR = "TRAINSUP_RUN_DIR"
ENV_CHECKPOINT_DIR = "TRAINSUP_CHECKPOINT_DIR"
ENV_RESUME_FROM = "TRAINSUP_RESUME_FROM"
ENV_ATTEMPT = "TRAINSUP_ATTEMPT"
ENV_SAVE_SIGNAL = "TRAINSUP_SAVE_SIGNAL"
ENV_SUPERVISOR_PID = "TRAINSUP_SUPERVISOR_PID"  # ranks exit (after saving) if it dies
ENV_MICRO_BATCH = "TRAINSUP_MICRO_BATCH"  # OOM recovery: override of the script's micro-batch
ENV_GRAD_ACCUM = "TRAINSUP_GRAD_ACCUM"  # ... and the matching gradient accumulation
ENV_CHECKPOINT_INTERVAL_STEPS = "TRAINSUP_CHECKPOINT_INTERVAL_STEPS"  # [checkpoint] interval_steps: wins over the script's
ENV_BACKGROUND_SAVES = "TRAINSUP_BACKGROUND_SAVES"  # [checkpoint] background: "1"/"0" wins over the script's
ENV_GROUP_SHARED = "TRAINSUP_GROUP_SHARED"  # "1": the job's run dir is shared with the group (checkpoints 0640)
ENV_STOP_WINDOW_S = "TRAINSUP_STOP_WINDOW_S"  # a rank whose supervisor died exits after this long, saved or not
ENV_AUTO_INTERVAL = "TRAINSUP_AUTO_INTERVAL"  # interval_steps "auto": JSON {expected_mtbf_s, min_steps, max_s, failures, uptime_s}
ENV_STOP_BUDGET_S = "TRAINSUP_STOP_BUDGET_S"  # a stop has this long to save (no save starts that cannot finish)
ENV_MACHINE_RANK = "TRAINSUP_MACHINE_RANK"  # several machines: this node's machine rank (its files: RUN_DIR/nodes/node-M)

NO_FLOCK_ERRNOS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)  # e.g. Lustre without -o flock, NFS without lockd


def hold_alive_lock(paths: RunPaths) -> int:
    """Take a shared flock on ranks/alive.lock for the life of this process; returns the fd
    (keep it open), or -1 on a file system without flock (a warning: the guard is off). A
    supervisor that starts while processes of an earlier run still hold it (its predecessor
    was SIGKILLed while they save) waits for them instead of starting more. The supervisor
    gives its launcher one too, from spawn on; a rank takes its own in TrainSession."""
    paths.ranks.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(paths.alive_lock, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a supervisor's probe holds it exclusively for microseconds
    except OSError as e:
        os.close(fd)
        if e.errno not in NO_FLOCK_ERRNOS:
            raise
        logging.getLogger(__name__).warning("%s: no flock on this file system (%s): a restarted supervisor "
                                            "cannot tell whether this rank still runs", paths.alive_lock, e.strerror)
        return -1
    return fd


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename/create/unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, durable: bool = True) -> None:
    """Replace `path` with `obj` as JSON so that readers see the old or the new file.

    `durable=False` skips the fsyncs: right for heartbeats written every few seconds,
    where losing the last one in a power cut costs nothing.
    """
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode(),
                       durable=durable)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` so that readers see the old or the new file (mode 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def is_number(value: object) -> bool:
    """A finite int or float (a bool is not a number here; nor an int too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int of hundreds of digits, from a hostile file
        return False


def json_number(obj: Mapping[str, Any], key: str) -> float | None:
    """obj[key] when it is a finite number >= 0 (a field of a file read from disk), else None."""
    value = obj.get(key)
    return float(value) if is_number(value) and value >= 0 else None


def paths_here(run_dir: Path) -> RunPaths:
    """The files a command that reads a run (status, report) shows: for a run on several
    machines, the node of this host (node.json's host), else the lowest machine rank."""
    nodes = run_dir / "nodes"
    if (run_dir / "supervisor.json").exists() or not nodes.is_dir():
        return RunPaths(run_dir)
    ranks = sorted(int(p.name[5:]) for p in nodes.glob("node-*") if p.name[5:].isdigit())
    here = [m for m in ranks if (read_json(nodes / f"node-{m}" / "node.json") or {}).get("host") == socket.gethostname()]
    return RunPaths(run_dir, node=(here or ranks or [None])[0])


def node_from_env() -> int | None:
    """This rank's machine rank when the supervisor runs it on several machines, else None."""
    value = os.environ.get(ENV_MACHINE_RANK, "")
    return int(value) if value.isdigit() else None


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file is missing, unreadable (a directory, no
    permission) or not a JSON object (including one nested too deep to parse)."""
    try:
        with open(path, "rb") as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return obj if isinstance(obj, dict) else None


@dataclass(frozen=True)
class RunPaths:
    """Where a run's files are. `node`: the machine rank of a run on several machines, whose
    supervisors share RUN_DIR: each node's own files (lock, heartbeat, control, events, logs,
    ranks) live in RUN_DIR/nodes/node-M; checkpoints, costs.json and metrics.jsonl are shared."""

    run_dir: Path
    node: int | None = None

    @property
    def node_dir(self) -> Path:
        return self.run_dir if self.node is None else self.run_dir / "nodes" / f"node-{self.node}"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def status(self) -> Path:
        return self.node_dir / "status.json"

    @property
    def supervisor(self) -> Path:
        return self.node_dir / "supervisor.json"

    @property
    def failures(self) -> Path:
        return self.node_dir / "failures.json"

    @property
    def costs(self) -> Path:
        return self.run_dir / "costs.json"

    @property
    def control(self) -> Path:
        return self.node_dir / "control.json"

    @property
    def events(self) -> Path:
        return self.node_dir / "events.jsonl"

    @property
    def logs(self) -> Path:
        return self.node_dir / "logs"

    @property
    def ranks(self) -> Path:
        return self.node_dir / "ranks"

    @property
    def lock(self) -> Path:
        return self.node_dir / "job.lock"

    @property
    def alive_lock(self) -> Path:
        """Every rank holds a shared flock on it while it lives (hold_alive_lock)."""
        return self.ranks / "alive.lock"

    def rank_file(self, rank: int) -> Path:
        return self.ranks / f"rank-{rank}.json"

    def exit_file(self, rank: int) -> Path:
        return self.ranks / f"exit-{rank}.json"


@dataclass(frozen=True)
class Control:
    """The supervisor's standing requests, read by every rank at each step boundary.

    stop:     save a checkpoint at the next optimizer-step boundary, then exit 75.
    pause:    hold at the next step boundary (heartbeat goes on) until pause is false.
    save_seq: a checkpoint is wanted (training continues) whenever this number grows
              past the last one the rank handled; the rank starts from the value it
              finds at startup, so an old request is never replayed.
    """

    stop: bool = False
    pause: bool = False
    save_seq: int = 0
    reason: str = ""
    updated_at: float = 0.0
    budget_s: float = 0.0  # this stop's own budget when shorter than $TRAINSUP_STOP_BUDGET_S (0: none)


def read_control(path: str | os.PathLike) -> Control:
    obj = read_json(path) or {}
    return Control(
        stop=bool(obj.get("stop", False)),
        pause=bool(obj.get("pause", False)),
        save_seq=int(obj.get("save_seq", 0) or 0),
        reason=str(obj.get("reason", "")),
        updated_at=float(obj.get("updated_at", 0.0) or 0.0),
        budget_s=float(obj.get("budget_s", 0.0) or 0.0),
    )


def write_control(path: str | os.PathLike, control: Control) -> None:
    obj = asdict(control)
    obj["updated_at"] = time.time()
    write_json_atomic(path, obj)
