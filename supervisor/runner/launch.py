"""Spawning `accelerate launch` children, and the process plumbing around them.

The one module of the supervisor that starts, signals and reaps processes.

Why it looks like this (facts.md):
- The child gets its own session (so Ctrl-C on the terminal reaches only the supervisor,
  which then asks the ranks to save) and default signal dispositions with nothing
  blocked (a child of a non-interactive shell job would otherwise inherit "ignore SIGINT").
- A multi-rank launcher gets PR_SET_PDEATHSIG(SIGTERM): if the supervisor dies, even by
  SIGKILL, it forwards SIGTERM to every rank (ranks save and exit) and SIGKILLs them only
  after PET_SHUTDOWN_TIMEOUT (set above grace + kill_after). The 1-process launcher
  (accelerate 1.16) would SIGKILL its rank 5 s after a SIGTERM, cutting a longer save
  short, so it gets no death signal: its rank watches TRAINSUP_SUPERVISOR_PID, saves and
  exits on its own, and gives up after TRAINSUP_STOP_WINDOW_S (grace + kill_after).
- The supervisor is a child subreaper: ranks orphaned by a dying launcher are re-parented
  to it, so they stay visible (and killable) as its descendants and are reaped here.
- The 1-process launcher does not forward SIGUSR1 and the multi-rank one does not either:
  the save request goes straight to the rank PIDs.
- Child output goes to logs/attempt-N.log through a file descriptor, never a pipe: ranks
  keep writing (and saving) if the supervisor dies, with no EPIPE.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import psutil

from supervisor import rundir
from supervisor.config import JobConfig
from train_core import runfiles
from train_core.contract import outlast_stop_s, pid_alive, stop_window_s

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# Reset to SIG_DFL in the child: everything a parent (or a shell job) may have changed.
_RESET_SIGNALS = tuple(
    s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGQUIT, signal.SIGPIPE, signal.SIGCHLD, signal.SIGALRM, signal.SIGTSTP,
                signal.SIGTTIN, signal.SIGTTOU, signal.SIGXFSZ)
)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - not Linux
        return None


_LIBC = _libc()


def set_child_subreaper() -> bool:
    """Make this process adopt orphaned descendants (Linux >= 3.4). False when unsupported."""
    if _LIBC is None or not sys.platform.startswith("linux"):
        return False
    if _LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def _child_preexec(parent_pid: int, death_signal: bool) -> None:
    """Runs in the forked child before exec: only async-signal-safe-ish, allocation-light work."""
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    if _LIBC is not None and death_signal:
        _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:  # the supervisor died between fork and prctl
        os._exit(1)


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


def build_launch(job: JobConfig, *, attempt: int, resume_from: Path | None, supervisor_pid: int,
                 base_env: Mapping[str, str], port: int | None = None,
                 attempt_env: Mapping[str, str] | None = None) -> LaunchPlan:
    """The command line and environment of one attempt (pure apart from its arguments).

    `attempt_env` is what the supervisor decided for this attempt (the OOM back-off's
    TRAINSUP_MICRO_BATCH/GRAD_ACCUM): it wins over [train] env, which would otherwise undo it.
    """
    lc = job.launch
    paths = runfiles.RunPaths(job.run_dir)
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
    if job.group_shared:
        env[runfiles.ENV_GROUP_SHARED] = "1"
    else:
        env.pop(runfiles.ENV_GROUP_SHARED, None)
    if job.checkpoint.interval_steps:
        env[runfiles.ENV_CHECKPOINT_INTERVAL_STEPS] = str(job.checkpoint.interval_steps)
    if resume_from is not None:
        env[runfiles.ENV_RESUME_FROM] = str(resume_from)
    else:
        env.pop(runfiles.ENV_RESUME_FROM, None)
    # The elastic agent SIGKILLs ranks this long after forwarding SIGTERM: keep it above
    # our own grace + kill window so it never cuts a save short that we would have allowed.
    shutdown_s = str(int(outlast_stop_s(job.stop.grace_s, job.stop.kill_after_s)))
    env["PET_SHUTDOWN_TIMEOUT"] = shutdown_s
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = shutdown_s

    script = [str(job.train.script), *job.train.args]
    if lc.launcher == "python":
        return LaunchPlan((sys.executable, "-u", *script), env, 1)

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
        # facts.md: `--cpu --num_processes 2` silently starts ONE process; this is the recipe
        # for N CPU ranks that really talk (gloo).
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
            threads = env.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // (nproc or 1)))
            argv += ["--num_cpu_threads_per_process", threads]
    if lc.main_process_ip:
        argv += ["--main_process_ip", lc.main_process_ip]
    if multi:
        chosen = lc.main_process_port or port
        if chosen:
            argv += ["--main_process_port", str(chosen)]
        # torch elastic prefixes each line with "[rankN]:" when tee'ing (rank prefix in the log)
        argv += ["--tee", "3", "--role", "rank", "--log_dir", str(paths.logs / f"attempt-{attempt}-ranks")]
    argv += list(lc.extra_args)
    argv += script
    return LaunchPlan(tuple(argv), env, nproc or 1, death_signal=multi)


@dataclass
class Child:
    """A running launcher: its pid (= its process group id and session id) and log file."""

    pid: int
    log_path: Path
    popen: subprocess.Popen
    status: int | None = None  # raw wait status once reaped

    @property
    def exited(self) -> bool:
        return self.status is not None


def spawn(plan: LaunchPlan, log_path: Path, *, cwd: Path | None = None,
          paths: runfiles.RunPaths | None = None) -> Child:
    """Start the launcher. With `paths`, it holds a shared flock on ranks/alive.lock for its
    whole life (passed down, taken before it runs): a supervisor that comes after a SIGKILLed
    one sees the old launcher and ranks and waits for them (rundir.wait_for_old_ranks)."""
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = rundir.open_nofollow(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    alive = runfiles.hold_alive_lock(paths) if paths is not None else -1
    try:
        with open(fd, "ab", buffering=0) as logf:
            popen = subprocess.Popen(
                plan.argv,
                env=dict(plan.env),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,  # own session + process group: pid == pgid == sid
                preexec_fn=lambda parent=os.getpid(), death=plan.death_signal: _child_preexec(parent, death),
                close_fds=True,
                pass_fds=(alive,) if alive >= 0 else (),
            )
    finally:
        if alive >= 0:
            os.close(alive)  # the launcher's copy keeps the lock; ours must not outlive it
    return Child(pid=popen.pid, log_path=log_path, popen=popen)


def reap(children: Mapping[int, Child], *, subreaper: bool) -> list[int]:
    """Collect exit statuses without blocking: of our launchers, and (as a subreaper) of any
    orphan re-parented to us. Returns the pids reaped."""
    reaped: list[int] = []
    if subreaper:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reaped.append(pid)
            if pid in children:
                _record(children[pid], status)
    else:
        for child in children.values():
            if child.exited:
                continue
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = child.pid, 0
            if pid:
                reaped.append(pid)
                _record(child, status)
    return reaped


def _record(child: Child, status: int) -> None:
    child.status = status
    # Keep subprocess.Popen from waiting on a pid we already reaped.
    child.popen.returncode = os.waitstatus_to_exitcode(status)


def descendants() -> list[psutil.Process]:
    """Every live descendant of this process (orphans adopted as subreaper included)."""
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in procs if pid_alive(p.pid)]


def descendant_start_time(pid: int) -> float | None:
    """When `pid` started, if it is a live descendant of this process; None otherwise.

    A pid read from a file in the run dir is only a claim: a stale or planted rank file may
    name any process. Recording the start time at first sight and comparing it before each
    signal also guards against the pid being reused once the rank is gone."""
    me = os.getpid()
    try:
        proc = psutil.Process(pid)
        if not any(parent.pid == me for parent in proc.parents()) or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.Error:
        return None


def send_verified(pid: int, start_time: float, sig: int) -> bool:
    """Signal `pid` only while it is still the descendant that started at `start_time`."""
    if descendant_start_time(pid) != start_time:
        return False
    return send(pid, sig)


def descendant_groups() -> set[int]:
    """The process groups of this process's live descendants (never our own group): what an
    escalation signals, so no group outside the run is ever touched."""
    groups = set()
    for p in descendants():
        try:
            groups.add(os.getpgid(p.pid))
        except (ProcessLookupError, PermissionError):
            continue
    groups.discard(os.getpgrp())
    return groups


def send(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as e:  # pragma: no cover
        log.warning("cannot signal pid %d: %s", pid, e)
        return False


def send_group(pgid: int, sig: int) -> bool:
    if pgid <= 1 or pgid == os.getpgrp():
        return False  # never our own group (or init's)
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as e:  # pragma: no cover
        if e.errno != errno.EPERM:
            raise
        return False
