"""Two nodes vs one node with two ranks, side by side: a whole run and a stop of the toy job.

The toy (tests/scripts/toy_train.py, 60 steps) run by two `trainsup run` supervisors on this
host acting as two nodes (1 CPU rank each, gloo over loopback), and by one supervisor with 2
ranks, in one run, alternating.

    python bench/bench_nodes.py [--repeats 2]

Prints, per repeat: the whole run (supervisor start to every supervisor's exit 0), and a stop
(SIGTERM to one node's supervisor at step 10 until every supervisor exited 75).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from supervisor.runner.launch import free_port  # noqa: E402
from supervisor_helpers import finish, kill_run, read_json, start_supervisor, wait_for, write_job  # noqa: E402

TOY = REPO / "tests" / "scripts" / "toy_train.py"
ARGS = ["--steps", "60", "--eval-every", "0", "--sleep-s", "0.05"]


def step_of(status: Path) -> int:
    return (read_json(status) or {}).get("step") or 0


def two_nodes(root: Path, stop: bool) -> tuple[float, list[int]]:
    port, run_dir, sups = free_port(), root / "run", []
    for m in (0, 1):
        d = root / f"node{m}"
        d.mkdir(parents=True)
        job = write_job(d, ARGS, script=TOY, run_dir=run_dir, launch={
            "num_processes": 2, "num_machines": 2, "machine_rank": m, "main_process_ip": "127.0.0.1",
            "main_process_port": port})
        sups.append(start_supervisor(job, log=d / "sup.log"))
    t0 = time.monotonic()
    if stop:
        wait_for(lambda: step_of(run_dir / "nodes" / "node-1" / "status.json") >= 10, 120, "step 10")
        t0 = time.monotonic()
        os.kill(sups[1].pid, signal.SIGTERM)
    codes = [finish(s, 300) for s in sups]
    kill_run(run_dir)
    return time.monotonic() - t0, codes


def one_node(root: Path, stop: bool) -> tuple[float, list[int]]:
    root.mkdir(parents=True)
    sup = start_supervisor(write_job(root, ARGS, script=TOY, launch={"num_processes": 2}), log=root / "sup.log")
    t0 = time.monotonic()
    if stop:
        wait_for(lambda: step_of(root / "run" / "status.json") >= 10, 120, "step 10")
        t0 = time.monotonic()
        os.kill(sup.pid, signal.SIGTERM)
    code = finish(sup, 300)
    kill_run(root / "run")
    return time.monotonic() - t0, [code]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-nodes-") as tmp:
        for what, stop in (("whole run", False), ("a stop", True)):
            for i in range(args.repeats):
                (one_s, one_codes), (two_s, two_codes) = (one_node(Path(tmp) / f"{what}-{i}-one", stop),
                                                          two_nodes(Path(tmp) / f"{what}-{i}-two", stop))
                print(f"{what:9} one node {one_s:6.2f} s {one_codes}   two nodes {two_s:6.2f} s {two_codes}   "
                      f"ratio {two_s / one_s:.2f}x", flush=True)


if __name__ == "__main__":
    main()
