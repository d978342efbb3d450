"""TrainSession: a preemptible training loop around an existing `accelerate.Accelerator`.

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    session = TrainSession(accelerator, config=cfg, micro_batch=8, grad_accum=4, max_steps=5000,
                           save_every_steps=200, eval_every_steps=500)   # before building the model
    model, opt, sched = GPT(cfg), AdamW(...), LambdaLR(...)
    dl = session.dataloader(train_set, shuffle=True)                     # batch_size=session.micro_batch
    model, opt, dl, sched = session.prepare(model, opt, dl, sched)
    ema = session.register("ema", EMA(model))                            # anything with state_dict()
    with session:                                                        # resumes here
        for x, y in session.batches(dl):
            with accelerator.accumulate(model):
                loss = model(x, y); accelerator.backward(loss); opt.step(); sched.step(); opt.zero_grad()
            if accelerator.sync_gradients: ema.update(model)
            session.step_done(loss=loss, tokens=x.numel())
            if session.should_evaluate(): session.report_metrics({"val_loss": evaluate(model)})
    # leaving the block saves a "final" checkpoint; after a stop request the process exits 75

Run it plainly (`python train.py`, `accelerate launch train.py`) or under `trainsup run`. The run
dir is `run_dir=`, else $TRAINSUP_RUN_DIR, else ./runs/<script name>; checkpoints go to
$TRAINSUP_CHECKPOINT_DIR or RUN_DIR/checkpoints. resume="auto" continues from
$TRAINSUP_RESUME_FROM when set (it wins over the script's choice), else the newest valid
checkpoint, else starts fresh; "latest" requires one; a path picks one; None refuses a run dir
that already has checkpoints. Every rank calls every method (saves and metrics are collective).

What makes resume bitwise exact (facts.md "Exact resume"): set_seed before the model is built
(the constructor does it), the seedable sampler, a dedicated DataLoader generator reseeded per
epoch, set_epoch every epoch and before skip_first_batches, and saving only at an optimizer-step
boundary (accumulated gradients are never saved).

Randomness inside a Dataset (augmentation) stays exact only when derived from (seed, epoch,
index): a resumed worker has not seen the skipped items, so its own RNG state differs.

Skipping the consumed part of an epoch costs O(batches) index work for map-style datasets
(the sampler yields indices, no item is loaded; ~0.1 s per 100k batches, bench/bench_save.py).
An IterableDataset
has no sampler: skip_first_batches must READ and discard every consumed item, so resume cost
grows with the position in the epoch (facts.md: 100k batches of 4 at 1 ms/item ~ 470 s). For
streams, keep epochs short or make the dataset itself resumable.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from accelerate.data_loader import skip_first_batches
from accelerate.utils import broadcast_object_list, set_seed

from train_core.fingerprint import ConfigMismatch, canonical_config, check_config_change, fingerprint
from train_core.heartbeat import RankWatcher
from train_core.retention import Entry, RetentionPolicy, plan_retention
from train_core.runfiles import (
    ENV_ATTEMPT,
    ENV_CHECKPOINT_DIR,
    ENV_CHECKPOINT_INTERVAL_STEPS,
    ENV_GRAD_ACCUM,
    ENV_GROUP_SHARED,
    ENV_MICRO_BATCH,
    ENV_RESUME_FROM,
    ENV_RUN_DIR,
    ENV_STOP_WINDOW_S,
    ENV_SUPERVISOR_PID,
    RunPaths,
    hold_alive_lock,
    write_json_atomic,
)
from train_core import safeload
from train_core.contract import EXIT_INTERNAL, EXIT_SAVED, EXIT_USAGE, ExitKind, write_exit_report
from train_core.signals import StopFlag, ignore_stop_signals_worker_init
from train_core.store import UNREADABLE_FILE, Checkpoint, CheckpointStore, StoreError, step_dir_name

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"


def custom_file(index: int) -> str:
    """accelerate's name for the index-th registered object (kept: plain load_state users know it)."""
    return f"custom_checkpoint_{index}.pkl"


TRAINER_STATE_FORMAT = 1
PAUSE_POLL_S = 0.2
_LOAD_OK, _LOAD_TRANSIENT, _LOAD_BROKEN = 0, 1, 2  # ordered: the worst rank's verdict wins


class SessionError(Exception):
    """Misuse of the session API or a run dir it cannot use; the message names the fix."""


class ResumeFailed(Exception):
    """The checkpoint could not be restored; nothing of it was applied, or the run stops.

    `transient`: the fault says nothing about the checkpoint (out of memory, an I/O error, a
    timeout, all retried LOAD_RETRIES times): the supervisor falls back without quarantining it."""

    def __init__(self, checkpoint: str | os.PathLike, problem: str, *, transient: bool = False):
        super().__init__(f"cannot resume from {checkpoint}: {problem}")
        self.checkpoint = str(checkpoint)
        self.problem = problem
        self.transient = transient


class BadCheckpointChoice(Exception):
    """The checkpoint the user asked for (TRAINSUP_RESUME_FROM or resume=PATH, not chosen by the
    supervisor) is unusable: bad input, exit 2, no fallback to another one."""


class CheckpointSaveFailed(Exception):
    pass


class StopTraining(BaseException):
    """Raised out of the loop after the stop checkpoint is committed; the session turns it
    into exit code 75. A BaseException so a user's `except Exception` does not swallow it."""

    def __init__(self, checkpoint: Checkpoint, why: str):
        super().__init__(f"stopped on request ({why}); checkpoint {checkpoint.path}")
        self.checkpoint = checkpoint
        self.why = why


def default_run_dir() -> Path:
    """TRAINSUP_RUN_DIR, else ./runs/<script name> (relative to the working directory)."""
    env = os.environ.get(ENV_RUN_DIR)
    if env:
        return Path(env)
    stem = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] not in ("", "-c") else "run"
    return Path.cwd() / "runs" / (stem or "run")


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


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SessionError(f"{name}={raw!r} must be a positive integer (or unset)")
    return value


def _env_float(name: str) -> float | None:
    try:
        value = float(os.environ.get(name) or "nan")
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


_TRANSIENT_TEXT = ("cuda error", "nccl", "timed out", "timeout", "connection reset", "broken pipe")


def _is_transient(exc: BaseException) -> bool:
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


_CUSTOM_RE = re.compile(r"^custom_checkpoint_\d+\.pkl$")  # custom_file(i), for any i


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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()[:500]


LOW_DISK_MIB = 64  # a save failed with less free space than this: say the disk is (nearly) full
LOAD_RETRIES = 3  # a transient load error (OOM, EIO, timeout) retries the same checkpoint this often
LOAD_RETRY_PAUSE_S = 0.5  # doubled after each retry


class TrainSession:
    """See the module docstring. Every rank builds one, with the same arguments."""

    def __init__(
        self,
        accelerator: Any,
        *,
        config: Mapping[str, Any] | None = None,
        seed: int = 0,
        micro_batch: int | None = None,
        grad_accum: int | None = None,
        max_steps: int | None = None,
        max_epochs: int | None = None,
        save_every_steps: int = 0,
        eval_every_steps: int = 0,
        best_metric: str = "val_loss",
        best_mode: str = "min",
        allow_changes: Iterable[str] = (),
        run_dir: str | os.PathLike | None = None,
        resume: str | os.PathLike | None = "auto",
        retention: RetentionPolicy | None = None,
        save_final: bool = True,
    ) -> None:
        def positive(name: str, value: Any, allow_none: bool = True, low: int = 1) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise SessionError(f"TrainSession({name}=...) must be an integer >= {low}, got {value!r}")

        positive("micro_batch", micro_batch)
        positive("grad_accum", grad_accum)
        positive("max_steps", max_steps, low=0)
        positive("max_epochs", max_epochs)
        positive("save_every_steps", save_every_steps, allow_none=False, low=0)
        positive("eval_every_steps", eval_every_steps, allow_none=False, low=0)
        if best_mode not in ("min", "max"):
            raise SessionError(f'TrainSession(best_mode=...) must be "min" or "max", got {best_mode!r}')
        if max_steps is None and max_epochs is None:
            raise SessionError("TrainSession needs max_steps=N or max_epochs=N (when should training end?)")
        dl_config = getattr(accelerator, "dataloader_config", None)
        if not getattr(dl_config, "use_seedable_sampler", False):
            raise SessionError(
                "exact resume needs a seedable sampler: build the Accelerator with "
                "dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)"
            )
        if isinstance(allow_changes, str):
            allow_changes = (allow_changes,)

        self.accelerator = accelerator
        self.config = canonical_config(config)
        self.config_fingerprint = fingerprint(self.config)
        self.seed = int(seed)
        self.max_steps = max_steps
        self.max_epochs = max_epochs
        # the job file's [checkpoint] interval_steps, when the supervisor passes one, wins
        self.save_every_steps = _env_int(ENV_CHECKPOINT_INTERVAL_STEPS) or save_every_steps
        self.eval_every_steps = eval_every_steps
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.allow_changes = tuple(allow_changes)
        self.retention = retention
        self.save_final = save_final
        self.resume = resume

        # OOM recovery: the supervisor may shrink the micro-batch and grow the accumulation.
        env_micro, env_accum = _env_int(ENV_MICRO_BATCH), _env_int(ENV_GRAD_ACCUM)
        if env_micro is not None and micro_batch is None:
            raise SessionError(
                f"{ENV_MICRO_BATCH} is set but the script gives no micro_batch: pass "
                "TrainSession(micro_batch=...) and build the DataLoader with session.micro_batch"
            )
        self.micro_batch = env_micro or micro_batch
        self.grad_accum = env_accum or grad_accum or accelerator.gradient_accumulation_steps
        accelerator.gradient_accumulation_steps = self.grad_accum

        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.attempt = int(os.environ.get(ENV_ATTEMPT) or 0)
        self.paths = RunPaths(Path(run_dir) if run_dir is not None else default_run_dir())
        ckpt_env = os.environ.get(ENV_CHECKPOINT_DIR)
        self.trust_pickle = safeload.trust_pickle_from_env()
        self.store = CheckpointStore(Path(ckpt_env) if ckpt_env else self.paths.checkpoints,
                                     trust_pickle=self.trust_pickle,
                                     group_shared=os.environ.get(ENV_GROUP_SHARED) == "1")
        sup = os.environ.get(ENV_SUPERVISOR_PID)
        self.supervisor_pid = int(sup) if sup and sup.isdigit() else None

        # position and counters (all restored on resume)
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches this rank consumed in the current epoch
        self.tokens_seen = 0  # global, over all ranks, as of the last checkpoint/collective
        self.samples_seen = 0
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.metrics: dict[str, float] = {}
        self.last_checkpoint: Checkpoint | None = None
        self.resumed_from: Checkpoint | None = None

        self._names: list[str] = []
        self._objects: list[Any] = []  # registered: saved and loaded by trainsup, never unpickled freely
        self._prepared_loaders: list[Any] = []
        self._skip_batches = 0
        self._epoch_complete = False
        self._at_boundary = True
        self._pending_step_done = False
        self._pending: list[str] = []
        self._step_metrics: dict[str, float] = {}
        self._local_tokens = 0  # since the last checkpoint, this rank
        self._local_samples = 0
        self._handled_save_seq = 0
        self._entered = False
        self._state = "starting"
        self._last_loss: Any = None
        self._rate_mark = (time.monotonic(), 0, 0)
        self._rates = (None, None)

        set_seed(self.seed)  # before the model is built: a fresh run is reproducible
        self.flag = StopFlag()
        self.flag.install()
        self._write_rank_file()
        self.watcher = RankWatcher(
            self.paths,
            self.flag,
            status_fn=self._status if self.is_main else None,
            supervisor_pid=self.supervisor_pid,
            orphan_deadline_s=_env_float(ENV_STOP_WINDOW_S),
        )
        self._handled_save_seq = self.watcher.control.save_seq
        self.watcher.start()

    # ------------------------------------------------------------------ setup
    def dataloader(self, dataset: Any, *, shuffle: bool = True, **kwargs: Any) -> torch.utils.data.DataLoader:
        """A DataLoader set up for exact resume: batch_size = session.micro_batch, a dedicated
        generator, workers that ignore stop signals. kwargs go to torch's DataLoader."""
        if self.micro_batch is None and "batch_size" not in kwargs:
            raise SessionError("session.dataloader needs TrainSession(micro_batch=...) or batch_size=...")
        kwargs.setdefault("batch_size", self.micro_batch)
        kwargs.setdefault("generator", torch.Generator())
        if kwargs.get("num_workers", 0) > 0:
            kwargs["worker_init_fn"] = ignore_stop_signals_worker_init(kwargs.get("worker_init_fn"))
        return torch.utils.data.DataLoader(dataset, shuffle=shuffle, **kwargs)

    def prepare(self, *objects: Any) -> Any:
        """accelerator.prepare(...), after fixing up DataLoaders for exact resume."""
        for obj in objects:
            if isinstance(obj, torch.utils.data.DataLoader):
                self._fix_dataloader(obj)
        prepared = self.accelerator.prepare(*objects)
        seq = prepared if isinstance(prepared, tuple) else (prepared,)
        for orig, new in zip(objects, seq):
            if isinstance(orig, torch.utils.data.DataLoader):
                self._prepared_loaders.append(new)
        return prepared

    @staticmethod
    def _fix_dataloader(dl: Any) -> None:
        """Workers that ignore stop signals; a dedicated generator (without one, every new
        iterator draws its worker seed from the global RNG, shifting dropout after a resume).
        Works on a torch DataLoader before or after accelerator.prepare."""
        base = getattr(dl, "base_dataloader", dl)
        if not isinstance(base, torch.utils.data.DataLoader):
            return
        if base.generator is None:
            base.generator = torch.Generator()
        if base.num_workers > 0:
            base.worker_init_fn = ignore_stop_signals_worker_init(base.worker_init_fn)

    def register(self, name: str, obj: Any) -> Any:
        """Checkpoint `obj` (anything with state_dict/load_state_dict) under `name`."""
        if self._entered:
            raise SessionError(f"register({name!r}) must come before `with session:` (resume happens there)")
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise SessionError(f"register({name!r}, ...): the object needs state_dict() and load_state_dict()")
        if name in self._names:
            raise SessionError(f"register({name!r}, ...): that name is already registered")
        # Not accelerator.register_for_checkpointing: its load_custom_state unpickles with
        # weights_only=False. Same file names (custom_checkpoint_<i>.pkl), read safely (_resume).
        self._objects.append(obj)
        self._names.append(name)
        return obj

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "TrainSession":
        self._entered = True
        try:
            self._resume()
        except (ConfigMismatch, BadCheckpointChoice) as exc:
            # deterministic bad input: one line and exit 2, no traceback (a retry cannot help)
            message = str(exc)
            print(f"trainsup: {message}", file=sys.stderr, flush=True)
            self._state = "stopped"
            self._report_bad_input(message)
            self._teardown()
            raise SystemExit(EXIT_USAGE) from None
        except BaseException as exc:
            self._exit_with(exc)
            raise
        self._state = "training"
        self.watcher.write_status()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            try:
                if self.save_final:
                    self._save(["final", *self._pending])
                elif self._pending:
                    self._save(self._pending)
            except BaseException as e:
                self._exit_with(e)
                raise
            self._state = "finished"
            self._report_exit(ExitKind.FINISHED, 0)
            self._teardown()
            self.close()
            return False
        self._exit_with(exc)
        if isinstance(exc, StopTraining):
            raise SystemExit(EXIT_SAVED) from None
        return False

    def _exit_with(self, exc: BaseException) -> None:
        """Write ranks/exit-R.json for `exc`, stop the threads, release the workers."""
        try:
            if isinstance(exc, StopTraining):
                self._state = "stopped"
                self._report_exit(ExitKind.SAVED, EXIT_SAVED, checkpoint=exc.checkpoint.path, detail=exc.why)
            elif isinstance(exc, ResumeFailed):
                self._state = "stopped"
                self._report_exit(ExitKind.RESUME_FAILED, EXIT_INTERNAL, checkpoint=exc.checkpoint, detail=exc.problem,
                                  transient=exc.transient)
            elif is_oom(exc):
                self._state = "stopped"
                self._report_exit(ExitKind.OOM, EXIT_INTERNAL, detail=_one_line(exc))
            else:
                self._state = "stopped"
                code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else EXIT_INTERNAL
                self._report_exit(ExitKind.ERROR, code, detail=_one_line(exc))
        except Exception as e:  # noqa: BLE001 - reporting must never mask the real exception
            log.error("could not write the exit report: %s", e)
        self._teardown()

    def close(self) -> None:
        """Give the signals back (done on a normal finish). After a stop or a failure the
        handlers stay: the process is on its way out, and a late SIGTERM (the 2-rank launcher
        sends one when a peer exits) must not cut the exit report short."""
        self.watcher.stop()
        self.flag.uninstall()

    def _teardown(self) -> None:
        try:
            self.watcher.write_status()
        except Exception:  # noqa: BLE001
            pass
        self.watcher.stop()
        for dl in self._prepared_loaders:
            base = getattr(dl, "base_dataloader", dl)
            it = getattr(base, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()  # persistent workers would otherwise hang sys.exit

    # ------------------------------------------------------------------ the loop
    def batches(self, dataloader: Any) -> Iterator[Any]:
        """Yield training micro-batches from the current position to the end of training."""
        if not self._entered:
            raise SessionError("iterate session.batches(...) inside `with session:` (that is where it resumes)")
        batch_size = getattr(dataloader, "batch_size", None)
        if batch_size is None:  # prepared loaders carry it on their batch sampler
            batch_size = getattr(getattr(dataloader, "batch_sampler", None), "batch_size", None)
        if self.micro_batch is not None and batch_size is not None and batch_size != self.micro_batch:
            raise SessionError(
                f"the training DataLoader's batch_size is {batch_size} but session.micro_batch is "
                f"{self.micro_batch}{' (set by ' + ENV_MICRO_BATCH + ')' if os.environ.get(ENV_MICRO_BATCH) else ''}: "
                "build it with batch_size=session.micro_batch (or use session.dataloader(...))"
            )
        self._fix_dataloader(dataloader)
        if dataloader not in self._prepared_loaders:
            self._prepared_loaders.append(dataloader)
        if self._done():
            return
        self._boundary()  # a stop/pause that arrived during startup acts before any work
        while self.max_epochs is None or self.epoch < self.max_epochs:
            if hasattr(dataloader, "set_epoch"):
                dataloader.set_epoch(self.epoch)  # before skip_first_batches (facts.md)
            generator = getattr(dataloader, "generator", None)
            if isinstance(generator, torch.Generator):
                # the worker base seed is drawn from it when the epoch's iterator starts
                generator.manual_seed((self.seed * 1_000_003 + self.epoch * 7919 + self.rank) % (2**63))
            loader = dataloader
            if self._skip_batches:
                log.info("resuming epoch %d after %d batches", self.epoch, self._skip_batches)
                if isinstance(getattr(dataloader, "dataset", None), torch.utils.data.IterableDataset):
                    log.warning(
                        "IterableDataset: skipping %d batches reads and discards every item "
                        "(resume cost grows with the position in the epoch)", self._skip_batches
                    )
                loader = skip_first_batches(dataloader, self._skip_batches)
                self._prepared_loaders.append(loader)  # its workers are shut down on exit too
                self._skip_batches = 0
            for batch in loader:
                self._pending_step_done = True
                yield batch
                if self._pending_step_done:
                    self.step_done()
                self._end_of_iteration()
                if self._done():
                    return
            self.epoch += 1
            self.batch_in_epoch = 0
            self._epoch_complete = False

    def step_done(self, *, loss: Any = None, tokens: int | None = None, samples: int | None = None) -> None:
        """Call once per micro-batch, after the optimizer step (if any) and your EMA update."""
        if not self._pending_step_done:
            raise SessionError("step_done() was called twice for one batch, or outside session.batches()")
        self._pending_step_done = False
        if self._state == "evaluating":
            self._state = "training"
        self.batch_in_epoch += 1
        self._local_tokens += int(tokens or 0)
        self._local_samples += int(samples if samples is not None else (self.micro_batch or 0))
        if loss is not None:
            self._last_loss = loss
        if not self.accelerator.sync_gradients:
            self._at_boundary = False
            return  # mid gradient-accumulation: never save here
        self.global_step += 1
        self._at_boundary = True
        self._epoch_complete = bool(self.accelerator.gradient_state.end_of_dataloader)
        self._step_metrics = {}
        self._boundary()
        if self.save_every_steps and self.global_step % self.save_every_steps == 0:
            self._pending.append("interval")

    def should_evaluate(self) -> bool:
        due = bool(
            self._at_boundary
            and self.eval_every_steps
            and self.global_step % self.eval_every_steps == 0
            and not self._pending_step_done
        )
        if due:
            self._state = "evaluating"
        return due

    def report_metrics(self, metrics: Mapping[str, float]) -> bool:
        """Record eval metrics (call on every rank); True when `best_metric` improved, which adds a
        "best" save at this step. Rank 0's values are what count."""
        if self._state == "evaluating":
            self._state = "training"
        values = {str(k): float(v) for k, v in metrics.items()}
        if self.world_size > 1:
            box = [values]
            broadcast_object_list(box, from_process=0)
            values = box[0]
        self.metrics.update(values)
        self._step_metrics.update(values)
        value = values.get(self.best_metric)
        if value is None:
            return False
        better = self.best_value is None or (
            value < self.best_value if self.best_mode == "min" else value > self.best_value
        )
        if better:
            self.best_value, self.best_step = value, self.global_step
            self._pending.append("best")
        return better

    def request_stop(self, why: str = "requested by the script") -> None:
        """Save at the next optimizer-step boundary and exit 75 (as on SIGUSR1)."""
        self.flag.set(why)

    @property
    def samples_in_epoch(self) -> int:
        """Samples of the current epoch consumed by all ranks (nominal: full micro-batches)."""
        return self.batch_in_epoch * (self.micro_batch or 1) * self.world_size

    def _done(self) -> bool:
        return self.max_steps is not None and self.global_step >= self.max_steps

    def _end_of_iteration(self) -> None:
        # Saves wait for the end of the iteration so the eval metrics of this step go into the
        # manifest and "interval" + "best" become one checkpoint. The last step's saves merge
        # into the final save.
        if self._pending and self._at_boundary and not self._done():
            self._save(self._pending)

    # ------------------------------------------------------------------ agreement
    def _agree(self) -> tuple[bool, bool, int]:
        """[stop, pause, save_seq], MAX over ranks: every rank gets the same answer at the same step."""
        try:
            self.watcher.poll_control()
        except Exception as e:  # noqa: BLE001 - the watcher thread reads it again soon
            log.warning("could not read %s: %s", self.paths.control, e)
        local = [int(self.flag.is_set()), int(self.watcher.control.pause), int(self.watcher.control.save_seq)]
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = torch.tensor(local, dtype=torch.int64, device=self.accelerator.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            local = t.tolist()
        return bool(local[0]), bool(local[1]), int(local[2])

    def _boundary(self) -> None:
        stop, pause, seq = self._agree()
        if pause and not stop:
            self._state = "paused"
            self.watcher.write_status()
            log.info("paused at step %d (control.json)", self.global_step)
            while pause and not stop:
                time.sleep(PAUSE_POLL_S)
                self.watcher.poll_control()
                stop, pause, seq = self._agree()
            self._state = "training"
            self.watcher.write_status()
        if stop:
            why = self.flag.describe() if self.flag.is_set() else "another rank was asked to stop"
            ckpt = self._save(["preempt", *self._pending])
            raise StopTraining(ckpt, why)
        if seq > self._handled_save_seq:
            self._handled_save_seq = seq
            self._pending.append("request")

    # ------------------------------------------------------------------ saving
    def _broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _all_ok(self, ok: bool) -> bool:
        return self._all_max(0 if ok else 1) == 0

    def _all_max(self, value: int) -> int:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.accelerator.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _global_counts(self) -> tuple[int, int]:
        local = [self._local_tokens, self._local_samples]
        if self.world_size > 1:
            t = torch.tensor(local, dtype=torch.int64, device=self.accelerator.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            local = t.tolist()
        return self.tokens_seen + int(local[0]), self.samples_seen + int(local[1])

    def _save(self, reasons: list[str]) -> Checkpoint:
        """Collective: every rank calls it at the same step. Returns the committed checkpoint."""
        reasons = list(dict.fromkeys(reasons))
        reason = next((r for r in ("final", "preempt", "best", "request", "interval") if r in reasons), reasons[0])
        step = self.global_step
        previous_state, self._state = self._state, "saving"
        self.watcher.write_status()
        tokens, samples = self._global_counts()

        decision: tuple[str, str]
        if self.is_main:
            try:
                existing = self.store.check(self.store.root / step_dir_name(step), step)
                ours = {str(c.path) for c in (self.resumed_from, self.last_checkpoint) if c is not None}
                if existing.valid and str(existing.path) in ours:
                    decision = ("exists", str(existing.path))
                else:
                    if existing.valid:
                        # left by a run we did not continue (an explicit older resume point, or a
                        # checkpoint that failed to load): this run's state replaces it
                        aside = self.store.quarantine(existing, time.time(), "replaced")
                        log.warning("replacing %s, which this run did not resume from; kept as %s",
                                    existing.path.name, aside.name)
                    decision = ("new", str(self.store.begin(step)))
            except Exception as e:  # noqa: BLE001 - every rank must learn of it, not hang
                decision = ("fail", _one_line(e))
        else:
            decision = ("", "")
        decision = self._broadcast(decision)
        if decision[0] == "fail":
            raise CheckpointSaveFailed(f"cannot start checkpoint {step_dir_name(step)}: {decision[1]}")
        if decision[0] == "exists":
            # e.g. a stop right after resuming: that state is already safe on disk
            ckpt = self.store.check(Path(decision[1]), step)
            log.info("checkpoint %s already exists; not saving it again", ckpt.path.name)
            self.last_checkpoint = ckpt
            self._pending.clear()
            self._state = previous_state
            return ckpt

        tmp = Path(decision[1])
        state = self._trainer_state(tokens, samples)
        error = ""
        try:
            if self.is_main:
                tmp.mkdir(parents=True, exist_ok=True)
                with open(tmp / TRAINER_STATE, "w") as f:
                    json.dump(state, f, indent=1, sort_keys=True)
            self.accelerator.save_state(str(tmp))  # every rank writes random_states_<rank>.pkl
            if self.is_main:
                for i, obj in enumerate(self._objects):
                    torch.save(obj.state_dict(), tmp / custom_file(i))
        except Exception as e:  # noqa: BLE001
            error = _one_line(e)
        if not self._all_ok(not error):  # doubles as the barrier before the commit
            raise self._save_failed(tmp, f"saving {step_dir_name(step)} failed"
                                         f"{': ' + error if error else ' on another rank'}")

        result: tuple[str, str] = ("", "")
        if self.is_main:
            try:
                ckpt = self.store.commit(
                    tmp,
                    step,
                    epoch=self.epoch,
                    batch_in_epoch=self.batch_in_epoch,
                    reason=reason,
                    metrics=self._step_metrics,
                    config_fingerprint=self.config_fingerprint,
                    extra={
                        "reasons": reasons,
                        "samples_in_epoch": self.samples_in_epoch,
                        "epoch_complete": self._epoch_complete,
                        "world_size": self.world_size,
                        "micro_batch": self.micro_batch,
                        "grad_accum": self.grad_accum,
                        "tokens_seen": tokens,
                        "samples_seen": samples,
                        "registered": list(self._names),
                        "config": self.config,
                        "attempt": self.attempt,
                    },
                )
                result = ("ok", str(ckpt.path))
            except Exception as e:  # noqa: BLE001
                result = ("fail", _one_line(e))
        result = self._broadcast(result)
        if result[0] != "ok":
            raise self._save_failed(tmp, f"committing {step_dir_name(step)} failed: {result[1]}")
        self.tokens_seen, self.samples_seen = tokens, samples
        self._local_tokens = self._local_samples = 0
        ckpt = Checkpoint(Path(result[1]), step, {"reason": reason, "metrics": dict(self._step_metrics)})
        self.last_checkpoint = ckpt
        self._pending.clear()
        log.info("saved %s (%s)", ckpt.path.name, "+".join(reasons))
        if self.is_main:
            self._prune()
        self._state = previous_state
        self.watcher.write_status()
        return ckpt

    def _save_failed(self, tmp: Path, message: str) -> CheckpointSaveFailed:
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
            safe = self.last_checkpoint or self.resumed_from
            kept = safe.path.name if safe else "no earlier checkpoint"
            message += (f"; the disk holding {self.store.root} is full ({free_mb:.1f} MiB free): free space or "
                        f"lower [retention] keep_last, then run again ({kept} is intact)")
        return CheckpointSaveFailed(message)

    def _trainer_state(self, tokens: int, samples: int) -> dict[str, Any]:
        return {
            "format": TRAINER_STATE_FORMAT,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "epoch_complete": self._epoch_complete,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "world_size": self.world_size,
            "tokens_seen": tokens,
            "samples_seen": samples,
            "best_metric": self.best_metric,
            "best_mode": self.best_mode,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "metrics": self.metrics,
            "registered": list(self._names),
            "seed": self.seed,
            "config": self.config,
            "config_fingerprint": self.config_fingerprint,
        }

    def _prune(self) -> None:
        if self.retention is None or self.supervisor_pid is not None:
            return  # under the supervisor, retention is its job
        try:
            found = {c.step: c for c in self.store.scan()}
            plan = plan_retention(
                self.retention,
                [Entry(c.step, c.valid, c.metrics, c.reason or "") for c in found.values()],
                protected=[self.resumed_from.step] if self.resumed_from else [],
            )
            for step in plan.delete:
                self.store.remove(found[step])
                log.info("retention: removed %s", found[step].path.name)
        except (OSError, StoreError) as e:
            log.warning("retention: pruning failed (training goes on): %s", e)

    # ------------------------------------------------------------------ resume
    def _pick_checkpoint(self) -> tuple[str, Any]:
        """Rank 0: ("fresh", None) | ("ckpt", (path, manifest, problem)) | ("error", message)."""
        removed = self.store.remove_stale_tmp()
        for tmp in removed:
            log.info("removed unfinished save %s", tmp.name)
        env = os.environ.get(ENV_RESUME_FROM)
        mode = self.resume
        # Under the supervisor, TRAINSUP_RESUME_FROM is its choice (it falls back on failure);
        # otherwise a named checkpoint is the user's, and an unusable one is bad input.
        explicit = False
        if env:
            target: Path | None = Path(env)
            explicit = self.supervisor_pid is None
        elif mode in (None, "never", False):
            existing = [c for c in self.store.scan() if c.valid]
            if existing:
                return ("error", (
                    f"resume=None but {self.store.root} already holds checkpoints (newest "
                    f"{existing[-1].path.name}): use resume='auto' to continue, or a new run dir"
                ))
            return ("fresh", None)
        elif mode in ("auto", "latest"):
            latest = self.store.latest_valid()
            if latest is None:
                if mode == "latest":
                    return ("error", f"resume='latest' but {self.store.root} holds no valid checkpoint")
                return ("fresh", None)
            target = latest.path
        else:
            target = Path(mode)  # type: ignore[arg-type]
            explicit = True
        ckpt = self.store.check(target, full=True)  # every sha256 before anything is touched
        return ("ckpt", (str(target), dict(ckpt.manifest or {}), ckpt.problem, ckpt.code, explicit))

    def _resume(self) -> None:
        try:
            pick = self._pick_checkpoint() if self.is_main else ("", None)
        except Exception as e:  # noqa: BLE001
            pick = ("error", _one_line(e))
        pick = self._broadcast(pick)
        if pick[0] == "error":
            raise SessionError(pick[1])
        if pick[0] == "fresh":
            log.info("starting fresh (no checkpoint to resume)")
            return
        path_s, manifest, problem, code, explicit = pick[1]
        path = Path(path_s)
        if problem:
            if code == UNREADABLE_FILE:  # an I/O error while checking: the checkpoint may be fine
                raise ResumeFailed(path, problem, transient=True)
            if explicit:
                raise BadCheckpointChoice(f"cannot resume from {path} (asked for by name): {problem}")
            raise ResumeFailed(path, problem)
        name = path.name
        world = manifest.get("world_size")
        old_micro, old_accum = manifest.get("micro_batch"), manifest.get("grad_accum")
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (world, old_micro, old_accum)) \
                or not isinstance(manifest.get("registered", []), list):
            raise ResumeFailed(path, "manifest.json world_size/micro_batch/grad_accum/registered have the wrong type")
        if world is not None and world != self.world_size:
            raise ConfigMismatch(
                f"{name} was saved by {world} ranks, this run has {self.world_size}: resume with "
                f"--num_processes {world}, or start a new run dir", ("world_size",)
            )
        check_config_change(manifest.get("config"), self.config, allow_changes=self.allow_changes, checkpoint=str(path))
        if old_micro and old_accum and self.micro_batch and old_micro * old_accum != self.micro_batch * self.grad_accum:
            if not {"micro_batch", "grad_accum"} & set(self.allow_changes):
                raise ConfigMismatch(
                    f"{name} used micro_batch*grad_accum = {old_micro}*{old_accum} samples per rank and step, "
                    f"this run {self.micro_batch}*{self.grad_accum}: keep the product (exact resume) or allow "
                    "it with allow_changes=('micro_batch',)", ("micro_batch", "grad_accum")
                )
        registered = manifest.get("registered", [])
        if list(registered) != self._names:
            raise ConfigMismatch(
                f"{name} holds registered objects {registered} but this run registered {self._names}: "
                "register the same objects, in the same order, before `with session:`", ("registered",)
            )
        files = {f.get("path") for f in manifest.get("files", []) if isinstance(f, dict)}
        rng_file = f"random_states_{self.rank}.pkl"

        # A failure from here on may leave the model half overwritten: every rank retries the
        # whole load after a transient fault, and otherwise the run stops (resume_failed) and
        # the supervisor falls back to the previous checkpoint.
        for retry in range(LOAD_RETRIES + 1):
            verdict, problem, tstate = self._load(path, rng_file, files)
            verdict = self._all_max(verdict)  # one rank failing must stop every rank, not hang them
            if verdict == _LOAD_OK:
                break
            problem = problem or "loading failed on another rank"
            if verdict == _LOAD_BROKEN or retry == LOAD_RETRIES:
                transient = verdict == _LOAD_TRANSIENT
                raise ResumeFailed(path, problem + (f" ({LOAD_RETRIES} retries)" if transient else ""),
                                   transient=transient)
            pause_s = LOAD_RETRY_PAUSE_S * 2 ** retry
            log.warning("loading %s failed (%s): retry %d of %d in %.1f s", name, problem, retry + 1,
                        LOAD_RETRIES, pause_s)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            time.sleep(pause_s)
        # Only step % grad_accum matters to accelerate, and we saved at a boundary: 0 is exact,
        # also when OOM recovery changed grad_accum.
        self.accelerator.step = 0
        try:
            self._restore_position(tstate, name)
        except (KeyError, TypeError, ValueError) as e:
            raise ResumeFailed(path, f"{TRAINER_STATE} is malformed: {_one_line(e)}") from None
        ckpt = Checkpoint(path, self.global_step, manifest)
        self.resumed_from = self.last_checkpoint = ckpt
        log.info("resumed from %s (step %d, epoch %d, batch %d)", name, self.global_step, self.epoch, self.batch_in_epoch)

    def _load(self, path: Path, rng_file: str, files: set[Any]) -> tuple[int, str, dict[str, Any] | None]:
        """(verdict, problem, trainer state): model, optimizer, scheduler and RNG through
        accelerate (weights_only=True), registered objects through safeload. Never raises: every
        rank's verdict goes into one collective, so no rank is left waiting in it."""
        for needed in (rng_file, TRAINER_STATE, *(custom_file(i) for i in range(len(self._objects)))):
            if needed not in files:
                return _LOAD_BROKEN, f"{needed} is missing (rank {self.rank} cannot restore its state)", None
        try:
            with open(path / TRAINER_STATE) as f:
                tstate = json.load(f)
            expected_rng = safeload.load_torch_file(path / rng_file, trust=self.trust_pickle)["torch_manual_seed"]
            with _without_custom_files(path) as view:
                self.accelerator.load_state(str(view))
            for i, obj in enumerate(self._objects):
                obj.load_state_dict(safeload.load_torch_file(path / custom_file(i), trust=self.trust_pickle))
            restored = isinstance(expected_rng, torch.Tensor) and torch.equal(torch.get_rng_state(), expected_rng)
        except Exception as e:  # noqa: BLE001
            return (_LOAD_TRANSIENT if _is_transient(e) else _LOAD_BROKEN), f"load failed: {_one_line(e)}", None
        if not restored:
            return _LOAD_BROKEN, f"{rng_file} was not restored (accelerate ignored it)", None
        if not isinstance(tstate, dict):
            return _LOAD_BROKEN, f"{TRAINER_STATE} is not a JSON object", None
        return _LOAD_OK, "", tstate

    def _restore_position(self, tstate: dict[str, Any], name: str) -> None:
        self.global_step = int(tstate["global_step"])
        self.epoch = int(tstate["epoch"])
        samples_in_epoch = int(tstate["samples_in_epoch"])
        per_batch = (self.micro_batch or tstate.get("micro_batch") or 1) * self.world_size
        if tstate.get("epoch_complete"):
            self.epoch, self._skip_batches = self.epoch + 1, 0
        elif samples_in_epoch % per_batch:
            raise ConfigMismatch(
                f"{name} stopped {samples_in_epoch} samples into epoch {self.epoch}, not a multiple of "
                f"micro_batch*world_size = {per_batch}: use a micro_batch that divides it", ("micro_batch",)
            )
        else:
            self._skip_batches = samples_in_epoch // per_batch
        self.batch_in_epoch = self._skip_batches
        self.tokens_seen = int(tstate.get("tokens_seen", 0))
        self.samples_seen = int(tstate.get("samples_seen", 0))
        self.best_value = tstate.get("best_value")
        self.best_step = tstate.get("best_step")
        self.metrics = dict(tstate.get("metrics") or {})

    # ------------------------------------------------------------------ run-dir files
    def _write_rank_file(self) -> None:
        self.paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._alive_fd = hold_alive_lock(self.paths)  # held until the process exits
        try:
            os.unlink(self.paths.exit_file(self.rank))  # a report from an earlier attempt is stale
        except FileNotFoundError:
            pass
        write_json_atomic(self.paths.rank_file(self.rank), {
            "pid": os.getpid(),
            "rank": self.rank,
            "local_rank": self.accelerator.local_process_index,
            "world_size": self.world_size,
            "attempt": self.attempt,
            "host": socket.gethostname(),
            "started_at": time.time(),
        })

    def _report_bad_input(self, message: str) -> None:
        try:
            self._report_exit(ExitKind.BAD_INPUT, EXIT_USAGE, detail=message)
        except Exception as e:  # noqa: BLE001
            log.error("could not write the exit report: %s", e)

    def _report_exit(self, kind: ExitKind, code: int, *, checkpoint: Any = None, detail: str = "",
                     transient: bool = False) -> None:
        write_exit_report(self.paths, self.rank, self.attempt, kind, code, **{
            "transient": transient,
            "step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "checkpoint": str(checkpoint) if checkpoint is not None else (
                str(self.last_checkpoint.path) if self.last_checkpoint else None),
            "detail": detail,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "world_size": self.world_size,
        })

    def _status(self) -> dict[str, Any]:
        now = time.monotonic()
        t0, tok0, smp0 = self._rate_mark
        tokens, samples = self._local_tokens, self._local_samples
        if now - t0 >= 0.5:
            dt = now - t0
            # counters reset at each save; a negative delta just means "no rate this beat"
            if tokens >= tok0 and samples >= smp0:
                self._rates = ((tokens - tok0) * self.world_size / dt, (samples - smp0) * self.world_size / dt)
            self._rate_mark = (now, tokens, samples)
        loss = self._last_loss
        try:
            loss = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else (
                None if loss is None else float(loss))
        except Exception:  # noqa: BLE001
            loss = None
        last = self.last_checkpoint
        return {
            "attempt": self.attempt,
            "pid": os.getpid(),
            "state": self._state,
            "step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "max_steps": self.max_steps,
            "loss": loss if loss is not None and math.isfinite(loss) else None,
            "tokens_per_s": self._rates[0],
            "samples_per_s": self._rates[1],
            "last_checkpoint": {"step": last.step, "path": str(last.path), "reason": last.reason} if last else None,
            "metrics": {k: (v if math.isfinite(v) else None) for k, v in self.metrics.items()},
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "world_size": self.world_size,
        }
