"""Telling faults apart inside a rank: out of memory, transient, and their one-line account."""

from __future__ import annotations

import torch
import torch.distributed as dist

_TRANSIENT_TEXT = ("cuda error", "nccl", "timed out", "timeout", "connection reset", "broken pipe")


def is_oom(exc: BaseException) -> bool:
    """CUDA/CPU out-of-memory. A CPU test simulates one with `raise torch.OutOfMemoryError(...)`."""
    oom_types = tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
    )
    if oom_types and isinstance(exc, oom_types):
        return True
    if isinstance(exc, (RuntimeError, MemoryError)):
        text = str(exc).lower()
        return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text
    return False


def is_transient(exc: BaseException) -> bool:
    """A load error that may pass on a retry: memory, I/O, time, the device or the network.
    A missing file, a refused unpickling, a shape or key mismatch would fail the same way again."""
    if is_oom(exc):
        return True
    if isinstance(exc, OSError):
        return not isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError))
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _TRANSIENT_TEXT)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()[:500]
