"""The supervisor <-> rank contract, in one place (docs/contract.md): exit codes, the kinds of
exit a rank reports and the supervisor concludes, the exit report itself, and what "a process
is alive" means. Torch-free: both sides import it.
"""

from __future__ import annotations

import enum
import os
import time
from pathlib import Path
from typing import Any

from train_core.runfiles import ENV_ATTEMPT, ENV_RUN_DIR, RunPaths, node_from_env, read_json, write_json_atomic

# Exit codes of a rank and of `trainsup run`.
EXIT_OK = 0
EXIT_INTERNAL = 1  # a rank: failed (its exit report says how); trainsup: an internal error
EXIT_USAGE = 2  # bad job file, flag or input; the message names the fix (a rank: bad_input)
EXIT_GAVE_UP = 3  # restart budget spent, no progress, or no smaller micro-batch
EXIT_LOCKED = 4  # the run dir is locked by another supervisor
EXIT_SAVED = 75  # EX_TEMPFAIL: a checkpoint was saved, stopped on request; run again to resume


class ExitKind(enum.Enum):
    """Why an attempt ended. A rank reports one of the first six in ranks/exit-R.json; the
    supervisor concludes one of all eight from the reports and the launcher's status."""

    FINISHED = "finished"  # training done
    SAVED = "saved"  # saved on request and exited 75
    OOM = "oom"
    RESUME_FAILED = "resume_failed"  # the checkpoint to resume from could not be loaded
    ERROR = "error"  # an exception, or a non-zero exit without a report
    BAD_INPUT = "bad_input"  # the script rejected its input: retrying cannot help
    KILLED = "killed"  # (supervisor only) died from a signal without saying why
    HUNG = "hung"  # (supervisor only) no heartbeat for hang_timeout_s: killed


def write_exit_report(paths: RunPaths, rank: int, attempt: int, kind: ExitKind, code: int,
                      **fields: Any) -> None:
    """ranks/exit-R.json: a rank's own account of its exit (the launcher's code is not
    reliable: with 2+ ranks it exits 1 even when every rank exits 0)."""
    paths.ranks.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_json_atomic(paths.exit_file(rank), {
        "rank": rank, "pid": os.getpid(), "attempt": attempt, "kind": kind.value, "code": code,
        "finished_at": time.time(), **fields})


def read_exit_reports(paths: RunPaths, attempt: int) -> list[dict[str, Any]]:
    """The exit reports of `attempt`, by rank file name (reports of other attempts are stale)."""
    out = []
    for p in sorted(paths.ranks.glob("exit-*.json")):
        info = read_json(p)
        if info and info.get("attempt") == attempt:
            out.append(info)
    return out


def report_bad_input(message: str) -> int:
    """For a script that finds its input unusable before training: under `trainsup run`, write
    an exit report of kind bad_input, so the supervisor stops at once with exit 2 and this
    message (retrying cannot help); run plainly, do nothing. Returns EXIT_USAGE, the code to
    exit with. Call it after printing the message."""
    run_dir = os.environ.get(ENV_RUN_DIR)
    if run_dir:
        write_exit_report(RunPaths(Path(run_dir), node=node_from_env()), int(os.environ.get("RANK") or 0),
                          int(os.environ.get(ENV_ATTEMPT) or 0), ExitKind.BAD_INPUT, EXIT_USAGE,
                          step=-1, detail=message)
    return EXIT_USAGE


def pid_alive(pid: Any) -> bool:
    """True while `pid` runs. A zombie counts as gone (it will never act again); a pid that is
    not a positive int names no process."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # the state follows the parenthesised command name, which may hold spaces
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


# The stop window: after asking the ranks to save, the supervisor waits [stop] grace_s, then
# sends SIGTERM, then SIGKILL kill_after_s later. A rank whose supervisor died ends itself after
# the same window (TRAINSUP_STOP_WINDOW_S). Whatever must outlast a stop (systemd's
# TimeoutStopSec, the elastic agent's shutdown timeout, a new supervisor waiting for an earlier
# run's ranks) waits the window plus STOP_MARGIN_S.
STOP_MARGIN_S = 20.0


def stop_window_s(grace_s: float, kill_after_s: float) -> float:
    return grace_s + kill_after_s


def outlast_stop_s(grace_s: float, kill_after_s: float) -> float:
    return stop_window_s(grace_s, kill_after_s) + STOP_MARGIN_S
