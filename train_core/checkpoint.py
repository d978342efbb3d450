"""What a checkpoint is on disk: its names, its problem codes, and `Checkpoint` (torch-free).

Checkpoints live in one directory (RUN_DIR/checkpoints):
  step-N                              a committed checkpoint (N zero-padded to STEP_DIGITS)
  .tmp-step-N-<pid>, .tmp-del-step-N-<pid>   a save being written, a removal under way
  failed-step-N-<time>, replaced-step-N-<time>   quarantined: never resumed from

Every invalid checkpoint carries a one-line `problem` for people and a stable `code`
(one of PROBLEM_CODES) for programs and `--json`.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

FORMAT_VERSION = 2  # the newest manifest format this trainsup reads and writes
# The hash each manifest format lists per file (train_core.hashing); format 2 is what
# FORMAT_VERSION writes when blake3 imports, format 1 otherwise.
FORMAT_HASH = {1: "sha256", 2: "blake3"}
HASH_FORMAT = {name: fmt for fmt, name in FORMAT_HASH.items()}
MANIFEST = "manifest.json"
# accelerate's mixed precision values: what a manifest's `mixed_precision` may say
MIXED_PRECISIONS = ("no", "fp16", "bf16", "fp8")
STEP_DIGITS = 8
STEP_RE = re.compile(r"^step-(\d+)$")
TMP_RE = re.compile(r"^\.tmp-(?:del-)?step-(\d+)-(\d+)$")
# set aside, never resumed from, kept until `prune --invalid`: failed to load (evidence), or
# replaced by a new commit of the same step (nothing saved is ever deleted to make room)
QUARANTINE_RE = re.compile(r"^(failed|replaced)-step-(\d+)-(\d+)(?:-\d+)?$")

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


def step_dir_name(step: int) -> str:
    return f"step-{step:0{STEP_DIGITS}d}"


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

    def _int(self, key: str) -> int | None:
        value = self._get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def epoch(self) -> int | None:
        return self._int("epoch")

    @property
    def batch_in_epoch(self) -> int | None:
        return self._int("batch_in_epoch")

    @property
    def reason(self) -> str | None:
        value = self._get("reason")
        return value if isinstance(value, str) else None

    @property
    def mixed_precision(self) -> str | None:
        """What the checkpoint was trained in (`accelerator.mixed_precision` at the save); None
        when the manifest does not say (written before trainsup recorded it) or says something
        that is not one of MIXED_PRECISIONS (the manifest is untrusted input)."""
        value = self._get("mixed_precision")
        return value if isinstance(value, str) and value in MIXED_PRECISIONS else None

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
