"""The process seam: the one place the supervisor starts, signals and reaps processes.

The runner talks to the OS only through a `ProcessTable` (spawn, reap, descendants, start
times, signal a pid or a process group). `OsProcesses` is the real one; tests drive the state
machine with a fake table (tests/fake_procs.py) and an injected clock, in milliseconds.

Why the real one looks like this (docs/platform.md, "Processes and signals"):
- The launcher gets its own session (so Ctrl-C on the terminal reaches only the supervisor,
  which then asks the ranks to save) and default signal dispositions with nothing blocked
  (a child of a non-interactive shell job would otherwise inherit "ignore SIGINT").
- A multi-rank launcher gets PR_SET_PDEATHSIG(SIGTERM): if the supervisor dies, even by
  SIGKILL, it forwards SIGTERM to every rank (ranks save and exit) and SIGKILLs them only
  after PET_SHUTDOWN_TIMEOUT (above the stop window). The 1-process launcher (accelerate
  1.16) would SIGKILL its rank 5 s after a SIGTERM, cutting a longer save short, so it gets
  no death signal: its rank watches TRAINSUP_SUPERVISOR_PID, saves and exits on its own,
  and gives up after TRAINSUP_STOP_WINDOW_S.
- The supervisor is a child subreaper: ranks orphaned by a dying launcher are re-parented to
  it, so they stay visible (and killable) as its descendants and are reaped here.
- Child output goes to logs/attempt-N.log through a file descriptor, never a pipe: ranks
  keep writing (and saving) if the supervisor dies, with no EPIPE.
- A standby (`prepare`): for one directly started rank, a `python -m train_core.standby`
  imports torch and accelerate (at nice 19, its autogroup too, once an attempt has trained 60 s,
  else while one ends for a restart); the next `spawn` of a compatible plan hands it the attempt
  instead of starting a cold process. None while the run waits (power, heat, shutdown). It is no
  descendant of any attempt (`descendants`, `groups` leave it out) until it is used; its
  stdin is a pipe from the supervisor, so it ends when the supervisor does.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import json
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Protocol

import psutil

from supervisor import rundir
from supervisor.runner.launch import LaunchPlan
from train_core import runfiles
from train_core.contract import pid_alive

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


# Ignored in the child until a rank's TrainSession installs its handler: a save request that
# reaches every process before that (Slurm's --signal warning signals all of a step's processes,
# and may come in the first second) must not kill a launcher or a rank still importing torch;
# the rank reads the stop from control.json when it starts.
_IGNORED_UNTIL_HANDLED = (signal.SIGUSR1, signal.SIGUSR2)


def _child_preexec(parent_pid: int, death_signal: bool) -> None:
    """Runs in the forked child before exec: only async-signal-safe-ish, allocation-light work."""
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_IGN if sig in _IGNORED_UNTIL_HANDLED else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    if _LIBC is not None and death_signal:
        _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:  # the supervisor died between fork and prctl
        os._exit(1)


@dataclass
class Child:
    """A running launcher: its pid (= its process group id and session id) and log file."""

    pid: int
    log_path: Path
    popen: Any = None  # subprocess.Popen of a real child
    status: int | None = None  # raw wait status once reaped
    from_standby: bool = False  # a standby was handed this attempt (it imported torch beforehand)

    @property
    def exited(self) -> bool:
        return self.status is not None


def spawn(plan: LaunchPlan, log_path: Path, *, cwd: Path | None = None,
          paths: runfiles.RunPaths | None = None, stdin: int = subprocess.DEVNULL) -> Child:
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
                stdin=stdin,
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
    if child.popen is not None:  # keep subprocess.Popen from waiting on a pid we already reaped
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


class ProcessTable(Protocol):
    """What the runner needs from the OS. Pids are plain ints; a "descendant" is any live
    (non-zombie) process below the supervisor, orphans it adopted as subreaper included."""

    def spawn(self, plan: LaunchPlan, log_path: Path, *, cwd: Path | None,
              paths: runfiles.RunPaths | None) -> Child: ...

    def reap(self, children: Mapping[int, Child]) -> None: ...

    def descendants(self) -> list[int]: ...

    def start_time(self, pid: int) -> float | None: ...

    def signal(self, pid: int, sig: int) -> bool: ...

    def signal_group(self, pgid: int, sig: int) -> bool: ...

    def groups(self) -> set[int]: ...

    def prepare(self, plan: LaunchPlan, *, cwd: Path | None, paths: runfiles.RunPaths, idle: bool = False) -> None:
        """An attempt like `plan` may come next: get ready for it (a standby), if possible;
        `idle`: while an attempt trains, at the lowest CPU priority."""

    def discard_standby(self) -> None: ...


STANDBY_NICE = 19  # a standby started while an attempt trains imports at this priority (its autogroup too)


def can_restore_priority() -> bool:
    """Whether a process may go back from STANDBY_NICE to our nice value (root, or RLIMIT_NICE)."""
    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20 - os.getpriority(
        os.PRIO_PROCESS, 0)


def _static_env(env: Mapping[str, str]) -> dict[str, str]:
    """What a standby's interpreter and imports may already have read: all but TRAINSUP_*."""
    return {k: v for k, v in env.items() if not k.startswith("TRAINSUP_")}


class OsProcesses:
    """The real ProcessTable: today's Linux plumbing, below."""

    def __init__(self, *, subreaper: bool = False) -> None:
        self.subreaper = subreaper
        self.standby: tuple[Child, LaunchPlan, Path | None] | None = None  # (child, plan, cwd)

    def spawn(self, plan: LaunchPlan, log_path: Path, *, cwd: Path | None = None,
              paths: runfiles.RunPaths | None = None) -> Child:
        child = self._take_standby(plan, log_path, cwd)
        return child if child is not None else spawn(plan, log_path, cwd=cwd, paths=paths)

    def prepare(self, plan: LaunchPlan, *, cwd: Path | None, paths: runfiles.RunPaths, idle: bool = False) -> None:
        if not plan.script_argv or (self.standby is not None and not self.standby[0].exited):
            return
        env = dict(plan.env, TRAINSUP_STANDBY_NICE=str(STANDBY_NICE)) if idle else plan.env
        standby = replace(plan, argv=(plan.argv[0], "-m", "train_core.standby"), env=env)
        child = spawn(standby, paths.logs / "standby.log", cwd=cwd, paths=paths, stdin=subprocess.PIPE)
        self.standby = (child, plan, cwd)
        log.info("standby rank started (pid %d)", child.pid)

    def _take_standby(self, plan: LaunchPlan, log_path: Path, cwd: Path | None) -> Child | None:
        if self.standby is None:
            return None
        child, ready_for, ready_cwd = self.standby
        if (child.exited or not plan.script_argv or plan.argv[0] != ready_for.argv[0] or cwd != ready_cwd
                or _static_env(plan.env) != _static_env(ready_for.env)):
            self.discard_standby()  # the next attempt differs from what it was started for
            return None
        self.standby = None
        order = {"argv": list(plan.script_argv), "env": dict(plan.env), "log": str(log_path),
                 "cwd": str(cwd or os.getcwd())}
        try:
            child.popen.stdin.write((json.dumps(order) + "\n").encode())
            child.popen.stdin.close()
        except OSError as e:  # it died meanwhile: start cold
            log.warning("standby rank (pid %d) could not take the attempt: %s", child.pid, e)
            _discard(child)
            return None
        return replace(child, log_path=log_path, from_standby=True)

    def discard_standby(self) -> None:
        if self.standby is not None:
            _discard(self.standby[0])
            self.standby = None

    def reap(self, children: Mapping[int, Child]) -> None:
        if self.standby is not None:
            children = {**children, self.standby[0].pid: self.standby[0]}
        reap(children, subreaper=self.subreaper)

    def descendants(self) -> list[int]:
        idle = self.standby[0].pid if self.standby is not None else None
        return [p.pid for p in descendants() if p.pid != idle]

    def start_time(self, pid: int) -> float | None:
        return descendant_start_time(pid)

    def signal(self, pid: int, sig: int) -> bool:
        return send(pid, sig)

    def signal_group(self, pgid: int, sig: int) -> bool:
        return send_group(pgid, sig)

    def groups(self) -> set[int]:
        groups = descendant_groups()
        if self.standby is not None:
            groups.discard(self.standby[0].pid)  # its own session: pgid == pid
        return groups


def _discard(child: Child) -> None:
    """End an unused standby: it holds nothing but imports."""
    try:
        if child.popen.stdin and not child.popen.stdin.closed:
            child.popen.stdin.close()
    except OSError:
        pass
    if not child.exited:
        send(child.pid, signal.SIGKILL)
        try:
            child.popen.wait(timeout=5)
        except (subprocess.TimeoutExpired, ChildProcessError):
            pass
