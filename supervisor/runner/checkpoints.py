"""The run's checkpoints as the supervisor sees them: scan (only when the directory changed),
choose the one to resume from, prune by retention, and set aside the ones that failed to load.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from supervisor.runner.policy import choose_resume
from train_core.retention import Entry, RetentionPolicy, plan_retention
from train_core.store import Checkpoint, CheckpointStore, StoreError

log = logging.getLogger(__name__)


class RunCheckpoints:
    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self.all: list[Checkpoint] = []  # oldest first, valid or not
        self.newest_step = -1  # newest valid step (-1: none)
        self.excluded: set[int] = set()  # steps that failed to load in this run
        self._stamp: Any = None

    def newest(self) -> Checkpoint | None:
        return next((c for c in reversed(self.all) if c.valid), None)

    def refresh(self, *, force: bool = False) -> Checkpoint | None:
        """Rescan when checkpoints/ changed (or on `force`). Returns the checkpoint that became
        the newest valid one since the last scan; never on `force`, which only takes stock."""
        try:
            st = os.stat(self.store.root)
            stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if not force and stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            self.all = self.store.scan()
        except Exception as e:  # noqa: BLE001 - the run dir is untrusted input: never die of a scan
            log.error("cannot read checkpoints: %s", e)
            return None
        newest = self.newest()
        step = newest.step if newest else -1
        committed = newest if step > self.newest_step and not force else None
        self.newest_step = step
        return committed

    def choose_resume(self) -> tuple[Checkpoint | None, list[Checkpoint]]:
        """(the checkpoint to resume from or None, the newer ones that are not valid)."""
        step = choose_resume(((c.step, c.valid) for c in self.all), self.excluded)
        resume = next((c for c in self.all if c.step == step), None) if step is not None else None
        refused = [c for c in self.all if not c.valid and c.step > (step if step is not None else -1)]
        return resume, refused

    def prune(self, policy: RetentionPolicy, protected: set[int]) -> tuple[list[int], list[int]]:
        """Apply retention; returns (deleted steps, kept steps)."""
        entries = [Entry(c.step, c.valid, c.metrics, c.reason or "") for c in self.all]
        plan = plan_retention(policy, entries, protected=protected)
        by_step = {c.step: c for c in self.all}
        deleted = []
        for step in plan.delete:
            try:
                self.store.remove(by_step[step])
                deleted.append(step)
            except (StoreError, OSError) as e:
                log.warning("could not prune step %d: %s", step, e)
        if deleted:
            self.all = [c for c in self.all if c.step not in deleted]
            # Rescan on the next refresh rather than take the directory's stamp now: a rank may
            # have committed since the scan, and that commit must not go unseen.
            self._stamp = None
        return deleted, sorted(plan.keep)

    def quarantine(self, ckpt: Checkpoint, wall_now: float) -> Path | None:
        """A checkpoint the ranks could not load (a deterministic fault): never resume from it
        again, and move it out of the way so training can commit that step anew. Returns where
        it went (None: it could not be moved, and stays excluded)."""
        self.excluded.add(ckpt.step)
        try:
            target: Path | None = self.store.quarantine(ckpt, wall_now)
        except (OSError, StoreError) as e:
            log.warning("could not move aside %s: %s", ckpt.path.name, e)
            target = None
        self.refresh(force=True)
        return target

    def skip(self, ckpt: Checkpoint) -> None:
        """Fall back past a checkpoint without moving it: it failed to load for a reason outside
        it (memory, I/O), and a later supervisor may load it fine."""
        self.excluded.add(ckpt.step)

    def remove_stale_tmp(self) -> list[Path]:
        return self.store.remove_stale_tmp()
