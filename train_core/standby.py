"""A standby rank: imports what every rank imports, then waits to be told what to run.

    python -m train_core.standby            # started by the supervisor, stdin a pipe from it

The supervisor starts one once an attempt has trained 60 s (at nice 19, its autogroup too, so it
runs on CPU time the training leaves, when it may restore the priority afterwards) and
otherwise while an attempt ends (a crash, an OOM back-off, a hang), so that the next attempt's
rank has torch, accelerate and torch._dynamo (which the first optimizer built imports) loaded
before it is needed. $TRAINSUP_STANDBY_NICE: the nice value to import at; every thread of the
process, and its autogroup, get the values they started with back before the script runs.
When the attempt starts, the supervisor writes one JSON line:
{"argv": [script, *args], "env": {...}, "cwd": "...", "log": "..."}; the standby takes that
environment, working directory and output file and runs the script as `python script args`
would (`__main__`, sys.argv, sys.path[0]). End of input without a line:
the supervisor discarded it (or died); exit 0 at once.

What a standby cannot change, the supervisor checks before using one: the environment at
start (everything but TRAINSUP_* must be equal, since torch and the interpreter read some of
it at import) and the interpreter. A script that sets variables in os.environ that torch reads
at import (OMP_NUM_THREADS, ...) before importing torch should set them in the job's
[train] env instead, or turn standbys off ([restart] standby = false).
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import time
from pathlib import Path


# torch._dynamo: torch.optim's constructors import it on first use (~0.9 s on 2 cores)
PRELOAD = ("torch", "torch._dynamo", "accelerate", "train_core.session")


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)


AUTOGROUP = Path("/proc/self/autogroup")  # "/autogroup-N nice X" (CONFIG_SCHED_AUTOGROUP)


def autogroup_nice() -> int | None:
    """The nice value of this session's autogroup; None on a kernel without autogroups."""
    try:
        return int(AUTOGROUP.read_text().rsplit("nice", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def go_idle(nice: int, group_nice: int | None) -> None:
    """Import on CPU time the training leaves. The standby has a session of its own, and with
    autogroups (most kernels) the scheduler shares the CPU between sessions first and looks at a
    task's nice value only inside its session: a nice-19 standby alone took half the CPU, and
    training whose threads meet at every parallel region (OpenMP) ran its steps ~7x slower for
    those seconds (docs/platform.md, "Standby priority"). So the autogroup (its nice value
    `group_nice`, None without autogroups) gets `nice` too."""
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    if group_nice is not None:
        try:
            AUTOGROUP.write_text(str(nice))
        except OSError as e:  # e.g. a read-only /proc: still a standby, only a greedier one
            print(f"trainsup standby: could not lower its autogroup's priority: {e}", file=sys.stderr, flush=True)


def restore_priority(nice: int, group_nice: int | None) -> None:
    """Every thread of this process back to `nice` (per thread on Linux: the imports started
    some, at the standby's value), and the autogroup back to `group_nice`."""
    for tid in (int(t) for t in os.listdir("/proc/self/task")):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    if group_nice is not None:
        AUTOGROUP.write_text(str(group_nice))


def main() -> int:
    base, group_base = os.getpriority(os.PRIO_PROCESS, 0), autogroup_nice()
    nice = os.environ.get("TRAINSUP_STANDBY_NICE")
    if nice:
        go_idle(int(nice), group_base)
    t0 = time.monotonic()
    preload()
    print(f"trainsup standby: ready (pid {os.getpid()}, imports took {time.monotonic() - t0:.1f} s)", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    order = json.loads(line)
    if nice:
        try:
            restore_priority(base, group_base)  # the rank trains at the priority it would have had
        except OSError as e:
            print(f"trainsup standby: could not restore nice {base}: {e}", file=sys.stderr, flush=True)
    fd = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.clear()
    os.environ.update(order["env"])
    os.chdir(order["cwd"])
    script = order["argv"][0]
    sys.argv = list(order["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
