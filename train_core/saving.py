"""Writing a checkpoint from inside the ranks (Saver), and retention without the supervisor.

A save is collective. Rank 0 decides where it goes (_begin) and commits it (_commit); every
rank writes its own files (_write_files). No step raises on one rank alone: rank 0's outcome
is a (kind, text) pair broadcast to all, each rank's file writing goes into one all_ok, so a
failure reaches every rank and none is left waiting in a collective.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from train_core.collectives import Collectives
from train_core.errors import CheckpointSaveFailed
from train_core.faults import one_line
from train_core.position import Position
from train_core.retention import Entry, RetentionPolicy, plan_retention
from train_core.store import Checkpoint, CheckpointStore, StoreError, step_dir_name

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
LOW_DISK_MIB = 64  # a save failed with less free space than this: say the disk is (nearly) full
_REASON_ORDER = ("final", "preempt", "best", "request", "interval")  # the first present names the save


def custom_file(index: int) -> str:
    """accelerate's name for the index-th registered object (kept: plain load_state users know it)."""
    return f"custom_checkpoint_{index}.pkl"


def main_reason(reasons: list[str]) -> str:
    return next((r for r in _REASON_ORDER if r in reasons), reasons[0])


class Saver:
    """Collective saves of one session: every rank calls save() at the same step."""

    def __init__(self, store: CheckpointStore, collectives: Collectives, accelerator: Any, objects: list[Any], *,
                 is_main: bool, attempt: int) -> None:
        self.store = store
        self.collectives = collectives
        self.accelerator = accelerator
        self.objects = objects  # the session's registered objects (the list grows until `with session:`)
        self.is_main = is_main
        self.attempt = attempt

    def save(self, position: Position, trainer_state: dict[str, Any], *, reasons: list[str],
             metrics: Mapping[str, float], ours: Iterable[Checkpoint | None],
             safe: Checkpoint | None) -> tuple[Checkpoint, bool]:
        """(the checkpoint of `position`, whether it is new). `ours`: the checkpoints this run
        resumed from or wrote (one of them at this step is not saved again); `safe`: the one a
        failure message names as intact. Raises CheckpointSaveFailed on every rank."""
        name = step_dir_name(position.global_step)
        decision = self.collectives.broadcast(self._begin(position.global_step, ours) if self.is_main else None)
        if decision[0] == "fail":
            raise CheckpointSaveFailed(f"cannot start checkpoint {name}: {decision[1]}")
        if decision[0] == "exists":
            # e.g. a stop right after resuming: that state is already safe on disk
            ckpt = self.store.check(Path(decision[1]), position.global_step)
            log.info("checkpoint %s already exists; not saving it again", ckpt.path.name)
            return ckpt, False
        tmp = Path(decision[1])
        error = self._write_files(tmp, trainer_state)
        if not self.collectives.all_ok(not error):  # doubles as the barrier before the commit
            raise self._failed(tmp, f"saving {name} failed{': ' + error if error else ' on another rank'}", safe)
        result = self.collectives.broadcast(
            self._commit(tmp, position, reasons=reasons, metrics=metrics) if self.is_main else None)
        if result[0] != "ok":
            raise self._failed(tmp, f"committing {name} failed: {result[1]}", safe)
        ckpt = Checkpoint(Path(result[1]), position.global_step, {"reason": main_reason(reasons), "metrics": dict(metrics)})
        log.info("saved %s (%s)", ckpt.path.name, "+".join(reasons))
        return ckpt, True

    def _begin(self, step: int, ours: Iterable[Checkpoint | None]) -> tuple[str, str]:
        """Rank 0: ("exists", path) when `step` is already saved by this run (one of `ours`),
        ("new", tmp dir) to write into, or ("fail", why). Never raises."""
        try:
            existing = self.store.check(self.store.root / step_dir_name(step), step)
            if existing.valid and str(existing.path) in {str(c.path) for c in ours if c is not None}:
                return ("exists", str(existing.path))
            if existing.valid:
                # left by a run we did not continue (an explicit older resume point, or a
                # checkpoint that failed to load): this run's state replaces it
                aside = self.store.quarantine(existing, time.time(), "replaced")
                log.warning("replacing %s, which this run did not resume from; kept as %s",
                            existing.path.name, aside.name)
            return ("new", str(self.store.begin(step)))
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, not hang
            return ("fail", one_line(e))

    def _write_files(self, tmp: Path, trainer_state: dict[str, Any]) -> str:
        """This rank's files into `tmp`: "" when done, else what failed (never raises)."""
        try:
            if self.is_main:
                tmp.mkdir(parents=True, exist_ok=True)
                with open(tmp / TRAINER_STATE, "w") as f:
                    json.dump(trainer_state, f, indent=1, sort_keys=True)
            self.accelerator.save_state(str(tmp))  # every rank writes random_states_<rank>.pkl
            if self.is_main:
                for i, obj in enumerate(self.objects):
                    torch.save(obj.state_dict(), tmp / custom_file(i))
        except Exception as e:  # noqa: BLE001
            return one_line(e)
        return ""

    def _commit(self, tmp: Path, position: Position, *, reasons: list[str],
                metrics: Mapping[str, float]) -> tuple[str, str]:
        """Rank 0: ("ok", committed path) or ("fail", why). Never raises."""
        try:
            ckpt = self.store.commit(
                tmp,
                position.global_step,
                epoch=position.epoch,
                batch_in_epoch=position.batch_in_epoch,
                reason=main_reason(reasons),
                metrics=metrics,
                config_fingerprint=position.config_fingerprint,
                extra=position.manifest_extra(reasons=reasons, attempt=self.attempt),
            )
        except Exception as e:  # noqa: BLE001
            return ("fail", one_line(e))
        return ("ok", str(ckpt.path))

    def _failed(self, tmp: Path, message: str, safe: Checkpoint | None) -> CheckpointSaveFailed:
        """Rank 0 removes the half-written save (on a full disk that space is what the next
        attempt needs); the message says what is still safe and, for a full disk, the fix."""
        if self.is_main:
            try:
                self.store.abort(tmp)
            except (OSError, StoreError) as e:
                log.warning("could not remove the failed save %s: %s", tmp.name, e)
        try:
            free_mb = shutil.disk_usage(self.store.root).free / 2**20
        except OSError:
            free_mb = float("nan")
        # torch.save on a full disk often says only "iostream error" or "unexpected pos": look
        if "No space left on device" in message or "Disk quota exceeded" in message or free_mb < LOW_DISK_MIB:
            kept = safe.path.name if safe else "no earlier checkpoint"
            message += (f"; the disk holding {self.store.root} is full ({free_mb:.1f} MiB free): free space or "
                        f"lower [retention] keep_last, then run again ({kept} is intact)")
        return CheckpointSaveFailed(message)


def prune(store: CheckpointStore, retention: RetentionPolicy, protected: list[int]) -> None:
    """Rank 0, run without the supervisor: apply the retention policy (failures only warn)."""
    try:
        found = {c.step: c for c in store.scan()}
        plan = plan_retention(
            retention,
            [Entry(c.step, c.valid, c.metrics, c.reason or "") for c in found.values()],
            protected=protected,
        )
        for step in plan.delete:
            store.remove(found[step])
            log.info("retention: removed %s", found[step].path.name)
    except (OSError, StoreError) as e:
        log.warning("retention: pruning failed (training goes on): %s", e)
