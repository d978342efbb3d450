"""Writing a checkpoint from inside the ranks (Saver), and retention without the supervisor.

A save is collective. Rank 0 decides where it goes (_begin) and commits it (_commit); every
rank writes its own files (_write_files). No step raises on one rank alone: rank 0's outcome
is a (kind, text) pair broadcast to all, each rank's file writing goes into one all_ok, so a
failure reaches every rank and none is left waiting in a collective.

A background save (start) differs only in when the files are written: at the step boundary
each rank copies its state to memory (train_core.staging) and a writer thread writes it, while
training goes on. Collectives cannot run in that thread (they would interleave with the
training's), so the ranks meet through files instead: every other rank's writer leaves
`.rank-R.written` (or `.rank-R.failed`, with the error) in the tmp dir when its files are
there, and rank 0's writer commits once every rank's marker is in: the commit still waits for
every rank's files. The session learns the outcome at a later step boundary, on every rank at
the same step (wait()). One save is in flight at most: a save asked for while one is writing
waits for it (none is coalesced away), and so does any synchronous save.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from train_core import staging, streams
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


def _failed_text(what: str, error: str) -> str:
    """`what` failed: this rank's error, or (it worked here) another rank's."""
    return f"{what} failed{': ' + error if error else ' on another rank'}"


def main_reason(reasons: list[str]) -> str:
    return next((r for r in _REASON_ORDER if r in reasons), reasons[0])


WRITER_NICE = 19  # a background writer runs on CPU time the training leaves (threads it starts too)
MARKER_POLL_S = 0.005
WRITTEN, FAILED = "written", "failed"


def rank_marker(tmp: Path, rank: int, kind: str) -> Path:
    """Left in a background save's tmp dir by rank `rank`'s writer: its files are there / it failed."""
    return tmp / f".rank-{rank}.{kind}"


class InFlight:
    """A background save of one rank: the writer thread's outcome, once `done` is set."""

    def __init__(self, tmp: Path, step: int, reasons: list[str], metrics: Mapping[str, float]) -> None:
        self.tmp, self.step, self.reasons, self.metrics = tmp, step, reasons, dict(metrics)
        self.done = threading.Event()
        self.abandon = threading.Event()  # the process is exiting: stop waiting for other ranks
        self.error = ""  # why it failed; "" when it worked
        self.path: Path | None = None  # rank 0: where it was committed
        self.staged_bytes = 0
        self.stage_s = 0.0  # the copy to memory (the training waited for it)
        self.written_s = 0.0  # the writer's part: files, and on rank 0 the wait for every rank and the commit


class Saver:
    """Collective saves of one session: every rank calls save() (or start()) at the same step."""

    def __init__(self, store: CheckpointStore, collectives: Collectives, accelerator: Any, objects: list[Any], *,
                 is_main: bool, attempt: int, rank: int = 0, world_size: int = 1) -> None:
        self.store = store
        self.collectives = collectives
        self.accelerator = accelerator
        self.objects = objects  # the session's registered objects (the list grows until `with session:`)
        self.is_main = is_main
        self.attempt = attempt
        self.rank = rank
        self.world_size = world_size
        self.in_flight: InFlight | None = None
        self._buffers = staging.Buffers()
        self._jobs: queue.SimpleQueue | None = None  # to the writer thread, kept from the first background save

    def save(self, position: Position, trainer_state: dict[str, Any], *, reasons: list[str],
             metrics: Mapping[str, float], ours: Iterable[Checkpoint | None],
             safe: Checkpoint | None, stream_state: dict[str, Any] | None = None) -> tuple[Checkpoint, bool]:
        """(the checkpoint of `position`, whether it is new). `ours`: the checkpoints this run
        resumed from or wrote (one of them at this step is not saved again); `safe`: the one a
        failure message names as intact; `stream_state`: the main process's stream position
        (streams.STATE_FILE). Raises CheckpointSaveFailed on every rank."""
        name = step_dir_name(position.global_step)
        tmp, existing = self._decide(position.global_step, ours)
        if existing is not None:
            return existing, False
        error = self._write_files(tmp, trainer_state, stream_state=stream_state)
        if not self.collectives.all_ok(not error):  # doubles as the barrier before the commit
            raise self._failed(tmp, _failed_text(f"saving {name}", error), safe)
        result = self.collectives.broadcast(
            self._commit(tmp, position, reasons=reasons, metrics=metrics) if self.is_main else None)
        if result[0] != "ok":
            raise self._failed(tmp, f"committing {name} failed: {result[1]}", safe)
        ckpt = Checkpoint(Path(result[1]), position.global_step, {"reason": main_reason(reasons), "metrics": dict(metrics)})
        log.info("saved %s (%s)", ckpt.path.name, "+".join(reasons))
        return ckpt, True

    def start(self, position: Position, trainer_state: dict[str, Any], *, reasons: list[str],
              metrics: Mapping[str, float], ours: Iterable[Checkpoint | None], safe: Checkpoint | None,
              stream_state: dict[str, Any] | None = None, after_commit: Any = None) -> tuple[Checkpoint, bool] | None:
        """Collective, like save(), but only the copy to memory happens now: None once the
        writer thread has the state (see wait()); (checkpoint, False) when `position` is saved
        already. `after_commit(checkpoint)` runs in rank 0's writer after the commit."""
        if self.in_flight is not None:
            raise RuntimeError("a background save is still in flight: wait() for it first")
        name = step_dir_name(position.global_step)
        tmp, existing = self._decide(position.global_step, ours)
        if existing is not None:
            return existing, False
        t0 = time.monotonic()
        try:
            staged = staging.stage(self.accelerator, self.objects if self.is_main else [], self._buffers)
            error = ""
        except Exception as e:  # noqa: BLE001 - every rank must learn of it
            error = one_line(e)
        if not self.collectives.all_ok(not error):
            raise self._failed(tmp, _failed_text(f"copying {name} to memory", error), safe)
        job = self.in_flight = InFlight(tmp, position.global_step, reasons, metrics)
        job.staged_bytes, job.stage_s = staged.nbytes, time.monotonic() - t0
        if self._jobs is None:  # one thread for all saves: starting one costs the training ~1 ms each time
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._writer_loop, args=(self._jobs,), name="trainsup-save", daemon=True).start()
        # the loop goes on changing its metrics dict (and whatever else it shares): the writer gets its own
        position, trainer_state = copy.deepcopy((position, trainer_state))
        self._jobs.put((job, staged, position, trainer_state, stream_state, after_commit))
        return None

    def running(self) -> bool:
        """A background save is in flight and this rank's writer has not finished."""
        return self.in_flight is not None and not self.in_flight.done.is_set()

    def wait(self, safe: Checkpoint | None) -> Checkpoint | None:
        """Collective: wait for this rank's writer, then agree on the outcome. The committed
        checkpoint, None when none was in flight; raises CheckpointSaveFailed on every rank when
        any rank's part failed (nothing of it is left but, at worst, a tmp dir)."""
        job = self.in_flight
        if job is None:
            return None
        job.done.wait()
        self.in_flight = None
        name = step_dir_name(job.step)
        if not self.collectives.all_ok(not job.error):
            raise self._failed(None, _failed_text(f"saving {name} in the background", job.error), safe)
        log.info("saved %s (%s, written in the background)", name, "+".join(job.reasons))
        return Checkpoint(job.path or self.store.root / name, job.step,
                          {"reason": main_reason(job.reasons), "metrics": job.metrics})

    def close(self, timeout_s: float) -> Checkpoint | None:
        """The process is ending, maybe on an error: give the writer `timeout_s` to finish (the
        staged state is worth keeping: a crash in the next step does not lose it), then abandon
        it. Rank 0: the checkpoint it committed, if it did. Not collective (other ranks may be gone)."""
        job, self.in_flight = self.in_flight, None
        if self._jobs is not None:
            self._jobs.put(None)  # the writer ends once its job (if any) is done
            self._jobs = None
        if job is None:
            return None
        if not job.done.wait(timeout_s):
            job.abandon.set()
            log.warning("abandoned the background save of %s after %.0f s; the checkpoint before it stays the "
                        "newest", step_dir_name(job.step), timeout_s)
            return None
        if job.error:
            log.error("the background save of %s failed: %s", step_dir_name(job.step), job.error)
        return Checkpoint(job.path, job.step, None) if job.path else None

    def _writer_loop(self, jobs: queue.SimpleQueue) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except OSError:
            pass
        while (item := jobs.get()) is not None:
            threading.current_thread().name = f"trainsup-save-{item[0].step}"
            self._write_in_background(*item)

    def _write_in_background(self, job: InFlight, staged: staging.Staged, position: Position,
                             trainer_state: dict[str, Any], stream_state: dict[str, Any] | None,
                             after_commit: Any) -> None:
        t0 = time.monotonic()
        try:
            error = self._write_files(job.tmp, trainer_state, staged, stream_state)
            if not self.is_main:
                self._leave_marker(job, error)
            else:
                error = error or self._wait_for_ranks(job)
                if not error and job.abandon.is_set():  # the session has given it up: no late commit
                    error = "abandoned before the commit"
                if not error:
                    kind, text = self._commit(job.tmp, position, reasons=job.reasons, metrics=job.metrics)
                    if kind == "ok":
                        job.path = Path(text)
                        self._after(after_commit, job)
                    else:
                        error = f"committing failed: {text}"
                if error:
                    self._abort(job.tmp)
            job.error = error
        except BaseException as e:  # noqa: BLE001 - the session must learn of it, never hang
            job.error = one_line(e)
        finally:
            job.written_s = time.monotonic() - t0
            job.done.set()

    @staticmethod
    def _after(after_commit: Any, job: InFlight) -> None:
        """`after_commit` of a committed save: its failure does not undo the save."""
        if after_commit is None or job.abandon.is_set():
            return
        try:
            after_commit(Checkpoint(job.path, job.step, None))
        except Exception as e:  # noqa: BLE001
            log.warning("after committing %s: %s", step_dir_name(job.step), one_line(e))

    def failed_here(self) -> bool:
        """This rank's writer finished its part of the save in flight, and failed."""
        job = self.in_flight
        return job is not None and job.done.is_set() and bool(job.error)

    def _leave_marker(self, job: InFlight, error: str) -> None:
        marker = rank_marker(job.tmp, self.rank, FAILED if error else WRITTEN)
        marker.write_text(error)

    def _wait_for_ranks(self, job: InFlight) -> str:
        """Rank 0's writer: "" once every other rank's files are in `job.tmp`, else what failed."""
        pending = set(range(1, self.world_size))
        while pending:
            for r in sorted(pending):
                failed = rank_marker(job.tmp, r, FAILED)
                if failed.exists():
                    return f"rank {r}: {failed.read_text(errors='replace')[:300]}"
                if rank_marker(job.tmp, r, WRITTEN).exists():
                    pending.discard(r)
            if pending and job.abandon.wait(MARKER_POLL_S):
                return f"the process is exiting before rank(s) {sorted(pending)} wrote their files"
        for r in range(1, self.world_size):
            rank_marker(job.tmp, r, WRITTEN).unlink()
        return ""

    def _decide(self, step: int, ours: Iterable[Checkpoint | None]) -> tuple[Path, Checkpoint | None]:
        """Collective: (the tmp dir to write into, None), or (_, the checkpoint) when `step` is saved already."""
        decision = self.collectives.broadcast(self._begin(step, ours) if self.is_main else None)
        if decision[0] == "fail":
            raise CheckpointSaveFailed(f"cannot start checkpoint {step_dir_name(step)}: {decision[1]}")
        if decision[0] == "exists":
            # e.g. a stop right after resuming: that state is already safe on disk
            ckpt = self.store.check(Path(decision[1]), step)
            log.info("checkpoint %s already exists; not saving it again", ckpt.path.name)
            return Path(decision[1]), ckpt
        return Path(decision[1]), None

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

    def _write_files(self, tmp: Path, trainer_state: dict[str, Any], staged: staging.Staged | None = None,
                     stream_state: dict[str, Any] | None = None) -> str:
        """This rank's files into `tmp`, from the live objects or from `staged`: "" when done,
        else what failed (never raises)."""
        try:
            if self.is_main:
                tmp.mkdir(parents=True, exist_ok=True)
                with open(tmp / TRAINER_STATE, "w") as f:
                    json.dump(trainer_state, f, indent=1, sort_keys=True)
                if stream_state is not None:  # a snapshot nothing changes any more (streams.Tracker)
                    torch.save(stream_state, tmp / streams.STATE_FILE)
            if staged is not None:
                staging.write(staged, tmp, is_main=self.is_main, custom_name=custom_file)
                return ""
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
                extra=position.manifest_extra(reasons=reasons, attempt=self.attempt, **self._precision()),
            )
        except Exception as e:  # noqa: BLE001
            return ("fail", one_line(e))
        return ("ok", str(ckpt.path))

    def _precision(self) -> dict[str, str]:
        """The manifest's `mixed_precision`: what the model trains in ("no", "fp16", "bf16", "fp8";
        `[launch] mixed_precision = "auto"` keeps it on resume); left out when the accelerator
        does not say (a stand-in without the attribute)."""
        value = getattr(self.accelerator, "mixed_precision", None)
        value = getattr(value, "value", value)  # a PrecisionType enum member: its string
        return {"mixed_precision": value} if isinstance(value, str) else {}

    def _abort(self, tmp: Path) -> None:
        try:
            self.store.abort(tmp)
        except (OSError, StoreError) as e:
            log.warning("could not remove the failed save %s: %s", tmp.name, e)

    def _failed(self, tmp: Path | None, message: str, safe: Checkpoint | None) -> CheckpointSaveFailed:
        """Rank 0 removes the half-written save `tmp` (on a full disk that space is what the
        next attempt needs); the message says what is still safe and, for a full disk, the fix."""
        if self.is_main and tmp is not None:
            self._abort(tmp)
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
