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

Every invalid checkpoint carries a one-line `problem` for people and a stable `code`
(one of PROBLEM_CODES) for programs and `--json`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from train_core import safeload
from train_core.contract import pid_alive
from train_core.runfiles import fsync_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STEP_DIGITS = 8
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_RE = re.compile(r"^\.tmp-(?:del-)?step-(\d+)-(\d+)$")
# set aside, never resumed from, kept until `prune --invalid`: failed to load (evidence), or
# replaced by a new commit of the same step (nothing saved is ever deleted to make room)
_QUARANTINE_RE = re.compile(r"^(failed|replaced)-step-(\d+)-(\d+)(?:-\d+)?$")
_HASH_CHUNK = 8 << 20
_REQUIRED = ("format", "step", "epoch", "batch_in_epoch", "created_at", "files")

# Stable machine-readable kinds of `Checkpoint.problem` (shown by `--json` as "problem_code").
MISSING_MANIFEST = "missing_manifest"
UNREADABLE_MANIFEST = "unreadable_manifest"
UNKNOWN_FORMAT = "unknown_format"
NEWER_FORMAT = "newer_format"
BAD_MANIFEST = "bad_manifest"  # parses, but a required key is missing or has the wrong type
STEP_MISMATCH = "step_mismatch"
PATH_OUTSIDE = "path_outside"
MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"
NOT_A_FILE = "not_a_file"  # a listed path that is a directory, a symlink, a device ...
SIZE_MISMATCH = "size_mismatch"
HASH_MISMATCH = "hash_mismatch"  # full check only
DUPLICATE_STEP = "duplicate_step"
SYMLINK = "symlink"  # the step-N entry itself is a symlink
NOT_A_DIRECTORY = "not_a_directory"
BAD_NAME = "bad_name"
UNSAFE_PICKLE = "unsafe_pickle"  # a file that would need arbitrary unpickling to load (safeload)
UNLISTED_FILE = "unlisted_file"  # a file load_state would read that the manifest does not list
QUARANTINED = "quarantined"  # failed-step-N-<time>: the ranks could not load it; moved aside
PROBLEM_CODES = (
    MISSING_MANIFEST, UNREADABLE_MANIFEST, UNKNOWN_FORMAT, NEWER_FORMAT, BAD_MANIFEST, STEP_MISMATCH,
    PATH_OUTSIDE, MISSING_FILE, UNREADABLE_FILE, NOT_A_FILE, SIZE_MISMATCH, HASH_MISMATCH,
    DUPLICATE_STEP, SYMLINK, NOT_A_DIRECTORY, BAD_NAME, UNSAFE_PICKLE, UNLISTED_FILE, QUARANTINED,
)


class StoreError(Exception):
    """A problem with the checkpoints directory itself; the message says how to fix it."""


def step_dir_name(step: int) -> str:
    return f"step-{step:0{STEP_DIGITS}d}"


def sha256_file(path: Path) -> str:
    """sha256 of a file by plain reads: safe even if someone truncates it meanwhile (an mmap
    would die of SIGBUS), so validation of committed checkpoints uses this."""
    with open(path, "rb", buffering=0) as f:
        return _hash_by_reading(f, hashlib.sha256())[1]


def _hash_file(path: Path) -> tuple[int, str]:
    """(bytes read, sha256 hex) of a file in a tmp dir being committed (only its writer has it).

    Hashes straight from the page cache through mmap (no copy into a Python buffer:
    ~12% faster than readinto here); hashlib releases the GIL, so files hash in parallel.
    """
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0, h.hexdigest()
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system without mmap: plain reads
            return _hash_by_reading(f, h)
        with mm:
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mm)
            try:
                for off in range(0, len(mm), _HASH_CHUNK):
                    h.update(view[off: off + _HASH_CHUNK])
            finally:
                view.release()
            return len(mm), h.hexdigest()


def _hash_by_reading(f, h) -> tuple[int, str]:
    size = 0
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    while n := f.readinto(buf):
        h.update(view[:n])
        size += n
    return size, h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Checkpoint:
    """One `step-N` directory as found on disk; `problem` is None when it is valid.

    `code` is the machine-readable kind of the problem (one of PROBLEM_CODES), None when valid.
    """

    path: Path
    step: int
    manifest: Mapping[str, Any] | None = None
    problem: str | None = None
    checked_hashes: bool = False
    code: str | None = None
    strays: tuple[str, ...] = ()  # unlisted files nothing loads (reported, not fatal)

    @property
    def valid(self) -> bool:
        return self.problem is None

    def _get(self, key: str, default: Any = None) -> Any:
        manifest = self.manifest if isinstance(self.manifest, Mapping) else {}
        return manifest.get(key, default)

    @property
    def epoch(self) -> int | None:
        value = self._get("epoch")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def batch_in_epoch(self) -> int | None:
        value = self._get("batch_in_epoch")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def reason(self) -> str | None:
        value = self._get("reason")
        return value if isinstance(value, str) else None

    @property
    def metrics(self) -> dict[str, float | None]:
        """Metric name -> value; a metric that was NaN/inf when saved reads back as None."""
        metrics = self._get("metrics") or {}
        if not isinstance(metrics, Mapping):
            return {}
        return {
            str(k): (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
            for k, v in metrics.items()
        }

    @property
    def created_at(self) -> dt.datetime | None:
        try:
            return dt.datetime.fromisoformat(self._get("created_at"))
        except (TypeError, ValueError):
            return None

    @property
    def size_bytes(self) -> int:
        """Bytes on disk as the manifest lists them, manifest included; 0 when unknown."""
        files = self._get("files") or []
        try:
            return sum(int(f["size"]) for f in files) + (self.path / MANIFEST).lstat().st_size
        except (TypeError, KeyError, ValueError, OverflowError, OSError):
            return 0


MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KB; a bigger one is not read
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Files accelerate's load_state or trainsup read from a checkpoint dir: one the manifest does
# not list would be loaded unchecked, so it makes the checkpoint invalid. Other unlisted
# files (an NFS .nfsXXXX, a user's notes) are reported as strays.
_LOADED_RE = re.compile(
    r"^(?:(?:model|pytorch_model)(?:_\d+)?\.(?:safetensors|bin)|(?:optimizer|scheduler|sampler|dl_state_dict)"
    r"(?:_\d+)?\.bin|random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl|scaler\.pt|trainer_state\.json)$"
)


def _read_manifest(mpath: Path) -> bytes:
    """The manifest's bytes: never through a symlink, never blocking (a FIFO), at most
    MAX_MANIFEST_BYTES. Raises _ManifestProblem."""
    try:
        fd = os.open(mpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise _ManifestProblem("missing manifest.json (the save never committed)", MISSING_MANIFEST) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _ManifestProblem("manifest.json is a symlink (trainsup never follows symlinks)", SYMLINK) from None
        raise _ManifestProblem(f"unreadable manifest.json: {e.strerror or e}", UNREADABLE_MANIFEST) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _ManifestProblem("manifest.json is not a regular file", UNREADABLE_MANIFEST)
        if st.st_size > MAX_MANIFEST_BYTES:
            raise _ManifestProblem(f"manifest.json is {st.st_size} bytes (more than {MAX_MANIFEST_BYTES >> 20} MiB: "
                                   "not a trainsup manifest)", UNREADABLE_MANIFEST)
        try:
            return f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as e:
            raise _ManifestProblem(f"unreadable manifest.json: {e.strerror or e}", UNREADABLE_MANIFEST) from None


class _ManifestProblem(Exception):
    def __init__(self, problem: str, code: str):
        super().__init__(problem)
        self.problem, self.code = problem, code


def _file_entry(entry: Any) -> tuple[str, int, str]:
    """(path, size, sha256) of one `files` entry, or _ManifestProblem for any type or range error."""
    if not isinstance(entry, dict):
        raise _ManifestProblem(f"manifest.json has a malformed file entry: {_short(entry)}", BAD_MANIFEST)
    rel, size, digest = entry.get("path"), entry.get("size"), entry.get("sha256")
    if not isinstance(rel, str) or not rel or "\0" in rel or len(rel) > 4096:
        raise _ManifestProblem(f"manifest.json has a malformed file entry: path {_short(rel)}", BAD_MANIFEST)
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63:
        raise _ManifestProblem(f"manifest.json has a malformed file entry: {_short(rel)} size {_short(size)}", BAD_MANIFEST)
    if not isinstance(digest, str) or not _SHA256_RE.match(digest):
        raise _ManifestProblem(f"manifest.json has a malformed file entry: {_short(rel)} sha256 {_short(digest)}", BAD_MANIFEST)
    return rel, size, digest


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_Files = list[tuple[str, str]]  # (path, name in the checkpoint) of pickled files still to check


def _check_manifest(path: Path, step: int, full: bool,
                    trust_pickle: bool = False) -> tuple[dict | None, str | None, str | None, tuple[str, ...], _Files]:
    """(manifest, problem, code, strays, pickled files to check) for the directory `path`
    holding checkpoint `step`; the pickle check itself runs batched (CheckpointStore._seal).

    Everything in the directory is untrusted input: any parse, type or range error is a
    problem with a reason, never an exception."""
    try:
        raw = _read_manifest(path / MANIFEST)
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise _ManifestProblem(f"unreadable manifest.json: not valid JSON ({reason})", UNREADABLE_MANIFEST) from None
        if not isinstance(manifest, dict):
            raise _ManifestProblem("unreadable manifest.json: not a JSON object", UNREADABLE_MANIFEST)
    except _ManifestProblem as p:
        return None, p.problem, p.code, (), []
    try:
        return manifest, *_check_files(path, step, manifest, full, trust_pickle)
    except _ManifestProblem as p:
        return manifest, p.problem, p.code, (), []


def _check_files(path: Path, step: int, manifest: dict, full: bool,
                 trust_pickle: bool) -> tuple[str | None, str | None, tuple[str, ...], _Files]:
    fmt = manifest.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        return "unknown manifest format (no integer 'format' key): not a trainsup checkpoint", UNKNOWN_FORMAT, (), []
    if fmt > FORMAT_VERSION:
        return (f"manifest format {fmt} is newer than this trainsup reads ({FORMAT_VERSION}): upgrade trainsup",
                NEWER_FORMAT, (), [])
    if fmt < 1:
        return f"unknown manifest format {fmt}", UNKNOWN_FORMAT, (), []
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        return f"manifest.json lacks {', '.join(missing)}", BAD_MANIFEST, (), []
    mstep = manifest["step"]
    if not isinstance(mstep, int) or isinstance(mstep, bool) or mstep != step:
        return f"manifest says step {_short(mstep)} but the directory is {path.name}", STEP_MISMATCH, (), []
    for key in ("epoch", "batch_in_epoch"):
        value = manifest[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"manifest.json {key} must be an integer >= 0, got {_short(value)}", BAD_MANIFEST, (), []
    files = manifest["files"]
    if not isinstance(files, list):
        return "manifest.json 'files' is not a list", BAD_MANIFEST, (), []
    listed: set[str] = set()
    to_scan: _Files = []
    for entry in files:
        rel, size, digest = _file_entry(entry)
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts or rel_path.as_posix() == MANIFEST:
            return f"manifest.json lists a path outside the checkpoint: {_short(rel)}", PATH_OUTSIDE, (), []
        listed.add(rel_path.as_posix())
        fpath = path / rel_path
        # A symlinked sub-directory would lead outside the checkpoint: never follow one.
        parent = path
        for part in rel_path.parts[:-1]:
            parent = parent / part
            if parent.is_symlink():
                return (f"manifest.json lists a path outside the checkpoint: {_short(rel)} (through a symlink)",
                        PATH_OUTSIDE, (), [])
        try:
            st = fpath.lstat()
        except FileNotFoundError:
            return f"missing file: {safeload.printable(rel)}", MISSING_FILE, (), []
        except OSError as e:
            return f"unreadable file {safeload.printable(rel)}: {e.strerror or e}", UNREADABLE_FILE, (), []
        if not stat.S_ISREG(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            return f"{safeload.printable(rel)} is {kind}", NOT_A_FILE, (), []
        if st.st_size != size:
            return f"size mismatch: {safeload.printable(rel)} is {st.st_size} bytes, manifest says {size}", SIZE_MISMATCH, (), []
        if not trust_pickle and safeload.needs_scan(rel):
            to_scan.append((str(fpath), rel))
        if full:
            try:
                actual = sha256_file(fpath)
            except OSError as e:
                return f"unreadable file {safeload.printable(rel)}: {e.strerror or e}", UNREADABLE_FILE, (), []
            if actual != digest:
                return f"hash mismatch: {safeload.printable(rel)} (sha256 {actual[:12]}…, manifest {digest[:12]}…)", HASH_MISMATCH, (), []
    strays = []
    for rel in _unlisted(path, listed):
        if _LOADED_RE.match(Path(rel).name) or safeload.needs_scan(rel):
            return (f"{safeload.printable(rel)} is not in the manifest but could be loaded: remove it (or the checkpoint)",
                    UNLISTED_FILE, (), [])
        strays.append(rel)
    return None, None, tuple(strays), to_scan


def _identity(path: str) -> tuple | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _unlisted(path: Path, listed: set[str]) -> list[str]:
    """Relative paths of the files under `path` (not following symlinks) the manifest does not list."""
    out = []
    for root, dirs, names in os.walk(path):
        base = Path(root).relative_to(path)
        for name in names + [d for d in dirs if (Path(root) / d).is_symlink()]:
            rel = (base / name).as_posix()
            if rel != MANIFEST and rel not in listed:
                out.append(rel)
    return sorted(out)


@dataclass
class CheckpointStore:
    """`RUN_DIR/checkpoints`: commit, scan, validate, remove."""

    root: Path
    _hash_threads: int = field(default=4, repr=False)
    # TRAINSUP_TRUST_PICKLE: skip the pickle scan (a documented opt-in for your own old files)
    trust_pickle: bool = False
    # what commit() leaves: private (0600/0700), or group-readable for a group_shared run dir
    group_shared: bool = False
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
            m = _STEP_RE.match(name)
            if m:
                found.append((int(m.group(1)), self.root / name))
        # The canonically named directory of a step wins; any other spelling is the duplicate.
        found.sort(key=lambda sp: (sp[0], sp[1].name != step_dir_name(sp[0]), sp[1].name))
        items: list[tuple[Checkpoint, _Files]] = []
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
            m = _STEP_RE.match(path.name)
            if not m:
                return Checkpoint(path, -1, None, f"{path.name} is not a checkpoint name (step-N)", code=BAD_NAME)
            step = int(m.group(1))
        return self._seal([self._inspect(path, step, full)])[0]

    def _inspect(self, path: Path, step: int, full: bool) -> tuple[Checkpoint, _Files]:
        """The checks of one checkpoint but the pickle check; what that still has to read."""
        if path.is_symlink():
            return Checkpoint(path, step, None, "is a symlink (trainsup never follows symlinks)", code=SYMLINK), []
        if not path.is_dir():
            return Checkpoint(path, step, None, "not a directory", code=NOT_A_DIRECTORY), []
        manifest, problem, code, strays, files = _check_manifest(path, step, full, self.trust_pickle)
        return Checkpoint(path, step, manifest, problem, checked_hashes=full and problem is None, code=code,
                          strays=strays), files

    def _seal(self, items: list[tuple[Checkpoint, _Files]]) -> list[Checkpoint]:
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
                       if (m := _QUARANTINE_RE.match(n)))
        why = {"failed": "the ranks could not load it", "replaced": "a later commit of that step replaced it"}
        return [Checkpoint(self.root / n, step, None, f"quarantined: {why[kind]}", code=QUARANTINED)
                for step, n, kind in found]

    def quarantine(self, ckpt: Checkpoint, now_s: float, kind: str = "failed") -> Path:
        """Move a checkpoint out of the way, renamed, not deleted (`kind` "failed": it failed to
        load, it is evidence; "replaced": that step is being committed anew), so the step can be
        committed again. Returns where it went."""
        if ckpt.path.parent != self.root or not _STEP_RE.match(ckpt.path.name) or ckpt.path.is_symlink():
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
        return sorted(self.root / n for n in os.listdir(self.root) if _TMP_RE.match(n))

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
        if final.exists() or final.is_symlink():
            existing = self.check(final, step)
            if existing.valid:
                raise StoreError(f"checkpoint {final.name} already exists; refusing to overwrite a valid checkpoint")
            aside = self.quarantine(existing, dt.datetime.now().timestamp(), "replaced")
            log.warning("replacing invalid %s (%s); kept as %s", final.name, existing.problem, aside.name)
        files = sorted(
            (p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()
             and p.relative_to(tmp).as_posix() != MANIFEST),
            key=lambda p: p.relative_to(tmp).as_posix(),
        )
        # Private whatever the writer's umask (accelerate writes 0644): weights, config and argv.
        for p in files:
            os.chmod(p, self._file_mode)
        for d in {p.parent for p in files} - {tmp}:
            os.chmod(d, self._dir_mode)
        # Overlap the two slow parts: fsync (waits on the disk, no CPU) runs in its own
        # threads while other threads hash (CPU; hashlib releases the GIL). Biggest first.
        by_size = sorted(files, key=lambda p: p.stat().st_size, reverse=True)
        with ThreadPoolExecutor(self._hash_threads + 2) as pool:
            syncs = [pool.submit(_fsync_file, p) for p in by_size]
            hashes = {p: pool.submit(_hash_file, p) for p in by_size}
            for fut in syncs:
                fut.result()
            entries = []
            for p in files:
                size, digest = hashes[p].result()
                entries.append({"path": p.relative_to(tmp).as_posix(), "size": size, "sha256": digest})
        for d in sorted({p.parent for p in files} - {tmp}, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        manifest: dict[str, Any] = dict(extra or {})
        manifest.update(
            format=FORMAT_VERSION,
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

    def remove(self, ckpt: Checkpoint | Path) -> None:
        """Delete one checkpoint: renamed out of sight first, so no reader sees it half gone.

        Refuses (StoreError) anything that is not a `step-N` / `.tmp-*` entry directly inside
        this store's root, a symlink, or reached through a symlinked root; nothing is followed.
        """
        path = ckpt.path if isinstance(ckpt, Checkpoint) else Path(ckpt)
        if path.parent != self.root or not (_STEP_RE.match(path.name) or _TMP_RE.match(path.name)
                                            or _QUARANTINE_RE.match(path.name)):
            raise StoreError(f"refusing to delete {path}: not a checkpoint inside {self.root}")
        if self.root.is_symlink():
            raise StoreError(f"refusing to delete {path}: {self.root} is a symlink (trainsup never follows symlinks)")
        if path.is_symlink():
            raise StoreError(f"refusing to delete {path}: it is a symlink (trainsup never follows symlinks)")
        if not path.exists():
            return
        if _STEP_RE.match(path.name):
            step = int(_STEP_RE.match(path.name).group(1))
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
        if tmp.parent != self.root or not _TMP_RE.match(tmp.name) or tmp.is_symlink():
            raise StoreError(f"{tmp} is not an uncommitted save of {self.root}")
        if tmp.exists():
            _rmtree(tmp)

    def remove_stale_tmp(self) -> list[Path]:
        """Remove uncommitted saves whose writer is gone; returns what was removed."""
        removed = []
        for tmp in self.tmp_dirs():
            pid = int(_TMP_RE.match(tmp.name).group(2))
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


