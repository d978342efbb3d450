"""The atomic checkpoint store (torch-free: the supervisor and the CLI use it too).

Commit protocol, each step durable before the next (design.md):
  1. the caller writes its files into `checkpoints/.tmp-step-N-<pid>/` (begin())
  2. every file is hashed and fsynced, every sub-directory fsynced
  3. `manifest.json` (sizes + sha256 of every other file) is written LAST and fsynced
  4. the tmp dir is fsynced and renamed to `step-N`, then `checkpoints/` is fsynced

A directory named `step-N` exists only after step 4, and is valid only while its
manifest parses and lists files that are all there with the right size (quick check)
and hash (full check). A kill at any point leaves either no `step-N` or a valid one;
the leftover `.tmp-*` is removed by the next start.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from train_core.runfiles import fsync_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STEP_DIGITS = 8
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_RE = re.compile(r"^\.tmp-(?:del-)?step-(\d+)-(\d+)$")
_HASH_CHUNK = 8 << 20
_REQUIRED = ("format", "step", "epoch", "batch_in_epoch", "created_at", "files")


class StoreError(Exception):
    """A problem with the checkpoints directory itself; the message says how to fix it."""


def step_dir_name(step: int) -> str:
    return f"step-{step:0{STEP_DIGITS}d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """One `step-N` directory as found on disk; `problem` is None when it is valid."""

    path: Path
    step: int
    manifest: Mapping[str, Any] | None = None
    problem: str | None = None
    checked_hashes: bool = False

    @property
    def valid(self) -> bool:
        return self.problem is None

    def _get(self, key: str, default: Any = None) -> Any:
        return (self.manifest or {}).get(key, default)

    @property
    def epoch(self) -> int | None:
        return self._get("epoch")

    @property
    def batch_in_epoch(self) -> int | None:
        return self._get("batch_in_epoch")

    @property
    def reason(self) -> str | None:
        return self._get("reason")

    @property
    def metrics(self) -> dict[str, float]:
        metrics = self._get("metrics") or {}
        return dict(metrics) if isinstance(metrics, Mapping) else {}

    @property
    def created_at(self) -> dt.datetime | None:
        try:
            return dt.datetime.fromisoformat(self._get("created_at"))
        except (TypeError, ValueError):
            return None

    @property
    def size_bytes(self) -> int:
        files = self._get("files") or []
        try:
            return sum(int(f["size"]) for f in files) + (self.path / MANIFEST).stat().st_size
        except (TypeError, KeyError, ValueError, OSError):
            return 0


def _check_manifest(path: Path, step: int, full: bool) -> tuple[dict | None, str | None]:
    """(manifest, problem) for the directory `path` holding checkpoint `step`."""
    mpath = path / MANIFEST
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        return None, "missing manifest.json (the save never committed)"
    except OSError as e:
        return None, f"unreadable manifest.json: {e.strerror or e}"
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"unreadable manifest.json: not valid JSON ({e})"
    if not isinstance(manifest, dict):
        return None, "unreadable manifest.json: not a JSON object"
    fmt = manifest.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        return manifest, "unknown manifest format (no integer 'format' key): not a trainsup checkpoint"
    if fmt > FORMAT_VERSION:
        return manifest, (
            f"manifest format {fmt} is newer than this trainsup reads ({FORMAT_VERSION}): "
            "upgrade trainsup"
        )
    if fmt < 1:
        return manifest, f"unknown manifest format {fmt}"
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        return manifest, f"manifest.json lacks {', '.join(missing)}"
    if manifest["step"] != step:
        return manifest, f"manifest says step {manifest['step']} but the directory is {path.name}"
    files = manifest["files"]
    if not isinstance(files, list):
        return manifest, "manifest.json 'files' is not a list"
    for entry in files:
        try:
            rel, size, digest = entry["path"], int(entry["size"]), entry["sha256"]
        except (TypeError, KeyError, ValueError):
            return manifest, f"manifest.json has a malformed file entry: {entry!r}"
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts or rel == MANIFEST:
            return manifest, f"manifest.json lists a path outside the checkpoint: {rel}"
        fpath = path / rel_path
        try:
            st = fpath.lstat()
        except FileNotFoundError:
            return manifest, f"missing file: {rel}"
        except OSError as e:
            return manifest, f"unreadable file {rel}: {e.strerror or e}"
        if not os.path.isfile(fpath) or fpath.is_symlink():
            return manifest, f"not a regular file: {rel}"
        if st.st_size != size:
            return manifest, f"size mismatch: {rel} is {st.st_size} bytes, manifest says {size}"
        if full:
            try:
                actual = sha256_file(fpath)
            except OSError as e:
                return manifest, f"unreadable file {rel}: {e.strerror or e}"
            if actual != digest:
                return manifest, f"hash mismatch: {rel} (sha256 {actual[:12]}…, manifest {str(digest)[:12]}…)"
    return manifest, None


@dataclass
class CheckpointStore:
    """`RUN_DIR/checkpoints`: commit, scan, validate, remove."""

    root: Path
    _hash_threads: int = field(default=4, repr=False)

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
            m = _STEP_RE.match(name)
            if m:
                found.append((int(m.group(1)), self.root / name))
        found.sort(key=lambda sp: (sp[0], sp[1].name != step_dir_name(sp[0]), sp[1].name))
        result: list[Checkpoint] = []
        seen: dict[int, str] = {}
        for step, path in found:
            if step in seen:
                result.append(Checkpoint(path, step, None, f"duplicate step {step} (also {seen[step]})"))
                continue
            seen[step] = path.name
            result.append(self.check(path, step, full=full))
        return result

    def check(self, path: Path, step: int | None = None, *, full: bool = False) -> Checkpoint:
        path = Path(path)
        if step is None:
            m = _STEP_RE.match(path.name)
            if not m:
                return Checkpoint(path, -1, None, f"{path.name} is not a checkpoint name (step-N)")
            step = int(m.group(1))
        if path.is_symlink():
            return Checkpoint(path, step, None, "is a symlink (trainsup never follows symlinks)")
        if not path.is_dir():
            return Checkpoint(path, step, None, "not a directory")
        manifest, problem = _check_manifest(path, step, full)
        return Checkpoint(path, step, manifest, problem, checked_hashes=full and problem is None)

    def latest_valid(self, *, full: bool = False) -> Checkpoint | None:
        for ckpt in reversed(self.scan(full=full)):
            if ckpt.valid:
                return ckpt
        return None

    def tmp_dirs(self) -> list[Path]:
        if not self._check_root():
            return []
        return sorted(self.root / n for n in os.listdir(self.root) if _TMP_RE.match(n))

    # -- writing -------------------------------------------------------------
    def begin(self, step: int) -> Path:
        """A fresh, empty `.tmp-step-N-<pid>` directory to write checkpoint `step` into."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self._check_root()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
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
        """Seal `tmp` (from begin()) as checkpoint `step`; returns the committed checkpoint."""
        tmp = Path(tmp)
        final = self.root / step_dir_name(step)
        if final.exists() or final.is_symlink():
            existing = self.check(final, step)
            if existing.valid:
                raise StoreError(f"checkpoint {final.name} already exists; refusing to overwrite a valid checkpoint")
            log.warning("replacing invalid %s (%s)", final.name, existing.problem)
            self.remove(existing)
        files = sorted(
            (p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink() and p.name != MANIFEST),
            key=lambda p: p.relative_to(tmp).as_posix(),
        )
        with ThreadPoolExecutor(self._hash_threads) as pool:
            # hashlib and fsync both release the GIL: hash and flush files side by side.
            entries = list(pool.map(lambda p: _seal_file(tmp, p), files))
        for d in sorted({p.parent for p in files} - {tmp}, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        manifest: dict[str, Any] = dict(extra or {})
        manifest.update(
            format=FORMAT_VERSION,
            step=int(step),
            epoch=int(epoch),
            batch_in_epoch=int(batch_in_epoch),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            reason=reason,
            config_fingerprint=config_fingerprint,
            files=entries,
        )
        with open(tmp / MANIFEST, "wb") as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(self.root)
        return Checkpoint(final, step, manifest, None)

    def remove(self, ckpt: Checkpoint | Path) -> None:
        """Delete one checkpoint: renamed out of sight first, so no reader sees it half gone."""
        path = ckpt.path if isinstance(ckpt, Checkpoint) else Path(ckpt)
        if path.parent != self.root or not (_STEP_RE.match(path.name) or _TMP_RE.match(path.name)):
            raise StoreError(f"refusing to delete {path}: not a checkpoint inside {self.root}")
        if path.is_symlink():
            raise StoreError(f"refusing to delete {path}: it is a symlink (trainsup never follows symlinks)")
        if _STEP_RE.match(path.name):
            step = int(_STEP_RE.match(path.name).group(1))
            doomed = self.root / f".tmp-del-{step_dir_name(step)}-{os.getpid()}"
            if doomed.exists():
                shutil.rmtree(doomed)
            os.rename(path, doomed)
            fsync_dir(self.root)
            path = doomed
        shutil.rmtree(path)

    def remove_stale_tmp(self) -> list[Path]:
        """Remove uncommitted saves whose writer is gone; returns what was removed."""
        removed = []
        for tmp in self.tmp_dirs():
            pid = int(_TMP_RE.match(tmp.name).group(2))
            if pid != os.getpid() and _pid_alive(pid):
                continue  # somebody is still writing it
            if tmp.is_symlink():
                continue
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        return removed


def _seal_file(tmp: Path, path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return {"path": path.relative_to(tmp).as_posix(), "size": size, "sha256": h.hexdigest()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

