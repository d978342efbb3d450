"""The atomic checkpoint store (torch-free: the supervisor and the CLI use it too).

Commit protocol, each step durable before the next (docs/format.md, "Atomic commit protocol"):
  1. the caller writes its files into `checkpoints/.tmp-step-N-<pid>/` (begin())
  2. every file is hashed and fsynced, every sub-directory fsynced
  3. `manifest.json` (sizes + BLAKE3, or sha256, of every other file) is written LAST and fsynced
  4. the tmp dir is fsynced and renamed to `step-N`, then `checkpoints/` is fsynced

A directory named `step-N` exists only after step 4, and is valid only while its
manifest parses and lists files that are all there with the right size (quick check)
and hash (full check): train_core.manifest. A kill at any point leaves either no
`step-N` or a valid one; the leftover `.tmp-*` is removed by the next start.

What a checkpoint is (its names, `Checkpoint`, the problem codes) is train_core.checkpoint;
every name it defines is importable from here too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from train_core import safeload
from train_core.checkpoint import (  # re-exported: callers import these from train_core.store
    BAD_MANIFEST,
    BAD_NAME,
    DUPLICATE_STEP,
    FORMAT_VERSION,
    HASH_FORMAT,
    HASH_MISMATCH,
    MANIFEST,
    MISSING_FILE,
    MISSING_MANIFEST,
    NEWER_FORMAT,
    NOT_A_DIRECTORY,
    NOT_A_FILE,
    PATH_OUTSIDE,
    PROBLEM_CODES,
    QUARANTINE_RE,
    QUARANTINED,
    SIZE_MISMATCH,
    STEP_DIGITS,
    STEP_MISMATCH,
    STEP_RE,
    SYMLINK,
    TMP_RE,
    UNKNOWN_FORMAT,
    UNLISTED_FILE,
    UNREADABLE_FILE,
    UNREADABLE_MANIFEST,
    UNSAFE_PICKLE,
    Checkpoint,
    step_dir_name,
)
from train_core.contract import pid_alive
# commit() looks these up here, so a test can wrap them (tests/test_store_kill.py)
from train_core.hashing import WRITE_HASH, fsync_file as _fsync_file, hash_file as _hash_file, sha256_file
from train_core.manifest import PickledFiles, check_manifest
from train_core.runfiles import fsync_dir

log = logging.getLogger(__name__)

_STEP_RE = STEP_RE  # supervisor/cli/common.py reads it

__all__ = [
    "BAD_MANIFEST", "BAD_NAME", "DUPLICATE_STEP", "FORMAT_VERSION", "HASH_MISMATCH", "MANIFEST", "MISSING_FILE",
    "MISSING_MANIFEST", "NEWER_FORMAT", "NOT_A_DIRECTORY", "NOT_A_FILE", "PATH_OUTSIDE", "PROBLEM_CODES",
    "QUARANTINED", "SIZE_MISMATCH", "STEP_DIGITS", "STEP_MISMATCH", "SYMLINK", "UNKNOWN_FORMAT", "UNLISTED_FILE",
    "UNREADABLE_FILE", "UNREADABLE_MANIFEST", "UNSAFE_PICKLE",
    "Checkpoint", "CheckpointStore", "StoreError", "sha256_file", "step_dir_name",
]


class StoreError(Exception):
    """A problem with the checkpoints directory itself; the message says how to fix it."""


def _identity(path: str) -> tuple | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class CheckpointStore:
    """`RUN_DIR/checkpoints`: commit, scan, validate, remove."""

    root: Path
    _hash_threads: int = field(default=4, repr=False)
    # TRAINSUP_TRUST_PICKLE: skip the pickle scan (a documented opt-in for your own old files)
    trust_pickle: bool = False
    # what commit() leaves: private (0600/0700), or group-readable for a group_shared run dir
    group_shared: bool = False
    # the hash new manifests list: BLAKE3 (format 2) when it imports, else sha256 (format 1)
    hash_name: str = WRITE_HASH
    _verdicts: dict = field(default_factory=dict, repr=False)  # file identity -> pickle-check verdict

    @property
    def _file_mode(self) -> int:
        return 0o660 if self.group_shared else 0o600

    @property
    def _dir_mode(self) -> int:
        return 0o770 if self.group_shared else 0o700

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # -- reading -------------------------------------------------------------
    def _check_root(self) -> bool:
        """False when there is no checkpoints dir yet; raises when it is unusable."""
        if self.root.is_symlink():
            raise StoreError(
                f"{self.root} is a symlink; trainsup never follows symlinks in a run dir. "
                "Replace it with a real directory (or point the run dir at the real location)."
            )
        if not self.root.exists():
            return False
        if not self.root.is_dir():
            raise StoreError(f"{self.root} is not a directory; move it away so trainsup can create it.")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StoreError(f"{self.root}: permission denied; fix its permissions (chmod u+rx) or run as its owner.")
        return True

    def scan(self, *, full: bool = False) -> list[Checkpoint]:
        """Every `step-N` entry, oldest first, each validated (sha256 too when `full`)."""
        if not self._check_root():
            return []
        found: list[tuple[int, Path]] = []
        try:
            names = os.listdir(self.root)
        except PermissionError:
            raise StoreError(f"{self.root}: permission denied; fix its permissions or run as its owner.") from None
        for name in names:
            m = STEP_RE.match(name)
            if m:
                found.append((int(m.group(1)), self.root / name))
        # The canonically named directory of a step wins; any other spelling is the duplicate.
        found.sort(key=lambda sp: (sp[0], sp[1].name != step_dir_name(sp[0]), sp[1].name))
        items: list[tuple[Checkpoint, PickledFiles]] = []
        seen: dict[int, str] = {}
        for step, path in found:
            if step in seen:
                items.append((Checkpoint(path, step, None, f"duplicate step {step} (also {seen[step]})",
                                         code=DUPLICATE_STEP), []))
                continue
            seen[step] = path.name
            items.append(self._inspect(path, step, full))
        return self._seal(items)

    def check(self, path: Path, step: int | None = None, *, full: bool = False) -> Checkpoint:
        path = Path(path)
        if step is None:
            m = STEP_RE.match(path.name)
            if not m:
                return Checkpoint(path, -1, None, f"{path.name} is not a checkpoint name (step-N)", code=BAD_NAME)
            step = int(m.group(1))
        return self._seal([self._inspect(path, step, full)])[0]

    def _inspect(self, path: Path, step: int, full: bool) -> tuple[Checkpoint, PickledFiles]:
        """The checks of one checkpoint but the pickle check; what that still has to read."""
        if path.is_symlink():
            return Checkpoint(path, step, None, "is a symlink (trainsup never follows symlinks)", code=SYMLINK), []
        if not path.is_dir():
            return Checkpoint(path, step, None, "not a directory", code=NOT_A_DIRECTORY), []
        found = check_manifest(path, step, full, self.trust_pickle)
        return Checkpoint(path, step, found.manifest, found.problem, checked_hashes=full and found.problem is None,
                          code=found.code, strays=found.strays), found.pickled

    def _seal(self, items: list[tuple[Checkpoint, PickledFiles]]) -> list[Checkpoint]:
        """The pickle check of every still-valid checkpoint at once (capped child processes,
        safeload.check_files); a checkpoint is refused for its first file that fails it. A file
        already checked by this store, unchanged since (same inode, size, mtime and ctime: any
        write changes the ctime), keeps its verdict: the supervisor rescans after every commit."""
        wanted = [f for c, files in items if c.valid for f in files]
        keys = [_identity(path) for path, _ in wanted]
        todo = [f for f, k in zip(wanted, keys) if k is None or k not in self._verdicts]
        fresh = dict(zip((f[0] for f in todo), safeload.check_files(todo)))
        for (path, _), key in zip(wanted, keys):
            if key is not None and path in fresh:
                self._verdicts[key] = fresh[path]
        verdicts = iter(fresh[p] if p in fresh else self._verdicts[k] for (p, _), k in zip(wanted, keys))
        out = []
        for ckpt, files in items:
            bad = [v for v in [next(verdicts) for _ in files] if v] if ckpt.valid else []
            if bad:
                kind, text = bad[0]
                if kind == safeload.UNREADABLE:  # an I/O error: says nothing about the file's content
                    ckpt = dataclasses.replace(ckpt, problem=text, code=UNREADABLE_FILE, checked_hashes=False)
                else:
                    ckpt = dataclasses.replace(ckpt, code=UNSAFE_PICKLE, checked_hashes=False, problem=(
                        f"refused: {text}; set {safeload.ENV_TRUST_PICKLE}=1 only for a checkpoint you made yourself"))
            out.append(ckpt)
        return out

    def latest_valid(self, *, full: bool = False) -> Checkpoint | None:
        """The newest valid checkpoint; with `full`, only the candidates' hashes are read,
        newest first, until one passes (not every checkpoint's)."""
        for ckpt in reversed(self.scan(full=False)):
            if ckpt.valid and full:
                ckpt = self.check(ckpt.path, ckpt.step, full=True)
            if ckpt.valid:
                return ckpt
        return None

    def quarantined(self) -> list[Checkpoint]:
        """Checkpoints the supervisor moved aside after a deterministic load failure, oldest first
        (never resumed from; `trainsup checkpoints prune --invalid` removes them)."""
        if not self._check_root():
            return []
        found = sorted((int(m.group(2)), n, m.group(1)) for n in os.listdir(self.root)
                       if (m := QUARANTINE_RE.match(n)))
        why = {"failed": "the ranks could not load it", "replaced": "a later commit of that step replaced it"}
        return [Checkpoint(self.root / n, step, None, f"quarantined: {why[kind]}", code=QUARANTINED)
                for step, n, kind in found]

    def quarantine(self, ckpt: Checkpoint, now_s: float, kind: str = "failed") -> Path:
        """Move a checkpoint out of the way, renamed, not deleted (`kind` "failed": it failed to
        load, it is evidence; "replaced": that step is being committed anew), so the step can be
        committed again. Returns where it went."""
        if ckpt.path.parent != self.root or not STEP_RE.match(ckpt.path.name) or ckpt.path.is_symlink():
            raise StoreError(f"refusing to quarantine {ckpt.path}: not a checkpoint inside {self.root}")
        base = f"{kind}-{step_dir_name(ckpt.step)}-{int(now_s)}"
        target, n = self.root / base, 0
        while target.exists() or target.is_symlink():
            n += 1
            target = self.root / f"{base}-{n}"
        os.rename(ckpt.path, target)
        fsync_dir(self.root)
        return target

    def tmp_dirs(self) -> list[Path]:
        if not self._check_root():
            return []
        return sorted(self.root / n for n in os.listdir(self.root) if TMP_RE.match(n))

    # -- writing -------------------------------------------------------------
    def begin(self, step: int) -> Path:
        """A fresh, empty `.tmp-step-N-<pid>` directory to write checkpoint `step` into."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self._check_root()
        self.root.mkdir(parents=True, exist_ok=True, mode=self._dir_mode)
        tmp = self.root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
        if tmp.is_symlink():
            tmp.unlink()
        elif tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(mode=self._dir_mode)
        os.chmod(tmp, self._dir_mode)  # mkdir's mode is masked by the umask
        return tmp

    def commit(
        self,
        tmp: Path,
        step: int,
        *,
        epoch: int,
        batch_in_epoch: int,
        reason: str,
        metrics: Mapping[str, float] | None = None,
        config_fingerprint: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> Checkpoint:
        """Seal `tmp` (from begin()) as checkpoint `step`; returns the committed checkpoint.

        Metrics that are NaN or infinite are written as JSON null (manifest.json stays
        strict JSON that any tool parses) and read back as None.
        """
        tmp = Path(tmp)
        final = self.root / step_dir_name(step)
        self._make_room(final, step)
        entries = self._seal_files(tmp)
        manifest: dict[str, Any] = dict(extra or {})
        manifest.update(
            format=HASH_FORMAT[self.hash_name],
            step=int(step),
            epoch=int(epoch),
            batch_in_epoch=int(batch_in_epoch),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            metrics={str(k): _json_metric(v) for k, v in (metrics or {}).items()},
            reason=reason,
            config_fingerprint=config_fingerprint,
            files=entries,
        )
        with open(tmp / MANIFEST, "wb") as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False).encode())
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(self.root)
        return Checkpoint(final, step, manifest, None)

    def _make_room(self, final: Path, step: int) -> None:
        """An invalid `step-N` in the way is quarantined ("replaced"); a valid one is never overwritten."""
        if final.exists() or final.is_symlink():
            existing = self.check(final, step)
            if existing.valid:
                raise StoreError(f"checkpoint {final.name} already exists; refusing to overwrite a valid checkpoint")
            aside = self.quarantine(existing, dt.datetime.now().timestamp(), "replaced")
            log.warning("replacing invalid %s (%s); kept as %s", final.name, existing.problem, aside.name)

    def _seal_files(self, tmp: Path) -> list[dict[str, Any]]:
        """Step 2 of the commit protocol: every file of `tmp` made private, fsynced and hashed, then
        every sub-directory fsynced (deepest first). Returns the manifest's `files` entries."""
        files = sorted(
            (p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()
             and p.relative_to(tmp).as_posix() != MANIFEST),
            key=lambda p: p.relative_to(tmp).as_posix(),
        )
        subdirs = {p.parent for p in files} - {tmp}
        # Private whatever the writer's umask (accelerate writes 0644): weights, config and argv.
        for p in files:
            os.chmod(p, self._file_mode)
        for d in subdirs:
            os.chmod(d, self._dir_mode)
        # Overlap the two slow parts: fsync (waits on the disk, no CPU) runs in its own
        # threads while other threads hash (CPU; hashlib releases the GIL). Biggest first.
        by_size = sorted(files, key=lambda p: p.stat().st_size, reverse=True)
        with ThreadPoolExecutor(self._hash_threads + 2) as pool:
            syncs = [pool.submit(_fsync_file, p) for p in by_size]
            hashes = {p: pool.submit(_hash_file, p, self.hash_name) for p in by_size}
            for fut in syncs:
                fut.result()
            entries = []
            for p in files:
                size, digest = hashes[p].result()
                entries.append({"path": p.relative_to(tmp).as_posix(), "size": size, self.hash_name: digest})
        for d in sorted(subdirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        return entries

    def remove(self, ckpt: Checkpoint | Path) -> None:
        """Delete one checkpoint: renamed out of sight first, so no reader sees it half gone.

        Refuses (StoreError) anything that is not a `step-N` / `.tmp-*` entry directly inside
        this store's root, a symlink, or reached through a symlinked root; nothing is followed.
        """
        path = ckpt.path if isinstance(ckpt, Checkpoint) else Path(ckpt)
        if path.parent != self.root or not (STEP_RE.match(path.name) or TMP_RE.match(path.name)
                                            or QUARANTINE_RE.match(path.name)):
            raise StoreError(f"refusing to delete {path}: not a checkpoint inside {self.root}")
        if self.root.is_symlink():
            raise StoreError(f"refusing to delete {path}: {self.root} is a symlink (trainsup never follows symlinks)")
        if path.is_symlink():
            raise StoreError(f"refusing to delete {path}: it is a symlink (trainsup never follows symlinks)")
        if not path.exists():
            return
        if STEP_RE.match(path.name):
            step = int(STEP_RE.match(path.name).group(1))
            doomed = self.root / f".tmp-del-{step_dir_name(step)}-{os.getpid()}"
            if doomed.is_symlink():
                doomed.unlink()
            elif doomed.exists():
                _rmtree(doomed)
            os.rename(path, doomed)
            fsync_dir(self.root)
            path = doomed
        _rmtree(path)

    def abort(self, tmp: Path) -> None:
        """Remove an uncommitted save that failed (e.g. the disk filled up): its space comes back
        now, not at the next start. Only a .tmp-step-* directory of this store, never a link."""
        tmp = Path(tmp)
        if tmp.parent != self.root or not TMP_RE.match(tmp.name) or tmp.is_symlink():
            raise StoreError(f"{tmp} is not an uncommitted save of {self.root}")
        if tmp.exists():
            _rmtree(tmp)

    def remove_stale_tmp(self) -> list[Path]:
        """Remove uncommitted saves whose writer is gone; returns what was removed."""
        removed = []
        for tmp in self.tmp_dirs():
            pid = int(TMP_RE.match(tmp.name).group(2))
            if pid != os.getpid() and pid_alive(pid):
                continue  # somebody is still writing it
            if tmp.is_symlink():
                log.warning("leaving %s alone: it is a symlink", tmp)
                continue
            try:
                _rmtree(tmp)
            except OSError as e:
                log.warning("could not remove stale %s: %s", tmp, e)
                continue
            removed.append(tmp)
        return removed


def _json_metric(value: Any) -> float | None:
    """A metric as strict JSON: NaN, inf and None become null."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _rmtree(path: Path) -> None:
    """Remove a directory tree (symlinks inside are unlinked, never followed) or a plain file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
