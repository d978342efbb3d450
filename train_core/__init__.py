"""train_core: the part of trainsup that runs inside every rank.

The torch-free modules (store, retention, runfiles) are imported by the supervisor
too, so this package must not import torch at import time. `TrainSession` is loaded
lazily on first access.
"""

from __future__ import annotations

__all__ = ["TrainSession"]


def __getattr__(name: str):
    if name == "TrainSession":
        from train_core.session import TrainSession

        return TrainSession
    raise AttributeError(f"module 'train_core' has no attribute {name!r}")
