"""Resuming a TrainSession: which checkpoint, whether this run may continue it, loading it on
every rank, and where in the epoch to pick up.

  choose            rank 0 picks the checkpoint (or a fresh start); the session broadcasts it
  restore           every rank, from the choice: the steps below, in order
  refuse_problem    a checkpoint that failed its check: resume_failed, or bad input if named
  check_compatible  world size, config, samples per step, registered objects
  load_agreed       every rank loads, the worst verdict wins, transient faults are retried
  FullCheck         rank 0 hashes every file WHILE the ranks load (one read of the checkpoint
                    from disk, not two); its verdict is refused before the first step
  restore_position  trainer_state.json -> the position, and the batches to skip in the epoch
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from train_core import safeload
from train_core.collectives import Collectives
from train_core.errors import BadCheckpointChoice, ResumeFailed
from train_core.faults import is_transient, one_line
from train_core.fingerprint import ConfigMismatch, check_config_change
from train_core.runfiles import ENV_RESUME_FROM
from train_core.saving import TRAINER_STATE, custom_file
from train_core.store import UNREADABLE_FILE, CheckpointStore

log = logging.getLogger(__name__)

LOAD_RETRIES = 3  # a transient load error (OOM, EIO, timeout) retries the same checkpoint this often
LOAD_RETRY_PAUSE_S = 0.5  # doubled after each retry
LOAD_OK, LOAD_TRANSIENT, LOAD_BROKEN = 0, 1, 2  # ordered: the worst rank's verdict wins
_CUSTOM_RE = re.compile(r"^custom_checkpoint_\d+\.pkl$")  # custom_file(i), for any i


# ------------------------------------------------------------------ choosing
@dataclass(frozen=True)
class Choice:
    """Rank 0's answer to "where does this run start?", broadcast to every rank."""

    kind: str  # "fresh", "ckpt", or "error" (`message` says what is wrong and the fix)
    message: str = ""
    path: str = ""
    manifest: dict = field(default_factory=dict)
    problem: str | None = None  # the checkpoint's, from its quick check (the full one runs while loading)
    code: str | None = None
    explicit: bool = False  # named by the user, not chosen by the supervisor


def choose(store: CheckpointStore, mode: Any, supervisor_pid: int | None) -> Choice:
    """Rank 0. Never raises: every rank must learn the answer, an error included."""
    try:
        return _choose(store, mode, supervisor_pid)
    except Exception as e:  # noqa: BLE001
        return Choice("error", one_line(e))


def _choose(store: CheckpointStore, mode: Any, supervisor_pid: int | None) -> Choice:
    for tmp in store.remove_stale_tmp():
        log.info("removed unfinished save %s", tmp.name)
    env = os.environ.get(ENV_RESUME_FROM)
    # Under the supervisor, TRAINSUP_RESUME_FROM is its choice (it falls back on failure);
    # otherwise a named checkpoint is the user's, and an unusable one is bad input.
    explicit = False
    if env:
        target = Path(env)
        explicit = supervisor_pid is None
    elif mode in (None, "never", False):
        existing = [c for c in store.scan() if c.valid]
        if existing:
            return Choice("error", (
                f"resume=None but {store.root} already holds checkpoints (newest "
                f"{existing[-1].path.name}): use resume='auto' to continue, or a new run dir"
            ))
        return Choice("fresh")
    elif mode in ("auto", "latest"):
        latest = store.latest_valid()
        if latest is None:
            if mode == "latest":
                return Choice("error", f"resume='latest' but {store.root} holds no valid checkpoint")
            return Choice("fresh")
        target = latest.path
    else:
        target = Path(mode)
        explicit = True
    # the quick check (sizes, the pickle check) before anything is loaded; every file's hash
    # while the ranks load (FullCheck), before the first step
    ckpt = store.check(target)
    return Choice("ckpt", path=str(target), manifest=dict(ckpt.manifest or {}), problem=ckpt.problem,
                  code=ckpt.code, explicit=explicit)


# ------------------------------------------------------------------ restoring it
def restore(choice: Choice, collectives: Collectives, *, store: CheckpointStore, accelerator: Any,
            objects: Sequence[Any], registered: Sequence[str], rank: int, world_size: int, micro_batch: int | None,
            grad_accum: int, config: Mapping[str, Any], allow_changes: Sequence[str], trust_pickle: bool) -> Restored:
    """Every rank: refuse a checkpoint that failed its check or that this run cannot continue,
    load it (all ranks agreeing) while rank 0 hashes it, refuse it if a hash is wrong, and read
    back where to continue."""
    path = Path(choice.path)
    refuse_problem(choice)
    check_compatible(path, choice.manifest, world_size=world_size, micro_batch=micro_batch, grad_accum=grad_accum,
                     config=config, allow_changes=allow_changes, registered=registered)
    full = FullCheck(store, path) if rank == 0 else None
    tstate = load_agreed(path, lambda: load_once(path, choice.manifest, accelerator=accelerator, objects=objects,
                                                 rank=rank, trust_pickle=trust_pickle), collectives)
    problem, code = collectives.broadcast(full.result() if full else None)
    # flipped bytes load silently: what was loaded is never trained on
    refuse_problem(dataclasses.replace(choice, problem=problem, code=code))
    # Only step % grad_accum matters to accelerate, and we saved at a boundary: 0 is exact,
    # also when OOM recovery changed grad_accum.
    accelerator.step = 0
    return restore_position(path, tstate, micro_batch=micro_batch, world_size=world_size)


def refuse_problem(choice: Choice) -> None:
    """Raise for a chosen checkpoint that failed its check."""
    if not choice.problem:
        return
    if choice.code == UNREADABLE_FILE:  # an I/O error while checking: the checkpoint may be fine
        raise ResumeFailed(choice.path, choice.problem, transient=True)
    if choice.explicit:
        raise BadCheckpointChoice(f"cannot resume from {choice.path} (asked for by name): {choice.problem}")
    raise ResumeFailed(choice.path, choice.problem)


# ------------------------------------------------------------------ may this run continue it?
def check_compatible(path: Path, manifest: Mapping[str, Any], *, world_size: int, micro_batch: int | None,
                     grad_accum: int, config: Mapping[str, Any], allow_changes: Sequence[str],
                     registered: Sequence[str]) -> None:
    """ConfigMismatch (bad input: exit 2) for a checkpoint this run cannot continue exactly."""
    name = path.name
    world = manifest.get("world_size")
    old_micro, old_accum = manifest.get("micro_batch"), manifest.get("grad_accum")
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (world, old_micro, old_accum)) \
            or not isinstance(manifest.get("registered", []), list):
        raise ResumeFailed(path, "manifest.json world_size/micro_batch/grad_accum/registered have the wrong type")
    if world is not None and world != world_size:
        raise ConfigMismatch(
            f"{name} was saved by {world} ranks, this run has {world_size}: resume with "
            f"--num_processes {world}, or start a new run dir", ("world_size",)
        )
    check_config_change(manifest.get("config"), config, allow_changes=allow_changes, checkpoint=str(path))
    if old_micro and old_accum and micro_batch and old_micro * old_accum != micro_batch * grad_accum:
        if not {"micro_batch", "grad_accum"} & set(allow_changes):
            raise ConfigMismatch(
                f"{name} used micro_batch*grad_accum = {old_micro}*{old_accum} samples per rank and step, "
                f"this run {micro_batch}*{grad_accum}: keep the product (exact resume) or allow "
                "it with allow_changes=('micro_batch',)", ("micro_batch", "grad_accum")
            )
    saved = manifest.get("registered", [])
    if list(saved) != list(registered):
        raise ConfigMismatch(
            f"{name} holds registered objects {saved} but this run registered {list(registered)}: "
            "register the same objects, in the same order, before `with session:`", ("registered",)
        )


# ------------------------------------------------------------------ loading
Loaded = tuple[int, str, "dict[str, Any] | None"]  # (verdict, problem, trainer state)


class FullCheck:
    """Every file's hash of checkpoint `path`, in a thread started now: the loaders and this
    read the same files at the same time, so the disk is read once and the page cache serves
    the other. result() -> (problem, code), both None when every hash matched."""

    def __init__(self, store: CheckpointStore, path: Path) -> None:
        self._found: tuple[str | None, str | None] = ("the full check did not finish", UNREADABLE_FILE)
        self._thread = threading.Thread(target=self._run, args=(store, path), name="trainsup-full-check",
                                        daemon=True)
        self._thread.start()

    def _run(self, store: CheckpointStore, path: Path) -> None:
        try:
            ckpt = store.check(path, full=True)
            self._found = (ckpt.problem, ckpt.code)
        except Exception as e:  # noqa: BLE001 - an I/O error says nothing about the content
            self._found = (f"full check failed: {one_line(e)}", UNREADABLE_FILE)

    def result(self) -> tuple[str | None, str | None]:
        self._thread.join()
        return self._found


def load_agreed(path: Path, load: Callable[[], Loaded], collectives: Collectives) -> dict[str, Any]:
    """Run `load` on every rank until every rank succeeds; returns this rank's trainer state.

    A failure here may leave the model half overwritten: every rank retries the whole load
    after a transient fault, and otherwise the run stops (resume_failed) and the supervisor
    falls back to the previous checkpoint."""
    retry = 0
    while True:
        verdict, problem, tstate = load()
        verdict = collectives.all_max([verdict])[0]  # one rank failing must stop every rank, not hang them
        if verdict == LOAD_OK:
            return tstate
        problem = problem or "loading failed on another rank"
        if verdict == LOAD_BROKEN or retry == LOAD_RETRIES:
            transient = verdict == LOAD_TRANSIENT
            raise ResumeFailed(path, problem + (f" ({LOAD_RETRIES} retries)" if transient else ""),
                               transient=transient)
        pause_s = LOAD_RETRY_PAUSE_S * 2 ** retry
        retry += 1
        log.warning("loading %s failed (%s): retry %d of %d in %.1f s", path.name, problem, retry, LOAD_RETRIES,
                    pause_s)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        time.sleep(pause_s)


def load_once(path: Path, manifest: Mapping[str, Any], *, accelerator: Any, objects: Sequence[Any], rank: int,
              trust_pickle: bool) -> Loaded:
    """Model, optimizer, scheduler and RNG through accelerate (weights_only=True), registered
    objects through safeload. Never raises: every rank's verdict goes into one collective, so
    no rank is left waiting in it."""
    files = listed_files(manifest)
    rng_file = f"random_states_{rank}.pkl"
    for needed in (rng_file, TRAINER_STATE, *(custom_file(i) for i in range(len(objects)))):
        if needed not in files:
            return LOAD_BROKEN, f"{needed} is missing (rank {rank} cannot restore its state)", None
    try:
        with open(path / TRAINER_STATE) as f:
            tstate = json.load(f)
        expected_rng = safeload.load_torch_file(path / rng_file, trust=trust_pickle)["torch_manual_seed"]
        with _without_custom_files(path) as view:
            accelerator.load_state(str(view))
        for i, obj in enumerate(objects):
            obj.load_state_dict(safeload.load_torch_file(path / custom_file(i), trust=trust_pickle))
        restored = isinstance(expected_rng, torch.Tensor) and torch.equal(torch.get_rng_state(), expected_rng)
    except Exception as e:  # noqa: BLE001
        return (LOAD_TRANSIENT if is_transient(e) else LOAD_BROKEN), f"load failed: {one_line(e)}", None
    if not restored:
        return LOAD_BROKEN, f"{rng_file} was not restored (accelerate ignored it)", None
    if not isinstance(tstate, dict):
        return LOAD_BROKEN, f"{TRAINER_STATE} is not a JSON object", None
    return LOAD_OK, "", tstate


def listed_files(manifest: Mapping[str, Any]) -> set[str]:
    """The paths a checkpoint's manifest lists (what the check verified)."""
    return {f.get("path") for f in manifest.get("files", []) if isinstance(f, dict)}


@contextlib.contextmanager
def _without_custom_files(path: Path) -> Iterator[Path]:
    """A private temporary view of checkpoint `path` (symlinks) without custom_checkpoint_<i>.pkl.

    accelerator.load_state refuses a dir whose custom_checkpoint files outnumber the objects
    registered with it, and would unpickle registered ones freely; trainsup loads them itself."""
    with tempfile.TemporaryDirectory(prefix="trainsup-load-") as tmp:
        view = Path(tmp) / path.name
        view.mkdir()
        for entry in os.scandir(path):
            if not _CUSTOM_RE.match(entry.name):
                os.symlink(os.path.abspath(entry.path), view / entry.name)
        yield view


# ------------------------------------------------------------------ the position
@dataclass(frozen=True)
class Restored:
    """What trainer_state.json puts back into the session."""

    global_step: int
    epoch: int
    skip_batches: int  # micro-batches of `epoch` each rank has consumed: skipped on the way in
    tokens_seen: int
    samples_seen: int
    best_value: float | None
    best_step: int | None
    metrics: dict[str, float]


def restore_position(path: Path, tstate: Mapping[str, Any], *, micro_batch: int | None,
                     world_size: int) -> Restored:
    """ResumeFailed for a malformed trainer_state.json; ConfigMismatch when this run's
    micro_batch*world_size cannot land on the saved position in the epoch."""
    try:
        global_step, epoch = int(tstate["global_step"]), int(tstate["epoch"])
        samples_in_epoch = int(tstate["samples_in_epoch"])
        per_batch = (micro_batch or tstate.get("micro_batch") or 1) * world_size
        epoch_complete = bool(tstate.get("epoch_complete"))
        counts = int(tstate.get("tokens_seen", 0)), int(tstate.get("samples_seen", 0))
        metrics = dict(tstate.get("metrics") or {})
        if epoch_complete:
            epoch, skip = epoch + 1, 0
        else:
            skip, rest = divmod(samples_in_epoch, per_batch)
    except (KeyError, TypeError, ValueError) as e:
        raise ResumeFailed(path, f"{TRAINER_STATE} is malformed: {one_line(e)}") from None
    if not epoch_complete and rest:
        raise ConfigMismatch(
            f"{path.name} stopped {samples_in_epoch} samples into epoch {epoch}, not a multiple of "
            f"micro_batch*world_size = {per_batch}: use a micro_batch that divides it", ("micro_batch",)
        )
    return Restored(global_step, epoch, skip, *counts, tstate.get("best_value"), tstate.get("best_step"), metrics)
