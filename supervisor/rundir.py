"""The run dir as untrusted ground: who may write it, and who still runs in it.

Private by default: the supervisor sets umask 0077 (its ranks inherit it), makes the run dir
0700 and refuses one it cannot trust. Anyone who can write a run dir can plant a checkpoint
or write control.json, so a run dir, or anything in it, that is owned by another user or
writable by group/others is refused with exit 2 and the exact chmod/chown to run.
`group_shared = true` in the job file is the opt-in for a deliberately shared group dir
(e.g. a project dir on a cluster): group members may then write it and own files in it;
writable by others stays refused.

A rank holds a shared flock on ranks/alive.lock for its whole life (train_core.runfiles):
a supervisor SIGKILLed while its ranks save leaves job.lock free at once, and the next
`trainsup run` must not start a second set of ranks beside them. It waits for the lock
(the old ranks finish their save), or refuses, naming their pids.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from pathlib import Path

import filelock

from supervisor.errors import LockedError, UserError
from train_core import runfiles

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077
SHARED_UMASK = 0o007  # group_shared: the group may read and write, others nothing
# What trainsup keeps in a run dir: only these are checked (and tightened), so a run dir that
# also holds other things (`--run-dir .`) is neither refused nor changed because of them.
OWN_ENTRIES = ("checkpoints", "ranks", "logs", "control.json", "status.json", "supervisor.json", "events.jsonl",
               "job.lock", "job.lock.pid", "costs.json", "failures.json", "metrics.jsonl", "report.html", "report.png",
               "tensorboard", "nodes")


RUN_DIR_FIX = "use a dedicated directory such as runs/NAME"
RUN_DIR_WHY = f"a run dir is made private (mode 0700) and pruned: {RUN_DIR_FIX}"


def run_dir_path_problem(run_dir: Path) -> str | None:
    """Why `run_dir` must not be one (it would be disastrous to chmod 0700 and prune: /, ~, a
    file), as "PATH is ...; the fix"; None when it may be."""
    if "\x00" in str(run_dir):
        return f"{str(run_dir)!r} contains a NUL byte; {RUN_DIR_FIX}"
    real = run_dir.resolve()
    if real == Path(real.anchor):
        return f"{run_dir} is the root directory; {RUN_DIR_WHY}"
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError, OSError):  # no HOME and no passwd entry
        home = None
    if home is not None and real == home:
        return f"{run_dir} is your home directory; {RUN_DIR_WHY}"
    if home is not None and real in home.parents:
        return f"{run_dir} contains your home directory {home}; {RUN_DIR_WHY}"
    # The run dir, or the first part of it that exists, must be a directory (mkdir fails under a file).
    for p in (run_dir, *run_dir.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                kind = "a file, not a directory" if p.is_file() else "not a directory"
                what = "is" if p == run_dir else f"is inside {p}, which is"
                return f"{run_dir} {what} {kind}; {RUN_DIR_FIX}"
            break
    return None


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def secure_run_dir(run_dir: Path, *, group_shared: bool = False) -> list[str]:
    """Create `run_dir` private (0700), or check and tighten an existing one; returns notes for
    the log. Raises UserError (exit 2) naming the path and the fix when it cannot be trusted."""
    umask = SHARED_UMASK if group_shared else PRIVATE_UMASK
    os.umask(os.umask(umask) | umask)
    want = 0o770 if group_shared else 0o700
    try:  # no exists() check first: the nodes of a multi-node job create a shared run dir at once
        run_dir.mkdir(parents=True, mode=want)
    except FileExistsError:
        pass
    else:
        os.chmod(run_dir, want)
        return []
    st = os.stat(run_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"run dir {run_dir} is not a directory; use a dedicated directory such as runs/NAME")
    check = _Checker(run_dir, st.st_gid, group_shared)
    check(run_dir, st)
    notes = []
    if stat.S_IMODE(st.st_mode) & ~want:
        os.chmod(run_dir, stat.S_IMODE(st.st_mode) & want)
        notes.append(f"tightened {run_dir} from {_mode(st)} to {stat.S_IMODE(st.st_mode) & want:04o}: what trainsup "
                     "keeps there (weights, config, command line) is private")
    for own in OWN_ENTRIES:
        top = run_dir / own
        try:
            check(top, os.lstat(top))
        except FileNotFoundError:
            continue
        for root, dirs, files in os.walk(top):  # never follows symlinks
            for name in dirs + files:
                try:
                    check(Path(root) / name, os.lstat(Path(root) / name))
                except FileNotFoundError:
                    continue  # removed meanwhile
    if check.tightened:
        notes.append(f"removed group write access from {check.tightened} file(s) in {run_dir} (your private group "
                     "only: a umask of 002 made them so)")
    return notes


class _Checker:
    """Refuses an entry someone else owns or could write; drops group write where the group is
    the user's own private group (a umask 002 leaves every file so), which changes nothing."""

    def __init__(self, run_dir: Path, run_gid: int, group_shared: bool) -> None:
        self.run_dir, self.run_gid, self.group_shared = run_dir, run_gid, group_shared
        self.me = os.getuid()
        self.tightened = 0
        self._private: dict[int, bool] = {}
        self._opt_in = "" if group_shared else " (or group_shared = true in the job file for a deliberately shared group dir)"

    def __call__(self, path: Path, st: os.stat_result) -> None:
        if st.st_uid != self.me and not (self.group_shared and st.st_gid == self.run_gid):
            raise UserError(
                f"{path} is owned by {_owner(st.st_uid)}, not by you: whoever owns it could plant a checkpoint. "
                f"Fix: `chown -R {self.me} {self.run_dir}` if it is yours, else use another --run-dir{self._opt_in}")
        if stat.S_ISLNK(st.st_mode):
            return  # a link's own mode means nothing; nothing in the run dir follows one
        if st.st_mode & 0o020 and not st.st_mode & 0o002 and not self.group_shared and st.st_uid == self.me \
                and self._is_private(st.st_gid):
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o020)
            self.tightened += 1
            return
        if st.st_mode & (0o002 if self.group_shared else 0o022):
            who = "others" if st.st_mode & 0o002 else "its group"
            raise UserError(
                f"{path} is writable by {who} (mode {_mode(st)}): anyone who can write it could plant a checkpoint "
                f"or write control.json. Fix: `chmod -R go-w {self.run_dir}`{self._opt_in}")

    def _is_private(self, gid: int) -> bool:
        """No user but this one is in group `gid` (by membership or as primary group)."""
        if gid not in self._private:
            try:
                import grp
                import pwd

                me = pwd.getpwuid(self.me).pw_name
                members = set(grp.getgrgid(gid).gr_mem) - {me}
                primary = {p.pw_name for p in pwd.getpwall() if p.pw_gid == gid} - {me}
                self._private[gid] = not members and not primary
            except (KeyError, ImportError):
                self._private[gid] = False
        return self._private[gid]


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open that refuses a symlink at `path` with a UserError naming it (never followed)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path} is a symlink; trainsup never follows symlinks in a run dir: remove it "
                            f"(rm {path}) and run again") from None
        raise


def write_pid_file(path: Path, pid: int) -> None:
    """`path` = "PID\\n", atomically, never through a symlink at the temp or final name."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)  # replaces a symlink at `path` itself, never its target


def old_ranks_alive(paths: runfiles.RunPaths) -> bool:
    """True while a rank of an earlier run still holds ranks/alive.lock."""
    try:
        fd = open_nofollow(paths.alive_lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as e:
        if e.errno not in runfiles.NO_FLOCK_ERRNOS:
            raise
        log.warning("%s: no flock on this file system (%s): cannot tell whether ranks of an earlier run still "
                    "run; make sure none does", paths.alive_lock, e.strerror)
        return False
    finally:
        os.close(fd)  # closing releases our probe lock at once
    return False


def wait_for_old_ranks(paths: runfiles.RunPaths, timeout_s: float, *, poll_s: float = 0.2) -> float:
    """Block until no rank of an earlier run holds ranks/alive.lock; returns the seconds waited.
    LockedError (exit 4) naming their pids when they are still there after `timeout_s`."""
    start = time.monotonic()
    if not old_ranks_alive(paths):
        return 0.0
    pids = _old_rank_pids(paths)
    log.warning("ranks of an earlier run (pid %s) still run on %s, saving: waiting up to %.0f s for them "
                "before starting new ones", ", ".join(map(str, pids)) or "unknown", paths.run_dir, timeout_s)
    while old_ranks_alive(paths):
        if time.monotonic() - start >= timeout_s:
            raise LockedError(
                f"ranks of an earlier run (pid {', '.join(map(str, pids)) or 'unknown'}) still run on "
                f"{paths.run_dir} after {timeout_s:.0f} s; two sets of ranks must never share a run dir: "
                "wait for them to exit, or kill them, then run again")
        time.sleep(poll_s)
    return time.monotonic() - start


def _old_rank_pids(paths: runfiles.RunPaths) -> list[int]:
    pids = []
    for p in sorted(paths.ranks.glob("rank-*.json")):
        info = runfiles.read_json(p) or {}
        if isinstance(info.get("pid"), int) and info["pid"] > 0:
            pids.append(info["pid"])
    return pids


def acquire_run_lock(run_dir: Path, *, node: int | None = None, group_shared: bool = False) -> filelock.BaseFileLock:
    """One supervisor per run dir, or per machine rank (`node`) of a run on several machines;
    LockedError (exit 4) names the PID holding it.

    First the run dir is made private, or refused when someone else could have written it
    (secure_run_dir, exit 2). The lock and pid files are never followed as symlinks."""
    for note in secure_run_dir(run_dir, group_shared=group_shared):
        log.info("%s", note)
    paths = runfiles.RunPaths(run_dir, node=node)
    paths.node_dir.mkdir(parents=True, exist_ok=True, mode=0o770 if group_shared else 0o700)
    os.close(open_nofollow(paths.lock, os.O_RDONLY | os.O_CREAT))  # filelock would follow a link
    lock = filelock.FileLock(str(paths.lock), timeout=0)
    pid_file = Path(str(paths.lock) + ".pid")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        holder = "unknown pid"
        try:
            holder = f"pid {int(pid_file.read_text().strip())}"
        except (OSError, ValueError):
            pass
        if node is not None:
            raise LockedError(f"machine rank {node} of run dir {run_dir} is already supervised ({holder}, "
                              f"{paths.lock}): each node needs its own [launch] machine_rank; stop that "
                              "supervisor first or give this node its own machine rank") from None
        raise LockedError(f"run dir {run_dir} is locked by another supervisor ({holder}); "
                          "stop it first (trainsup status shows it) or use another --run-dir") from None
    write_pid_file(pid_file, os.getpid())
    return lock
