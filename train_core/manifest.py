"""Reading and validating a checkpoint's manifest.json and the files it lists (torch-free).

A directory named `step-N` is valid only while its manifest parses and lists files that are
all there with the right size (quick check) and hash (full check), none of them outside the
checkpoint, and no file a loader would read is left unlisted.

Everything in the directory is untrusted input: any parse, type or range error is a problem
with a reason and a code (train_core.checkpoint), never an exception.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, NamedTuple

from train_core import safeload
from train_core.checkpoint import (
    BAD_MANIFEST,
    FORMAT_HASH,
    FORMAT_VERSION,
    HASH_MISMATCH,
    MANIFEST,
    MISSING_FILE,
    MISSING_MANIFEST,
    NEWER_FORMAT,
    NOT_A_FILE,
    PATH_OUTSIDE,
    SIZE_MISMATCH,
    STEP_MISMATCH,
    SYMLINK,
    UNKNOWN_FORMAT,
    UNLISTED_FILE,
    UNREADABLE_FILE,
    UNREADABLE_MANIFEST,
)
from train_core.hashing import HashUnavailable, digest_file

MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KB; a bigger one is not read
_REQUIRED = ("format", "step", "epoch", "batch_in_epoch", "created_at", "files")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")  # sha256 and BLAKE3 (its default 32-byte output) alike
# Files accelerate's load_state or trainsup read from a checkpoint dir: one the manifest does
# not list would be loaded unchecked, so it makes the checkpoint invalid. Other unlisted
# files (an NFS .nfsXXXX, a user's notes) are reported as strays.
_LOADED_RE = re.compile(
    r"^(?:(?:model|pytorch_model)(?:_\d+)?\.(?:safetensors|bin)|(?:optimizer|scheduler|sampler|dl_state_dict)"
    r"(?:_\d+)?\.bin|random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl|scaler\.pt|trainer_state\.json)$"
)

PickledFiles = list[tuple[str, str]]  # (path, name in the checkpoint) of pickled files still to check


class ManifestCheck(NamedTuple):
    """What check_manifest found; `problem`/`code` are None when the checkpoint passed."""

    manifest: dict | None
    problem: str | None
    code: str | None
    strays: tuple[str, ...]  # unlisted files nothing loads (reported, not fatal)
    pickled: PickledFiles  # for the pickle check, which the store runs batched


class _ManifestProblem(Exception):
    def __init__(self, problem: str, code: str):
        super().__init__(problem)
        self.problem, self.code = problem, code


def check_manifest(path: Path, step: int, full: bool, trust_pickle: bool = False) -> ManifestCheck:
    """Validate the directory `path` holding checkpoint `step` (sha256 of every file when
    `full`), all but the pickle check of the files in `pickled` (CheckpointStore._seal)."""
    try:
        manifest = _parse(_read_manifest(path / MANIFEST))
    except _ManifestProblem as p:
        return ManifestCheck(None, p.problem, p.code, (), [])
    try:
        _check_header(path, step, manifest)
        listed, pickled = _check_listed(path, manifest, full, trust_pickle)
        strays = _strays(path, listed)
    except _ManifestProblem as p:
        return ManifestCheck(manifest, p.problem, p.code, (), [])
    return ManifestCheck(manifest, None, None, strays, pickled)


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
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # checked before fdopen, which refuses a directory with an error of its own
        os.close(fd)
        raise _ManifestProblem("manifest.json is not a regular file", UNREADABLE_MANIFEST)
    with os.fdopen(fd, "rb") as f:
        if st.st_size > MAX_MANIFEST_BYTES:
            raise _ManifestProblem(f"manifest.json is {st.st_size} bytes (more than {MAX_MANIFEST_BYTES >> 20} MiB: "
                                   "not a trainsup manifest)", UNREADABLE_MANIFEST)
        try:
            return f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as e:
            raise _ManifestProblem(f"unreadable manifest.json: {e.strerror or e}", UNREADABLE_MANIFEST) from None


def _parse(raw: bytes) -> dict:
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise _ManifestProblem(f"unreadable manifest.json: not valid JSON ({reason})", UNREADABLE_MANIFEST) from None
    if not isinstance(manifest, dict):
        raise _ManifestProblem("unreadable manifest.json: not a JSON object", UNREADABLE_MANIFEST)
    return manifest


def _check_header(path: Path, step: int, manifest: dict) -> None:
    """The format, the required keys and the position fields, before any file is looked at."""
    fmt = manifest.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise _ManifestProblem("unknown manifest format (no integer 'format' key): not a trainsup checkpoint",
                               UNKNOWN_FORMAT)
    if fmt > FORMAT_VERSION:
        raise _ManifestProblem(f"manifest format {fmt} is newer than this trainsup reads ({FORMAT_VERSION}): "
                               "upgrade trainsup", NEWER_FORMAT)
    if fmt < 1:
        raise _ManifestProblem(f"unknown manifest format {fmt}", UNKNOWN_FORMAT)
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise _ManifestProblem(f"manifest.json lacks {', '.join(missing)}", BAD_MANIFEST)
    mstep = manifest["step"]
    if not isinstance(mstep, int) or isinstance(mstep, bool) or mstep != step:
        raise _ManifestProblem(f"manifest says step {_short(mstep)} but the directory is {path.name}", STEP_MISMATCH)
    for key in ("epoch", "batch_in_epoch"):
        value = manifest[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _ManifestProblem(f"manifest.json {key} must be an integer >= 0, got {_short(value)}", BAD_MANIFEST)
    if not isinstance(manifest["files"], list):
        raise _ManifestProblem("manifest.json 'files' is not a list", BAD_MANIFEST)


def hash_name(manifest: dict) -> str:
    """The hash a (header-checked) manifest lists: "sha256" (format 1) or "blake3" (format 2)."""
    return FORMAT_HASH[manifest["format"]]


def _check_listed(path: Path, manifest: dict, full: bool, trust_pickle: bool) -> tuple[set[str], PickledFiles]:
    """Every listed file, in order: (the listed relative paths, the pickled files to check)."""
    listed: set[str] = set()
    pickled: PickledFiles = []
    algo = hash_name(manifest)
    for entry in manifest["files"]:
        rel, size, digest = _file_entry(entry, algo)
        rel_path = _inside(path, rel)
        listed.add(rel_path.as_posix())
        fpath = path / rel_path
        _check_file(fpath, rel, size)
        if not trust_pickle and safeload.needs_scan(rel):
            pickled.append((str(fpath), rel))
        if full:
            _check_hash(fpath, rel, digest, algo)
    return listed, pickled


def _file_entry(entry: Any, algo: str) -> tuple[str, int, str]:
    """(path, size, digest) of one `files` entry, or _ManifestProblem for any type or range error."""
    if not isinstance(entry, dict):
        raise _ManifestProblem(f"manifest.json has a malformed file entry: {_short(entry)}", BAD_MANIFEST)
    rel, size, digest = entry.get("path"), entry.get("size"), entry.get(algo)
    if not isinstance(rel, str) or not rel or "\0" in rel or len(rel) > 4096:
        raise _ManifestProblem(f"manifest.json has a malformed file entry: path {_short(rel)}", BAD_MANIFEST)
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63:
        raise _ManifestProblem(f"manifest.json has a malformed file entry: {_short(rel)} size {_short(size)}", BAD_MANIFEST)
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise _ManifestProblem(f"manifest.json has a malformed file entry: {_short(rel)} {algo} {_short(digest)}",
                               BAD_MANIFEST)
    return rel, size, digest


def _inside(path: Path, rel: str) -> Path:
    """`rel` as a path that stays inside the checkpoint `path`: not absolute, no "..", not the
    manifest itself, no symlinked sub-directory on the way (one would lead outside)."""
    rel_path = Path(rel)
    if rel_path.is_absolute() or ".." in rel_path.parts or rel_path.as_posix() == MANIFEST:
        raise _ManifestProblem(f"manifest.json lists a path outside the checkpoint: {_short(rel)}", PATH_OUTSIDE)
    parent = path
    for part in rel_path.parts[:-1]:
        parent = parent / part
        if parent.is_symlink():
            raise _ManifestProblem(f"manifest.json lists a path outside the checkpoint: {_short(rel)} "
                                   "(through a symlink)", PATH_OUTSIDE)
    return rel_path


def _check_file(fpath: Path, rel: str, size: int) -> None:
    """The listed file is there, a regular file (never a link), of the listed size."""
    try:
        st = fpath.lstat()
    except FileNotFoundError:
        raise _ManifestProblem(f"missing file: {safeload.printable(rel)}", MISSING_FILE) from None
    except OSError as e:
        raise _ManifestProblem(f"unreadable file {safeload.printable(rel)}: {e.strerror or e}", UNREADABLE_FILE) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise _ManifestProblem(f"{safeload.printable(rel)} is {kind}", NOT_A_FILE)
    if st.st_size != size:
        raise _ManifestProblem(f"size mismatch: {safeload.printable(rel)} is {st.st_size} bytes, manifest says {size}",
                               SIZE_MISMATCH)


def _check_hash(fpath: Path, rel: str, digest: str, algo: str) -> None:
    try:
        actual = digest_file(fpath, algo)
    except OSError as e:
        raise _ManifestProblem(f"unreadable file {safeload.printable(rel)}: {e.strerror or e}", UNREADABLE_FILE) from None
    except HashUnavailable as e:
        raise _ManifestProblem(str(e), UNREADABLE_FILE) from None
    if actual != digest:
        raise _ManifestProblem(f"hash mismatch: {safeload.printable(rel)} ({algo} {actual[:12]}…, "
                               f"manifest {digest[:12]}…)", HASH_MISMATCH)


def _strays(path: Path, listed: set[str]) -> tuple[str, ...]:
    """The unlisted files nothing loads; one a loader would read makes the checkpoint invalid."""
    strays = []
    for rel in _unlisted(path, listed):
        if _LOADED_RE.match(Path(rel).name) or safeload.needs_scan(rel):
            raise _ManifestProblem(f"{safeload.printable(rel)} is not in the manifest but could be loaded: "
                                   "remove it (or the checkpoint)", UNLISTED_FILE)
        strays.append(rel)
    return tuple(strays)


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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
