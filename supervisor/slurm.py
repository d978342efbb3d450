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
requeued job resumes from that checkpoint when Slurm starts it again. A SIGTERM (scancel, the
time limit itself, preemption) saves too but never requeues: it may be a person's cancel.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping

from supervisor.config import JobConfig, JobConfigError
from supervisor.events import EventLog
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
    problem = requeue(job_id)
    if problem:
        log.error("Slurm job %s: scontrol requeue failed (%s): submit the job again to resume", job_id, problem)
    else:
        log.info("Slurm job %s requeued: it resumes from the checkpoint when Slurm starts it again", job_id)
    EventLog(job.paths.events).append("slurm_requeue", time.time(), job_id=job_id, error=problem or None)


def signal_lead_s(costs: Mapping[str, object] | None) -> int:
    """Seconds before the time limit for the warning: Slurm's resolution plus what a stop costs
    (1.5 x the recorded save time and a step, plus the exit), else DEFAULT_STOP_S."""
    stop_s = float(DEFAULT_STOP_S)
    if costs:
        save_s, step_s = costs.get("save_s"), costs.get("step_s")
        if isinstance(save_s, (int, float)) and save_s >= 0:
            stop_s = 1.5 * save_s + (step_s if isinstance(step_s, (int, float)) and step_s >= 0 else 0) + 10
    return SIGNAL_RESOLUTION_S + int(math.ceil(max(stop_s, 10)))


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
