"""A run on several machines: one `trainsup run` per node, all given the same job file and the
same RUN_DIR on a filesystem they share (torch-free).

The supervisors never talk over the network: the ranks do (accelerate/torch's rendezvous, the
per-step stop agreement, the commit barrier), and the supervisors meet through RUN_DIR/nodes:

  nodes/node-M/node.json   written at start: machine rank, host, pid, start time, the job's keys
  nodes/node-M/...         that node's lock, heartbeat, control, events, logs, ranks (RunPaths.node)
  nodes/stop.json          the first node asked to stop (a signal, power, heat) writes it; the
                           others stop too, so every supervisor exits 75 after the one save

At start every node waits until every machine rank has written a node.json of this start (its
start time within the join timeout of ours): that proves the filesystem is shared (a node-local
RUN_DIR looks like a node that never started), and the job keys are compared, so nodes given
different job files refuse to train together, naming the keys. Times are wall-clock times:
the nodes' clocks must agree to well within the join timeout (NTP does).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from pathlib import Path
from typing import Any, Callable, Mapping

from supervisor.config import JobConfig
from train_core import runfiles
from train_core.contract import EXIT_GAVE_UP, EXIT_USAGE

log = logging.getLogger(__name__)

NODE_FILE = "node.json"
STOP_FILE = "stop.json"


def nodes_dir(job: JobConfig) -> Path:
    return job.run_dir / "nodes"


def job_keys(job: JobConfig) -> dict[str, Any]:
    """What every node must agree on: the whole job but this node's machine rank, flattened
    to "section.key" -> a JSON value."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)):
            flat[prefix] = [str(v) if isinstance(v, Path) else v for v in value]
        else:
            flat[prefix] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

    walk("", dataclasses.replace(job, launch=dataclasses.replace(job.launch, machine_rank=0), job_file=None))
    return flat


def announce(job: JobConfig, started_at: float, pid: int) -> None:
    runfiles.write_json_atomic(job.paths.node_dir / NODE_FILE, {
        "machine_rank": job.launch.machine_rank, "host": socket.gethostname(), "pid": pid,
        "started_at": started_at, "job": job_keys(job)})


def differing(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def wait_for_nodes(job: JobConfig, started_at: float, *, clock: Callable[[], float],
                   wait: Callable[[float], bool]) -> tuple[int, str]:
    """Wait until every machine rank announced this start: (0, "") when all did with the same
    job; (EXIT_USAGE, why) when a node's job differs; (EXIT_GAVE_UP, why) after `timeout_s`
    naming the missing machine ranks; (-1, "") when `wait` returned True (a stop signal)."""
    mine = job_keys(job)
    timeout_s = job.launch.join_timeout_s
    deadline = clock() + timeout_s
    while True:
        missing = []
        for m in range(job.launch.num_machines):
            if m == job.launch.machine_rank:
                continue
            info = runfiles.read_json(nodes_dir(job) / f"node-{m}" / NODE_FILE) or {}
            t = info.get("started_at")
            if not runfiles.is_number(t) or abs(t - started_at) > timeout_s:
                missing.append(m)  # never started, or a file left by an earlier run
                continue
            keys = differing(mine, info.get("job") if isinstance(info.get("job"), dict) else {})
            if keys:
                return EXIT_USAGE, (f"machine rank {m} ({info.get('host', '?')}) was started with a different job: "
                                    f"{', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''} differ; give every node "
                                    "the same job file (only [launch] machine_rank differs)")
        if not missing:
            return 0, ""
        if clock() >= deadline:
            names = ", ".join(map(str, missing))
            return EXIT_GAVE_UP, (f"machine rank {names} did not join within {timeout_s:.0f} s (no "
                                  f"{nodes_dir(job)}/node-M/{NODE_FILE} of this start): start `trainsup run` with "
                                  f"this job on every node; if it runs, RUN_DIR is not on a filesystem the nodes "
                                  f"share (a node-local disk looks like a node that never started)")
        if wait(1.0):
            return -1, ""


def post_stop(job: JobConfig, cause: str, at: float) -> None:
    """This node stops the run: the others follow (they read it each tick)."""
    try:
        runfiles.write_json_atomic(nodes_dir(job) / STOP_FILE, {"machine_rank": job.launch.machine_rank,
                                                                "cause": cause, "at": at})
    except OSError as e:
        log.warning("cannot write %s: %s (the other nodes' ranks still stop at the same step)",
                    nodes_dir(job) / STOP_FILE, e)


def stop_from_other_node(job: JobConfig, since: float) -> str | None:
    """The cause of a stop another node posted after `since` (this supervisor's start), or None."""
    info = runfiles.read_json(nodes_dir(job) / STOP_FILE) or {}
    at, rank = info.get("at"), info.get("machine_rank")
    if not runfiles.is_number(at) or at < since or rank == job.launch.machine_rank:
        return None
    return f"machine rank {rank}: {str(info.get('cause', 'stop'))[:200]}"
