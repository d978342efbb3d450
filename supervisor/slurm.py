"""SLURM: `trainsup run` inside an allocation, requeue after a saved stop, and the sbatch script
`trainsup slurm script` prints (torch-free).

Inside an allocation (SLURM_JOB_ID set) the job's launch settings that it leaves unset come
from Slurm: num_machines = SLURM_NNODES, machine_rank = SLURM_NODEID, main_process_ip = the
first host of SLURM_JOB_NODELIST (`scontrol show hostnames`), main_process_port = derived
from the job id, the same on every node. One `trainsup run` per node: the script runs it
with `srun --ntasks-per-node=1`.

Slurm's warning signal (`--signal=USR1@LEAD`, sent to every step's tasks LEAD seconds, give
or take Slurm's 60-s resolution, before the time limit) is a save request like any stop
signal; with `[slurm] requeue = true` machine rank 0 then runs `scontrol requeue`, and the
requeued job resumes from that checkpoint when Slurm starts it again. When the warning has not
come by the time limit minus a stop's cost (a job submitted without --signal, or a warning sent
before the step's processes existed), the supervisor sends it to itself (TimeLimitWatch). A
SIGTERM (scancel, the time limit itself, preemption) saves too but never requeues: it may be a
person's cancel.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

from supervisor.config import JobConfig, JobConfigError
from supervisor.events import EventLog
from train_core import costs as costing
from train_core.contract import EXIT_SAVED

log = logging.getLogger(__name__)

WARNING_SIGNAL = signal.SIGUSR1
SIGNAL_RESOLUTION_S = 60  # Slurm checks time limits about once a minute: a warning may come this much early
DEFAULT_STOP_S = 30  # a stop's save and exit when the run dir has no measured save time yet
PORT_BASE, PORT_SPAN = 20000, 20000


@dataclasses.dataclass(frozen=True)
class Allocation:
    job_id: str
    nnodes: int
    node_id: int
    nodelist: str


def allocation(env: Mapping[str, str]) -> Allocation | None:
    """The Slurm allocation this process runs in, or None (not under Slurm)."""
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return None
    try:
        nnodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
        node_id = int(env.get("SLURM_NODEID") or 0)
    except ValueError:
        raise JobConfigError(f"SLURM_NNODES={env.get('SLURM_NNODES')!r} / SLURM_NODEID={env.get('SLURM_NODEID')!r} "
                             "are not numbers: run trainsup inside an sbatch/srun allocation") from None
    return Allocation(job_id, nnodes, node_id, env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("gpu[03-05,07],cpu1" -> "gpu03"): scontrol's own
    expansion, else the list's first entry expanded by hand."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
    if not m:
        raise JobConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot tell the first host; set [launch] "
                             "main_process_ip")
    return m.group(1) + (m.group(2) or "")


def apply(job: JobConfig, env: Mapping[str, str]) -> JobConfig:
    """`job` with the launch settings it leaves unset taken from the Slurm allocation (if any)."""
    alloc = allocation(env)
    if alloc is None or alloc.nnodes <= 1:
        return job
    lc = job.launch
    if lc.num_machines not in (1, alloc.nnodes):
        raise JobConfigError(f"[launch] num_machines = {lc.num_machines} but the Slurm allocation has "
                             f"{alloc.nnodes} nodes (SLURM_NNODES): leave num_machines out, or submit with "
                             f"--nodes {lc.num_machines}")
    nproc = lc.num_processes if lc.num_processes is not None else alloc.nnodes
    if nproc % alloc.nnodes:
        raise JobConfigError(f"[launch] num_processes = {nproc} counts the ranks of all {alloc.nnodes} nodes: it "
                             "must be a multiple of the node count (or leave it out: one rank per node)")
    launch = dataclasses.replace(
        lc, num_machines=alloc.nnodes, machine_rank=alloc.node_id, num_processes=nproc,
        main_process_ip=lc.main_process_ip or first_host(alloc.nodelist),
        main_process_port=lc.main_process_port or PORT_BASE + int(re.sub(r"\D", "", alloc.job_id) or 0) % PORT_SPAN)
    log.info("Slurm job %s: node %d of %d, rank 0 at %s:%d", alloc.job_id, alloc.node_id, alloc.nnodes,
             launch.main_process_ip, launch.main_process_port)
    return dataclasses.replace(job, launch=launch)


def should_requeue(job: JobConfig, env: Mapping[str, str], *, exit_code: int, stop_signal: int | None) -> bool:
    """After a saved stop on Slurm's warning signal, with [slurm] requeue, on machine rank 0."""
    alloc = allocation(env)
    return (alloc is not None and job.slurm.requeue and exit_code == EXIT_SAVED and stop_signal == WARNING_SIGNAL
            and alloc.node_id == 0)


def requeue(job_id: str) -> str:
    """`scontrol requeue` the job: "" when done, else why not."""
    try:
        subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=30, check=True)
    except subprocess.CalledProcessError as e:
        return (e.stderr or e.stdout or f"exit {e.returncode}").strip()
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    return ""


def requeue_and_record(job: JobConfig, env: Mapping[str, str]) -> None:
    """requeue() this allocation's job, said in the supervisor's output and recorded in events.jsonl."""
    job_id = allocation(env).job_id
    # the requeue ends this job step, and Slurm's SIGTERM to it may come before the record is
    # written: nothing is left to stop (the checkpoint is committed, the ranks are gone)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    problem = requeue(job_id)
    if problem:
        log.error("Slurm job %s: scontrol requeue failed (%s): submit the job again to resume", job_id, problem)
    else:
        log.info("Slurm job %s requeued: it resumes from the checkpoint when Slurm starts it again", job_id)
    record(job.paths.events, "slurm_requeue", job_id=job_id, error=problem or None)


def record(events: Path, name: str, **fields: object) -> None:
    """One line in events.jsonl from outside the run loop (the loop's own log is closed, or busy in
    another thread: each line is one O_APPEND write)."""
    log_ = EventLog(events)
    try:
        log_.append(name, time.time(), **fields)
    finally:
        log_.close()


def stop_cost_s(costs: costing.Costs) -> int:
    """Seconds a stop takes: 1.5 x the recorded save time and a step, plus the exit (10 s);
    DEFAULT_STOP_S when the run dir has no save time recorded."""
    if costs.save_s is None:
        return DEFAULT_STOP_S
    return int(math.ceil(1.5 * costs.save_s + (costs.step_s or 0.0) + 10))


def signal_lead_s(costs: costing.Costs) -> int:
    """Seconds before the time limit for the warning: Slurm's resolution plus a stop's cost."""
    return SIGNAL_RESOLUTION_S + stop_cost_s(costs)


def end_time(job_id: str) -> float | None:
    """When the job's time limit ends it (squeue's end time, this host's local time, as a Unix
    time), or None: no limit, or no answer from Slurm."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        return datetime.datetime.fromisoformat(out).timestamp()
    except (OSError, subprocess.SubprocessError, ValueError):  # "NONE", "Unknown", no squeue
        return None


class TimeLimitWatch:
    """The warning, sent by the supervisor to itself when Slurm's does not come.

    Slurm's can miss: a job submitted without --signal, or a warning that came before the
    step's processes existed (Slurm sends it once and up to a minute early, so in a short job it
    can fall in the first second). So each supervisor in an allocation with a time limit sends
    itself WARNING_SIGNAL at the limit minus what a stop costs, unless a stop began before: the
    same save, and the same requeue, as Slurm's own warning. The costs are read again every
    minute (a measured save time moves the moment), the limit once more when the moment comes
    (`scontrol update TimeLimit=` may have moved it).
    """

    def __init__(self, job_id: str, costs: Callable[[], costing.Costs], *,
                 stopping: Callable[[], bool], events: Path, query: Callable[[str], float | None] = end_time,
                 wall_clock: Callable[[], float] = time.time,
                 send: Callable[[], None] = lambda: os.kill(os.getpid(), WARNING_SIGNAL)) -> None:
        self.job_id, self.costs, self.stopping, self.events = job_id, costs, stopping, events
        self.query, self.wall_clock, self.send = query, wall_clock, send
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="slurm-time-limit", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        end = self.query(self.job_id)
        if end is None:
            return
        lead = stop_cost_s(self.costs())
        log.info("Slurm job %s ends at %s: trainsup saves %d s before unless Slurm's warning comes first",
                 self.job_id, time.strftime("%H:%M:%S", time.localtime(end)), lead)
        while True:
            wait_s = end - lead - self.wall_clock()
            if wait_s > 0:
                if self._cancel.wait(min(wait_s, 60)):
                    return
                lead = stop_cost_s(self.costs())
                continue
            later = self.query(self.job_id)
            if later is not None and later > end:
                end = later  # the limit was extended
                continue
            if self.stopping() or self._cancel.is_set():
                return
            left = end - self.wall_clock()
            log.warning("Slurm job %s: %.0f s to its time limit and no warning signal came: saving now", self.job_id,
                        left)
            record(self.events, "slurm_time_limit", job_id=self.job_id, seconds_left=round(left, 1), lead_s=lead)
            self.send()
            return


def time_limit_watch(job: JobConfig, env: Mapping[str, str], stopping: Callable[[], bool]) -> TimeLimitWatch | None:
    """A started TimeLimitWatch for this allocation, or None outside Slurm."""
    alloc = allocation(env)
    if alloc is None:
        return None
    watch = TimeLimitWatch(alloc.job_id, lambda: costing.load(job.paths.costs), stopping=stopping,
                           events=job.paths.events)
    watch.start()
    return watch


def script(job_file: Path, *, job: JobConfig, nodes: int, time_min: int, run_dir: Path | None,
           overrides: tuple[str, ...], lead_s: int, lead_from: str, trainsup: str = "trainsup") -> str:
    """An sbatch script for `job_file`: one `trainsup run` per node under srun, the warning
    signal `lead_s` before the time limit, requeue allowed."""
    cmd = [trainsup, "run", str(job_file.resolve())]
    if run_dir is not None:
        cmd += ["--run-dir", str(run_dir.resolve())]
    for o in overrides:
        cmd += ["--set", o]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", (run_dir or job.run_dir).name)[:40] or "trainsup"
    return "\n".join([
        "#!/bin/bash",
        f"# written by `trainsup slurm script` for {job_file.name}; submit: sbatch THIS_FILE",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1          # one supervisor per node; it starts that node's ranks",
        "#SBATCH --exclusive",
        f"#SBATCH --time={time_min}",
        f"#SBATCH --signal=USR1@{lead_s:<20d}# the warning: a save request ({lead_from})",
        "#SBATCH --requeue                    # a saved stop requeues the job ([slurm] requeue = true)",
        "#SBATCH --open-mode=append           # a requeued job appends to its slurm-JOBID.out",
        "",
        "# trainsup reads SLURM_NNODES, SLURM_NODEID and the node list: the job file needs no addresses",
        "srun --kill-on-bad-exit=0 " + " ".join(shlex.quote(c) for c in cmd) + " --set slurm.requeue=true",
        "",
    ])
