"""Argument handling shared by `trainsup` commands: RUN_DIR|JOB.toml, the checkpoint store.

Every problem with what the user passed is a UserError: ONE line naming the path and the
fix, exit 2, raised before anything is changed on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from supervisor.errors import UserError
from train_core import store as store_mod
from train_core.runfiles import RunPaths
from train_core.safeload import trust_pickle_from_env
from train_core.store import Checkpoint, CheckpointStore, StoreError


def _is_toml(path: Path) -> bool:
    return path.suffix.lower() == ".toml"


def load_job_file(arg: str):
    """The JobConfig of the job file `arg` (supervisor.config.load_job); UserError when unusable."""
    path = Path(arg).expanduser()
    if not path.exists():
        raise UserError(f"{arg}: no such job file; pass an existing JOB.toml or a RUN_DIR")
    from supervisor import config  # lazy: TOML parsing is only needed for job files

    # The training script need not exist to look at a run's checkpoints.
    return config.load_job(path, check_script=False)


def is_job_file(arg: str) -> bool:
    path = Path(arg).expanduser()
    return _is_toml(path) and not path.is_dir()


def resolve_run_dir(arg: str, *, not_yet_run_ok: bool = False) -> Path:
    """The run directory named by `arg`: a RUN_DIR, or a JOB.toml whose `run_dir` is used.

    Raises UserError (exit 2) when `arg` is a missing path, a file that is not a job file,
    an unreadable directory, or a job file whose run dir does not exist yet. With
    `not_yet_run_ok` (`trainsup status`: "never run" is an answer) a job file's run dir
    may not exist yet; the checkpoint commands have nothing to show for it and refuse.
    """
    try:
        return _resolve_run_dir(arg, not_yet_run_ok)
    except PermissionError as e:
        raise _denied(e, arg) from None


def _denied(e: PermissionError, default: object) -> UserError:
    where = e.filename or default
    return UserError(f"{where}: permission denied; run as its owner or fix its permissions (chmod u+rx)")


def _resolve_run_dir(arg: str, not_yet_run_ok: bool) -> Path:
    path = Path(arg).expanduser()
    if is_job_file(arg):
        run_dir = Path(load_job_file(arg).run_dir)
        if not run_dir.exists() and not run_dir.is_symlink():
            if not_yet_run_ok:
                return run_dir
            raise UserError(
                f"{run_dir} (run_dir of {arg}) does not exist: the job has not run yet; "
                f"start it with `trainsup run {arg}`"
            )
        _check_dir(run_dir, what=f"run_dir of {arg}")
        return run_dir
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{arg}: no such directory; pass an existing RUN_DIR or JOB.toml")
    _check_dir(path, what=None)
    return path


def _check_dir(path: Path, what: str | None) -> None:
    label = f"{path} ({what})" if what else str(path)
    if not path.is_dir():
        if path.is_symlink():
            raise UserError(f"{label} is a broken symlink; pass the real RUN_DIR")
        hint = ""
        if path.name == store_mod.MANIFEST:
            hint = f" (that is a checkpoint's manifest: pass the run dir {path.parent.parent.parent})"
        raise UserError(f"{label} is a file, not a directory; pass RUN_DIR (the directory holding "
                        f"checkpoints/) or a JOB.toml{hint}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{label}: permission denied; run as its owner or fix it with `chmod u+rx {path}`")


def open_store(run_dir: Path, *, for_writing: bool = False) -> tuple[CheckpointStore, list[Checkpoint], bool]:
    """(store, quick-checked checkpoints oldest first, any_tmp) of `run_dir`; UserError when unusable.

    Unusable: no checkpoints/ (or no step-N in it), checkpoints/ a symlink or a file, a
    permission problem, or a manifest written by a newer trainsup (this one must not judge,
    let alone delete, what it cannot read). `for_writing` also requires write access.
    """
    try:
        return _open_store(run_dir, for_writing)
    except PermissionError as e:
        raise _denied(e, RunPaths(run_dir).checkpoints) from None


def _open_store(run_dir: Path, for_writing: bool) -> tuple[CheckpointStore, list[Checkpoint], bool]:
    ckpt_dir = RunPaths(run_dir).checkpoints
    if ckpt_dir.is_symlink():
        raise UserError(f"{ckpt_dir} is a symlink; trainsup never follows symlinks in a run dir: "
                        f"replace it with the real directory (mv) or pass the run dir it points into")
    if not ckpt_dir.exists():
        if _looks_like_checkpoints_dir(run_dir):
            raise UserError(f"{run_dir} holds no checkpoints/ directory (it looks like the checkpoints "
                            f"dir itself); pass its parent {run_dir.parent}")
        raise UserError(f"{run_dir} holds no checkpoints (no {ckpt_dir.name}/ directory); "
                        "pass the run dir of a run that has saved one")
    if not ckpt_dir.is_dir():
        raise UserError(f"{ckpt_dir} is a file, not a directory; move it away and pass the RUN_DIR of a real run")
    if not os.access(ckpt_dir, os.R_OK | os.X_OK):
        raise UserError(f"{ckpt_dir}: permission denied; run as its owner or fix it with `chmod u+rx {ckpt_dir}`")
    if for_writing and not os.access(ckpt_dir, os.W_OK | os.X_OK):
        raise UserError(f"{ckpt_dir}: permission denied (not writable); run as its owner or fix it with "
                        f"`chmod u+w {ckpt_dir}`; nothing was deleted")
    store = CheckpointStore(ckpt_dir, trust_pickle=trust_pickle_from_env())
    try:
        ckpts = store.scan()
        any_tmp = bool(store.tmp_dirs())
    except StoreError as e:
        raise UserError(str(e)) from None
    if not ckpts:
        raise UserError(f"{ckpt_dir} holds no checkpoints (no step-N directories yet); "
                        "wait for the run's first save or pass another RUN_DIR")
    require_readable_format(ckpts)
    return store, ckpts, any_tmp


def require_readable_format(ckpts: list[Checkpoint]) -> None:
    """UserError when any manifest was written by a newer trainsup than this one."""
    for c in ckpts:
        if c.code == store_mod.NEWER_FORMAT:
            fmt = (c.manifest or {}).get("format")
            raise UserError(f"{c.path / store_mod.MANIFEST} was written by a newer trainsup (format {fmt}, "
                            f"this one reads {store_mod.FORMAT_VERSION}); upgrade: pip install -U trainsup")


def _looks_like_checkpoints_dir(path: Path) -> bool:
    try:
        return any(store_mod._STEP_RE.match(n) for n in os.listdir(path))
    except OSError:
        return False
