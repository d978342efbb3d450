"""What one attempt runs: the `accelerate launch` command line and environment (pure).

One process on one machine, with nothing for accelerate's config machinery to read (no
config_file, no extra_args), is started directly: `python script` with the environment that
`accelerate launch` gives its one rank (`launch_env`). The launcher would only import torch
before the rank does and tear it down after (~1.1 s per start, ~0.4 s per exit on 2 cores);
`[launch] direct = false` keeps it. Starting, signalling and reaping is supervisor.runner.procs' job.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from supervisor.config import JobConfig
from train_core import runfiles
from supervisor.runner.budget import stop_budget_s
from train_core.contract import outlast_stop_s, stop_window_s

log = logging.getLogger(__name__)

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LaunchPlan:
    argv: tuple[str, ...]
    env: Mapping[str, str]
    world_size_local: int  # ranks this launcher starts
    death_signal: bool = True  # PR_SET_PDEATHSIG(SIGTERM) on the launcher (see the module doc)
    launcher_is_rank: bool = False  # the child is rank 0 itself (no accelerate launcher between)
    script_argv: tuple[str, ...] = ()  # (script, *args) when the child is `python script`: a standby can run it


def needs_port(job: JobConfig) -> bool:
    """Several ranks rendezvous on a TCP port: the supervisor picks a free one per attempt (on
    several machines the job names it: every node must use the same)."""
    lc = job.launch
    return lc.launcher == "accelerate" and ((lc.num_processes or 1) > 1 or lc.num_machines > 1)


def build_launch(job: JobConfig, *, attempt: int, resume_from: Path | None, supervisor_pid: int,
                 base_env: Mapping[str, str], port: int | None = None,
                 attempt_env: Mapping[str, str] | None = None) -> LaunchPlan:
    """The command line and environment of one attempt (pure apart from its arguments).

    `attempt_env` is what the supervisor decided for this attempt (the OOM back-off's
    TRAINSUP_MICRO_BATCH/GRAD_ACCUM): it wins over [train] env, which would otherwise undo it.
    """
    if job.launch.mixed_precision == "auto":  # accelerate knows no "auto": the Runner resolves it at start
        raise ValueError('[launch] mixed_precision = "auto" must be resolved first (supervisor.precision.resolve)')
    env = attempt_environment(job, attempt=attempt, resume_from=resume_from, supervisor_pid=supervisor_pid,
                              base_env=base_env, attempt_env=attempt_env)
    script = [str(job.train.script), *job.train.args]
    if job.launch.launcher == "python":
        return LaunchPlan((sys.executable, "-u", *script), env, 1, launcher_is_rank=True, script_argv=tuple(script))
    if starts_directly(job):
        env.update(launch_env(job, env))
        # no death signal, as with the 1-process launcher: the rank's watcher sees the supervisor go
        return LaunchPlan((sys.executable, *script), env, 1, death_signal=False, launcher_is_rank=True,
                          script_argv=tuple(script))
    argv, nproc, multi = _accelerate_argv(job, env, attempt=attempt, port=port)
    return LaunchPlan((*argv, *script), env, nproc, death_signal=multi)


def starts_directly(job: JobConfig) -> bool:
    """One rank on one machine, nothing that only accelerate can interpret: no launcher."""
    lc = job.launch
    return (lc.launcher == "accelerate" and lc.direct and lc.num_machines == 1 and (lc.num_processes or 1) == 1
            and lc.config_file is None and not lc.extra_args)


def launch_env(job: JobConfig, env: Mapping[str, str]) -> dict[str, str]:
    """What `accelerate launch --num_processes 1` (its simple launcher, accelerate 1.16) adds
    to one rank's environment for this job; tests/test_launch_direct.py checks it against
    accelerate's own prepare_simple_launcher_cmd_env, so a new accelerate that changes it fails there."""
    lc = job.launch
    out = {
        "ACCELERATE_USE_CPU": str(lc.cpu),
        "ACCELERATE_MIXED_PRECISION": lc.mixed_precision or "no",
        "ACCELERATE_DYNAMO_BACKEND": "NO",
        "ACCELERATE_DYNAMO_MODE": "default",
        "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
        "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False",
        "OMP_NUM_THREADS": _cpu_threads(env, 1) if lc.cpu else env.get("OMP_NUM_THREADS") or "1",
    }
    if lc.cpu:
        out.update(KMP_AFFINITY="granularity=fine,compact,1,0", KMP_BLOCKTIME="1")
    return out


def _cpu_threads(env: Mapping[str, str], nproc: int) -> str:
    """--num_cpu_threads_per_process: the job's OMP_NUM_THREADS, else the cores split over the ranks."""
    return env.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))


def attempt_environment(job: JobConfig, *, attempt: int, resume_from: Path | None, supervisor_pid: int,
                        base_env: Mapping[str, str], attempt_env: Mapping[str, str] | None) -> dict[str, str]:
    """The ranks' environment: the caller's, [train] env, the attempt's, and the contract's
    TRAINSUP_* variables (docs/contract.md)."""
    paths = job.paths
    env = dict(base_env)
    env.update(job.train.env)
    env.update(attempt_env or {})
    env.setdefault("PYTHONUNBUFFERED", "1")  # rank output reaches the attempt log as it happens
    # CUDA numbers GPUs fastest-first by default, NVML by PCI bus: the same order makes the GPU
    # watch read the GPUs the job really uses (CUDA_VISIBLE_DEVICES=1 means the same card to both).
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env[runfiles.ENV_RUN_DIR] = str(job.run_dir)
    env[runfiles.ENV_CHECKPOINT_DIR] = str(paths.checkpoints)
    env[runfiles.ENV_ATTEMPT] = str(attempt)
    env.setdefault(runfiles.ENV_SAVE_SIGNAL, "SIGUSR1")
    env[runfiles.ENV_SUPERVISOR_PID] = str(supervisor_pid)
    env[runfiles.ENV_STOP_WINDOW_S] = str(stop_window_s(job.stop.grace_s, job.stop.kill_after_s))
    env[runfiles.ENV_STOP_BUDGET_S] = str(stop_budget_s(job))
    env.pop(runfiles.ENV_MACHINE_RANK, None)
    if job.node is not None:
        env[runfiles.ENV_MACHINE_RANK] = str(job.node)
    env.pop(runfiles.ENV_GROUP_SHARED, None)
    if job.group_shared:
        env[runfiles.ENV_GROUP_SHARED] = "1"
    if job.checkpoint.interval_steps:
        env[runfiles.ENV_CHECKPOINT_INTERVAL_STEPS] = str(job.checkpoint.interval_steps)
    env.pop(runfiles.ENV_BACKGROUND_SAVES, None)
    if job.checkpoint.background is not None:
        env[runfiles.ENV_BACKGROUND_SAVES] = "1" if job.checkpoint.background else "0"
    env.pop(runfiles.ENV_RESUME_FROM, None)
    if resume_from is not None:
        env[runfiles.ENV_RESUME_FROM] = str(resume_from)
    # The elastic agent SIGKILLs ranks this long after forwarding SIGTERM: keep it above
    # our own stop window so it never cuts a save short that we would have allowed.
    shutdown_s = str(int(outlast_stop_s(job.stop.grace_s, job.stop.kill_after_s)))
    env["PET_SHUTDOWN_TIMEOUT"] = shutdown_s
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = shutdown_s
    return env


def _accelerate_argv(job: JobConfig, env: dict[str, str], *, attempt: int,
                     port: int | None) -> tuple[list[str], int, bool]:
    """(`accelerate launch` argv without the script, ranks it starts, several ranks?). May set
    ACCELERATE_USE_CPU in `env`."""
    lc = job.launch
    # --quiet: no launcher traceback repeating a rank's failure (a rank exiting 75 after a save
    # would otherwise print a CalledProcessError); the rank's own output and exit report stay.
    argv: list[str] = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    use_config = lc.config_file is not None
    if use_config:
        argv += ["--config_file", str(lc.config_file)]
    nproc = lc.num_processes if lc.num_processes is not None else (None if use_config else 1)
    mp = lc.mixed_precision if lc.mixed_precision is not None else (None if use_config else "no")
    multi = (nproc or 1) > 1 or lc.num_machines > 1
    if lc.cpu and multi:
        # docs/platform.md: `--cpu --num_processes 2` silently starts ONE process; this is the
        # recipe for N CPU ranks that really talk (gloo).
        env["ACCELERATE_USE_CPU"] = "1"
        argv += ["--multi_gpu"]
        mp = "no" if mp is None else mp
    elif lc.cpu:
        argv += ["--cpu"]
    elif multi and not use_config:
        argv += ["--multi_gpu"]
    if nproc is not None:
        argv += ["--num_processes", str(nproc)]
    if not use_config or lc.num_machines != 1:
        argv += ["--num_machines", str(lc.num_machines)]
    if lc.num_machines > 1:
        argv += ["--machine_rank", str(lc.machine_rank)]
    if mp is not None:
        argv += ["--mixed_precision", mp]
    if not use_config:
        argv += ["--dynamo_backend", "no"]
        if lc.cpu:
            argv += ["--num_cpu_threads_per_process", _cpu_threads(env, nproc or 1)]
    if lc.main_process_ip:
        argv += ["--main_process_ip", lc.main_process_ip]
    if multi:
        if lc.main_process_port or port:
            argv += ["--main_process_port", str(lc.main_process_port or port)]
        # torch elastic prefixes each line with "[rankN]:" when tee'ing (rank prefix in the log)
        argv += ["--tee", "3", "--role", "rank", "--log_dir",
                 str(job.paths.logs / f"attempt-{attempt}-ranks")]
    # accelerate's --num_processes counts the ranks of every machine; this launcher starts its share
    return argv + list(lc.extra_args), (nproc or 1) // lc.num_machines, multi
