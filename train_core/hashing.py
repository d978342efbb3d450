"""Hashing and fsync of checkpoint files (torch-free).

Manifests name their hash by format (train_core.checkpoint): format 1 lists sha256, format 2
BLAKE3 (the `blake3` package: several GB/s on one core with AVX2, and it spreads a large file
over the cores, where sha256 does ~1.6 GB/s with SHA-NI). New checkpoints use BLAKE3 when the
package imports, else sha256 (format 1); both are always read.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path
from typing import Any

try:
    import blake3 as _blake3
except ImportError:  # pragma: no cover - a core dependency; the store then writes sha256
    _blake3 = None

_HASH_CHUNK = 8 << 20
HASHES = ("sha256", "blake3")
WRITE_HASH = "blake3" if _blake3 is not None else "sha256"


class HashUnavailable(RuntimeError):
    pass


def new_hash(name: str) -> Any:
    if name == "sha256":
        return hashlib.sha256()
    if name == "blake3":
        if _blake3 is None:
            raise HashUnavailable("this checkpoint is hashed with BLAKE3 and the blake3 package is missing: "
                                  "pip install blake3")
        return _blake3.blake3(max_threads=_blake3.blake3.AUTO)
    raise ValueError(f"unknown hash {name!r}")


def digest_file(path: Path, name: str = "sha256") -> str:
    """Hash of a file by plain reads: safe even if someone truncates it meanwhile (an mmap
    would die of SIGBUS), so validation of committed checkpoints uses this."""
    h = new_hash(name)
    with open(path, "rb", buffering=0) as f:
        return _hash_by_reading(f, h)[1]


def digest_bytes(name: str, data: bytes) -> str:
    h = new_hash(name)
    h.update(data)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return digest_file(path, "sha256")


def hash_file(path: Path, name: str = WRITE_HASH) -> tuple[int, str]:
    """(bytes read, hex digest) of a file in a tmp dir being committed (only its writer has it).

    Hashes straight from the page cache through mmap (no copy into a Python buffer:
    ~12% faster than readinto here); both hashes release the GIL, so files hash in parallel.
    """
    h = new_hash(name)
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


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
