"""One attempt: the launcher and its ranks, how they are asked to stop and escalated, what
they report when they exit, and the tail of their log.

The stop sequence, used alike by the loop's STOPPING state and by an emergency teardown:
save requested (control.json + the save signal to each verified rank pid) -> after grace_s
SIGTERM to every process group of the run -> kill_after_s later SIGKILL to every group and
every descendant, repeated each second for processes forked since.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import Any

from supervisor.runner.launch import LaunchPlan
from supervisor.runner.procs import Child, ProcessTable
from train_core import contract, runfiles
from train_core.store import Checkpoint

log = logging.getLogger(__name__)

REKILL_S = 1.0  # after SIGKILL: signal again whatever still (or newly) runs this often


@dataclass
class Attempt:
    number: int
    child: Child
    plan: LaunchPlan
    started_at: float
    resume: Checkpoint | None
    newest_at_start: int  # newest valid step when it started (-1: none)
    heartbeat_seen_at: float | None = None
    heartbeat_stamp: Any = None
    heartbeat: dict[str, Any] | None = None
    max_step: int = -1
    stop_requested_at: float | None = None
    stop_cause: str = ""
    newest_at_stop: int = -1
    grace_deadline: float | None = None
    term_sent_at: float | None = None
    kill_sent_at: float | None = None
    hung: bool = False
    standby_asked: bool = False  # a standby for the next attempt was asked for while this one trains
    signalled: set[int] = field(default_factory=set)
    rank_pids: dict[int, int] = field(default_factory=dict)  # verified descendants only
    pid_started: dict[int, float] = field(default_factory=dict)  # pid -> start time when first verified
    refused_pids: set[int] = field(default_factory=set)  # named in a rank file, not of this run
    log_offset: int = 0
    log_partial: bytes = b""

    # -- ranks ----------------------------------------------------------------
    def find_ranks(self, paths: runfiles.RunPaths, procs: ProcessTable, *, launcher_is_rank: bool) -> dict[int, int]:
        """Rank -> pid from ranks/rank-R.json of this attempt, for pids that are our descendants.
        Their start time is recorded: a later signal checks it, so a reused pid is never hit."""
        for p in paths.ranks.glob("rank-*.json"):
            info = runfiles.read_json(p)
            if not (info and info.get("attempt") == self.number and isinstance(info.get("pid"), int)
                    and isinstance(info.get("rank", -1), int)):
                continue
            pid = info["pid"]
            if pid in self.pid_started or pid in self.refused_pids:
                continue
            # the accelerate launcher is ours but no rank: the save signal would kill it
            started = procs.start_time(pid) if launcher_is_rank or pid != self.child.pid else None
            if started is None:
                self.refused_pids.add(pid)
                log.warning("%s names pid %d, which is not a process of this run: ignored", p.name, pid)
                continue
            self.pid_started[pid] = started
            self.rank_pids[int(info.get("rank", -1))] = pid
        return self.rank_pids

    def signal_ranks(self, procs: ProcessTable, sig: int) -> None:
        """The save signal, once, to each verified rank (still the process first verified)."""
        for rank, pid in sorted(self.rank_pids.items()):
            if pid in self.signalled:
                continue
            self.signalled.add(pid)
            if procs.start_time(pid) == self.pid_started[pid] and procs.signal(pid, sig):
                log.info("sent %s to rank %d (pid %d)", signal.Signals(sig).name, rank, pid)

    def exit_reports(self, paths: runfiles.RunPaths) -> list[dict[str, Any]]:
        return contract.read_exit_reports(paths, self.number)

    def over(self, procs: ProcessTable) -> bool:
        return self.child.exited and not procs.descendants()

    # -- the stop sequence ----------------------------------------------------------
    def begin_stop(self, now: float, cause: str, *, grace_s: float, newest_step: int, hung: bool = False) -> None:
        self.stop_requested_at = now
        self.stop_cause = cause
        self.newest_at_stop = newest_step
        self.hung = self.hung or hung
        self.grace_deadline = now if self.hung else now + grace_s

    def due_signal(self, now: float, kill_after_s: float) -> int | None:
        """The escalation due at `now` once a stop was requested, or None."""
        if self.kill_sent_at is not None:
            return signal.SIGKILL if now - self.kill_sent_at > REKILL_S else None
        if self.term_sent_at is None:
            return signal.SIGTERM if self.grace_deadline is not None and now >= self.grace_deadline else None
        return signal.SIGKILL if now - self.term_sent_at >= kill_after_s else None

    def escalate(self, procs: ProcessTable, sig: int, now: float) -> list[int]:
        """`sig` to every process group of the run (the launcher's and each rank's, nothing
        else); a SIGKILL also to each descendant. Returns the groups signalled."""
        groups = sorted(procs.groups())
        for g in groups:
            procs.signal_group(g, sig)
        if sig == signal.SIGKILL:
            for pid in procs.descendants():
                procs.signal(pid, signal.SIGKILL)
            self.kill_sent_at = now
        else:
            self.term_sent_at = now
        return groups

    @property
    def killed(self) -> bool:
        return self.term_sent_at is not None or self.kill_sent_at is not None

    # -- output -----------------------------------------------------------------
    def new_output(self, *, final: bool = False) -> list[str]:
        """Whole lines the attempt wrote to its log since the last call (on `final`, the
        unterminated rest too), each with its "[rankN]:" prefix."""
        try:
            with open(self.child.log_path, "rb") as f:
                f.seek(self.log_offset)
                data = f.read(1 << 20)
        except FileNotFoundError:
            return []
        if not data and not (final and self.log_partial):
            return []
        self.log_offset += len(data)
        lines = (self.log_partial + data).split(b"\n")
        self.log_partial = lines.pop()
        if final and self.log_partial:
            lines.append(self.log_partial)
            self.log_partial = b""
        prefix = "[rank0]:" if self.plan.world_size_local == 1 else ""
        out = []
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            out.append(line if line.startswith("[rank") else prefix + line)
        return out
