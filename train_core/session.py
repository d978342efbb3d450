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
The main process appends each step (loss, lr, tokens/s), each report_metrics, save and pause to
RUN_DIR/metrics.jsonl (train_core/metricslog.py; write_metrics=False: not).

What makes resume bitwise exact (docs/platform.md, "Exact mid-epoch resume"): set_seed before
the model is built (the constructor does it), the seedable sampler, a dedicated DataLoader
generator reseeded per epoch, set_epoch every epoch and before skip_first_batches, and saving
only at an optimizer-step boundary (accumulated gradients are never saved).

Randomness inside a Dataset, and what skipping into an epoch costs: train_core/loaders.py. A
stream (IterableDataset) prepared with session.prepare resumes from its saved position when it
has state_dict()/load_state_dict(), else re-reads: train_core/streams.py.

The session is the loop and its lifecycle; the rest is in train_core: settings (arguments and
environment), loaders, collectives, position (what a checkpoint records), saving, resume,
reporting (the run-dir files), errors and faults.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from accelerate.data_loader import skip_first_batches
from accelerate.utils import set_seed

from train_core import costs as costing
from train_core import loaders, reporting, safeload, saving, settings, staging, streams
from train_core import resume as resuming
from train_core.collectives import Collectives
from train_core.contract import EXIT_SAVED, EXIT_USAGE, ExitKind, write_exit_report
from train_core.errors import BadCheckpointChoice, CheckpointSaveFailed, ResumeFailed, SessionError, StopTraining
from train_core.faults import is_oom, one_line
from train_core.fingerprint import ConfigMismatch, canonical_config, fingerprint
from train_core.heartbeat import RankWatcher
from train_core.metricslog import METRICS_FILE, MetricsLog
from train_core.pacing import Pacer
from train_core.position import Position, samples_in_epoch
from train_core.reporting import LossMean, RateMeter, announce_rank, exit_report_for, losses_to_floats
from train_core.retention import RetentionPolicy
from train_core.runfiles import (ENV_BACKGROUND_SAVES, ENV_GROUP_SHARED, ENV_STOP_BUDGET_S, ENV_STOP_WINDOW_S, RunPaths,
                                 is_number, node_from_env)
from train_core.saving import TRAINER_STATE, custom_file
from train_core.settings import default_run_dir
from train_core.signals import StopFlag
from train_core.store import Checkpoint

__all__ = [
    "TrainSession", "SessionError", "ResumeFailed", "BadCheckpointChoice", "CheckpointSaveFailed", "StopTraining",
    "default_run_dir", "is_oom", "custom_file", "TRAINER_STATE",
]

log = logging.getLogger(__name__)

PAUSE_POLL_S = 0.2
WRITER_EXIT_WAIT_S = 30.0  # a process ending on an error still commits the save it staged, given this long


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
        save_every_steps: int | str = 0,
        eval_every_steps: int = 0,
        best_metric: str = "val_loss",
        best_mode: str = "min",
        allow_changes: Iterable[str] = (),
        run_dir: str | os.PathLike | None = None,
        resume: str | os.PathLike | None = "auto",
        retention: RetentionPolicy | None = None,
        save_final: bool = True,
        background_saves: bool | None = None,
        write_metrics: bool = True,
    ) -> None:
        settings.check_args(accelerator, micro_batch=micro_batch, grad_accum=grad_accum, max_steps=max_steps,
                            max_epochs=max_epochs, save_every_steps=save_every_steps,
                            eval_every_steps=eval_every_steps, best_mode=best_mode)
        self.accelerator = accelerator
        self.config = canonical_config(config)
        self.config_fingerprint = fingerprint(self.config)
        self.seed = int(seed)
        self.max_steps = max_steps
        self.max_epochs = max_epochs
        # the job file's [checkpoint] interval_steps, when the supervisor passes one, wins; "auto":
        # chosen from the save cost and the failure history (train_core/pacing.py, interval.py)
        every, auto = settings.save_interval(save_every_steps)
        self.eval_every_steps = eval_every_steps
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.allow_changes = (allow_changes,) if isinstance(allow_changes, str) else tuple(allow_changes)
        self.retention = retention
        self.save_final = save_final
        self.resume = resume
        self.micro_batch, self.grad_accum = settings.batch_shape(micro_batch, grad_accum,
                                                                 accelerator.gradient_accumulation_steps)
        accelerator.gradient_accumulation_steps = self.grad_accum
        self._init_run(run_dir)
        self._init_position()
        # RUN_DIR/metrics.jsonl (train_core/metricslog.py): each optimizer step, report_metrics,
        # save and pause, written by the main process
        self._metrics_log = MetricsLog(
            self.paths.run_dir / METRICS_FILE, attempt=self.attempt, to_floats=losses_to_floats,
            group_shared=os.environ.get(ENV_GROUP_SHARED) == "1") if self.is_main and write_metrics else None
        self._saver = saving.Saver(self.store, self._collectives, accelerator, self._objects, is_main=self.is_main,
                                   attempt=self.attempt, rank=self.rank, world_size=self.world_size)
        # periodic saves ("interval", "best", "request") are written in the background unless the
        # job ([checkpoint] background), the script or the setup (staging.unsupported) says no
        self.background_saves = settings.env_bool(ENV_BACKGROUND_SAVES, background_saves)
        self._background_checked = False  # _background() has asked every rank (once)
        self.pacer = Pacer(self.paths, is_main=self.is_main, fixed_steps=every, auto=auto,
                           budget_s=settings.env_float(ENV_STOP_BUDGET_S),
                           agree=lambda v: self._collectives.all_max([v])[0])
        set_seed(self.seed)  # before the model is built: a fresh run is reproducible
        self._start_watching()
        # When this process exits, whenever and however: the interpreter's final garbage
        # collections over torch's objects take ~0.4 s, ~0.1 s with every object frozen, and
        # the supervisor waits for that after every stop (docs/platform.md, "Process exit").
        # Registered after torch's handlers, it runs before them; they all still run.
        atexit.register(gc.freeze)

    def _init_run(self, run_dir: str | os.PathLike | None) -> None:
        """Who this rank is, the run dir, the checkpoint store, the supervisor (if any)."""
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self._collectives = Collectives(self.world_size, self.accelerator.device)
        self.attempt = settings.attempt()
        # on several machines each node's files are its own (RunPaths.node); checkpoints are shared
        self.paths = RunPaths(Path(run_dir) if run_dir is not None else default_run_dir(), node=node_from_env())
        self.trust_pickle = safeload.trust_pickle_from_env()
        self.store = settings.checkpoint_store(self.paths, trust_pickle=self.trust_pickle)
        self.supervisor_pid = settings.supervisor_pid()

    def _init_position(self) -> None:
        """Position and counters (all restored on resume), and the loop's own state."""
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
        self._streams: dict[int, tuple[streams.Tracker | None, str]] = {}  # id(prepared stream loader): (tracker, why none)
        self._stream: tuple[streams.Tracker | None, str] | None = None  # session.batches' loader, when a stream
        self._stream_resume: tuple[dict[str, Any] | None, bool] = (None, False)  # (main's state, whether main has one)
        self._skip_batches = 0
        self._epoch_complete = False
        self._at_boundary = True
        self._pending_step_done = False
        self._pending: list[str] = []
        self._step_metrics: dict[str, float] = {}
        self._tokens_total = 0  # this rank, never reset (the rate meter's)
        self._samples_total = 0
        self._totals_at_save = (0, 0)  # the two above at the last checkpoint
        self._optimizers: list[Any] = []  # prepared: metrics.jsonl's lr
        self._loss_mean = LossMean()
        self._entered = False
        self._state = "starting"
        self._last_loss: Any = None
        self._rates = RateMeter(self.world_size)

    def _start_watching(self) -> None:
        """The stop signals, ranks/rank-R.json and alive.lock, the heartbeat/control thread."""
        self.flag = StopFlag()
        self.flag.install()
        self._alive_fd = announce_rank(self.paths, rank=self.rank, local_rank=self.accelerator.local_process_index,
                                       world_size=self.world_size, attempt=self.attempt)
        self.watcher = RankWatcher(
            self.paths,
            self.flag,
            # each node's first rank: its supervisor's heartbeat (one node, one writer: rank 0)
            status_fn=self._status if self.accelerator.local_process_index == 0 else None,
            supervisor_pid=self.supervisor_pid,
            orphan_deadline_s=settings.env_float(ENV_STOP_WINDOW_S),
        )
        self._handled_save_seq = self.watcher.control.save_seq
        self.watcher.start()

    # ------------------------------------------------------------------ setup
    def dataloader(self, dataset: Any, *, shuffle: bool | None = None, **kwargs: Any) -> torch.utils.data.DataLoader:
        """A DataLoader set up for exact resume: batch_size = session.micro_batch, a dedicated
        generator, workers that ignore stop signals. kwargs go to torch's DataLoader. `shuffle`:
        by default a map-style dataset is shuffled (by the seeded sampler) and a stream
        (IterableDataset) is read in its own order; session.prepare makes a stream's loader
        resumable from its position (train_core/streams.py)."""
        return loaders.make_dataloader(dataset, self.micro_batch, shuffle=shuffle, **kwargs)

    def prepare(self, *objects: Any) -> Any:
        """accelerator.prepare(...), after fixing up DataLoaders for exact resume. A stream
        (IterableDataset) with state_dict()/load_state_dict() gets a loader that resumes without
        re-reading (streams.py)."""
        for obj in objects:
            if isinstance(obj, torch.utils.data.DataLoader):
                loaders.fix_dataloader(obj)
        is_stream = [isinstance(o, torch.utils.data.DataLoader) and streams.is_stream(o) for o in objects]
        rest = [o for o, s in zip(objects, is_stream) if not s]
        done = self.accelerator.prepare(*rest) if rest else ()
        done = iter(done if isinstance(done, tuple) else (done,))
        seq = []
        for orig, stream in zip(objects, is_stream):
            if stream:
                new, tracker, why = streams.prepare(self.accelerator, orig)
                self._streams[id(new)] = (tracker, why)
            else:
                new = next(done)
            seq.append(new)
            if isinstance(orig, torch.utils.data.DataLoader):
                self._prepared_loaders.append(new)
            elif isinstance(orig, torch.optim.Optimizer):
                self._optimizers.append(new)
        return seq[0] if len(seq) == 1 else tuple(seq)

    def register(self, name: str, obj: Any) -> Any:
        """Checkpoint `obj` (anything with state_dict/load_state_dict) under `name`."""
        if self._entered:
            raise SessionError(f"register({name!r}) must come before `with session:` (resume happens there)")
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise SessionError(f"register({name!r}, ...): the object needs state_dict() and load_state_dict()")
        if name in self._names:
            raise SessionError(f"register({name!r}, ...): that name is already registered")
        # Not accelerator.register_for_checkpointing: its load_custom_state unpickles with
        # weights_only=False. Same file names (custom_checkpoint_<i>.pkl), read safely (resume.py).
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
            print(f"trainsup: {exc}", file=sys.stderr, flush=True)
            self._exit_with(exc, report=(ExitKind.BAD_INPUT, EXIT_USAGE, {"detail": str(exc)}))
            raise SystemExit(EXIT_USAGE) from None
        except BaseException as exc:
            self._exit_with(exc)
            raise
        self.pacer.last_save_step = self.global_step
        self.pacer.choose()
        self._state = "training"
        self.watcher.write_status()
        if self._metrics_log is not None:
            self._metrics_log.start(self.global_step, resumed=self.resumed_from is not None)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            try:
                if self.save_final:
                    self._save(["final", *self._pending])
                elif self._pending:
                    self._save(self._pending)
                else:  # the exit report names the checkpoint a background save is still writing
                    self._wait_for_save()
            except BaseException as e:
                self._exit_with(e)
                self._refuse_bad_stream(e)
                raise
            self._state = "finished"
            self._saver.close(0.0)  # nothing is in flight now: this ends the writer thread
            self._report_exit(ExitKind.FINISHED, 0)
            self._teardown()
            self.close()
            return False
        self._exit_with(exc)
        if isinstance(exc, StopTraining):
            raise SystemExit(EXIT_SAVED) from None
        self._refuse_bad_stream(exc)
        return False

    @staticmethod
    def _refuse_bad_stream(exc: BaseException) -> None:
        """A stream state that is not plain data is bad input: one line and exit 2, as in __enter__."""
        if isinstance(exc, streams.StreamStateError):
            print(f"trainsup: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USAGE) from None

    def _exit_with(self, exc: BaseException, report: tuple[ExitKind, int, dict[str, Any]] | None = None) -> None:
        """Write ranks/exit-R.json for `exc` (`report`: its kind, code and fields, when not the
        usual ones), stop the threads, release the workers."""
        self._state = "stopped"
        self.last_checkpoint = self._saver.close(WRITER_EXIT_WAIT_S) or self.last_checkpoint
        try:
            kind, code, fields = report or exit_report_for(exc)
            self._report_exit(kind, code, **fields)
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
        if self._metrics_log is not None:
            try:
                self._metrics_log.close()
            except Exception as e:  # noqa: BLE001 - never masks how the session ended
                log.warning("could not write %s: %s", self._metrics_log.path, e)
        self.watcher.stop()
        loaders.shutdown_workers(self._prepared_loaders)

    # ------------------------------------------------------------------ the loop
    def batches(self, dataloader: Any) -> Iterator[Any]:
        """Yield training micro-batches from the current position to the end of training."""
        if not self._entered:
            raise SessionError("iterate session.batches(...) inside `with session:` (that is where it resumes)")
        loaders.check_batch_size(dataloader, self.micro_batch)
        loaders.fix_dataloader(dataloader)
        if dataloader not in self._prepared_loaders:
            self._prepared_loaders.append(dataloader)
        if streams.is_stream(dataloader):
            self._stream = self._streams.get(id(dataloader), (
                None, "its loader was prepared without a position: prepare it with session.prepare"))
        if self._done():
            return
        self._boundary()  # a stop/pause that arrived during startup acts before any work
        while self.max_epochs is None or self.epoch < self.max_epochs:
            for batch in self._epoch_loader(dataloader):
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

    def _epoch_loader(self, dataloader: Any) -> Any:
        """The current epoch's batches; after a resume, without those already consumed: a map-
        style dataset skips sampler indices, a stream with a position starts from the saved
        one, any other stream re-reads them."""
        loaders.start_epoch(dataloader, seed=self.seed, epoch=self.epoch, rank=self.rank)
        skip, self._skip_batches = self._skip_batches, 0
        if self._stream is None:
            if not skip:
                return dataloader
            loader = skip_first_batches(dataloader, skip)
            self._prepared_loaders.append(loader)  # its workers are shut down on exit too
            return loader
        tracker, why = self._stream
        state, found = self._stream_resume if skip else (None, False)
        self._stream_resume = (None, False)
        if tracker is not None:
            tracker.start_epoch(state)
            if found:
                log.info("resuming the stream at its saved position (epoch %d, after %d batches)", self.epoch, skip)
                return dataloader
            name = self.resumed_from.path.name if self.resumed_from else "the checkpoint"
            why = f"{name} has no stream position (written before trainsup saved one): the next checkpoints will"
        if not skip:
            return dataloader
        return streams.reread(dataloader, skip, items_per_batch=(self.micro_batch or 1) * self.world_size, why=why)

    def step_done(self, *, loss: Any = None, tokens: int | None = None, samples: int | None = None) -> None:
        """Call once per micro-batch, after the optimizer step (if any) and your EMA update."""
        if not self._pending_step_done:
            raise SessionError("step_done() was called twice for one batch, or outside session.batches()")
        self._pending_step_done = False
        if self._state == "evaluating":
            self._state = "training"
        self.batch_in_epoch += 1
        self._tokens_total += int(tokens or 0)
        self._samples_total += int(samples if samples is not None else (self.micro_batch or 0))
        if loss is not None:
            self._last_loss = loss
            if self._metrics_log is not None:
                self._loss_mean.add(loss)
        if not self.accelerator.sync_gradients:
            self._at_boundary = False
            return  # mid gradient-accumulation: never save here
        self.global_step += 1
        self.pacer.stepped(writing=self._saver.in_flight is not None)
        self._rates.stepped(self._tokens_total, self._samples_total)
        if self._metrics_log is not None:
            self._metrics_log.step(self.global_step, loss=self._loss_mean.take(), lr=self._lr(),
                                   tokens_per_s=self._rates.rates()[0] if self._tokens_total else None)
        self._at_boundary = True
        self._epoch_complete = bool(self.accelerator.gradient_state.end_of_dataloader)
        self._step_metrics = {}
        self._boundary()
        if self.pacer.due(self.global_step):
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
        values = self._collectives.broadcast({str(k): float(v) for k, v in metrics.items()})
        if self._metrics_log is not None:
            self._metrics_log.metrics(self.global_step, values)
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

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Record `metrics` at the current step in metrics.jsonl, and nothing else: no best
        tracking, no collective (only the main process writes; any rank may call it). For values
        that are not report_metrics' evaluations, e.g. a baseline before the first step."""
        if self._metrics_log is not None:
            self._metrics_log.metrics(self.global_step, {str(k): v for k, v in metrics.items()})

    def request_stop(self, why: str = "requested by the script") -> None:
        """Save at the next optimizer-step boundary and exit 75 (as on SIGUSR1)."""
        self.flag.set(why)

    @property
    def samples_in_epoch(self) -> int:
        """Samples of the current epoch consumed by all ranks (nominal: full micro-batches)."""
        return samples_in_epoch(self.batch_in_epoch, self.micro_batch, self.world_size)

    def _done(self) -> bool:
        return self.max_steps is not None and self.global_step >= self.max_steps

    def _end_of_iteration(self) -> None:
        # Saves wait for the end of the iteration so the eval metrics of this step go into the
        # manifest and "interval" + "best" become one checkpoint. The last step's saves merge
        # into the final save.
        if self._pending and self._at_boundary and not self._done():
            self._save(self._pending, background=self._background())

    # ------------------------------------------------------------------ agreement
    def _agree(self) -> tuple[bool, bool, int]:
        """[stop, pause, save_seq, writing, failed], MAX over ranks: every rank gets the same
        answer at the same step. When no rank is still writing the background save in flight, its
        outcome is taken in (a failure raises on every rank; with a stop, the stop's save comes
        first). A rank whose writer failed ends rank 0's wait for its marker file."""
        try:
            self.watcher.poll_control()
        except Exception as e:  # noqa: BLE001 - the watcher thread reads it again soon
            log.warning("could not read %s: %s", self.paths.control, e)
        stop, pause, seq, writing, failed = self._collectives.all_max(
            [int(self.flag.is_set()), int(self.watcher.control.pause), int(self.watcher.control.save_seq),
             int(self._saver.running()), int(self._saver.failed_here())])
        if failed and self._saver.in_flight is not None:
            self._saver.in_flight.abandon.set()
            self._saver.in_flight.done.wait()
            writing = False
        if self._saver.in_flight is not None and not writing and not stop:
            self._wait_for_save()
        return bool(stop), bool(pause), seq

    def _background(self) -> bool:
        """Collective (at a save every rank makes): whether it is written in the background,
        decided once for the session; one rank that cannot stage makes every rank save
        synchronously (the two ways make different collectives)."""
        if self.background_saves and not self._background_checked:
            self._background_checked = True
            why = staging.unsupported(self.accelerator)
            if not self._collectives.all_ok(not why):
                log.info("saving synchronously: %s", why or "another rank cannot stage its state")
                self.background_saves = False
        return self.background_saves

    def _wait_for_save(self, *, keep_going: bool = False) -> None:
        """Collective: the background save in flight, if any, finished (waits for it). Its
        failure raises, unless `keep_going` (a stop's or the final save comes next: it is logged
        and that save is still made)."""
        job = self._saver.in_flight
        try:
            ckpt = self._saver.wait(safe=self.last_checkpoint or self.resumed_from)
        except CheckpointSaveFailed as e:
            if not keep_going:
                raise
            log.error("%s; saving step %d now", e, self.global_step)
            return
        if ckpt is not None:
            self.last_checkpoint = ckpt
            self.pacer.saved_background(job.stage_s, job.written_s)

    def _boundary(self) -> None:
        stop, pause, seq = self._agree()
        if pause and not stop:
            self._state = "paused"
            self.watcher.write_status()
            log.info("paused at step %d (control.json)", self.global_step)
            paused_at = time.monotonic()
            while pause and not stop:
                time.sleep(PAUSE_POLL_S)
                self.watcher.poll_control()
                stop, pause, seq = self._agree()
            if self._metrics_log is not None:
                self._metrics_log.pause(self.global_step, paused_s=time.monotonic() - paused_at)
            self._rates.restart()
            self._state = "training"
            self.pacer.paused()
            self.watcher.write_status()
        if stop:
            self._stop(self.flag.describe() if self.flag.is_set() else "another rank was asked to stop")
        if seq > self._handled_save_seq:
            self._handled_save_seq = seq
            self._pending.append("request")

    def _stop(self, why: str) -> None:
        """Collective: save and raise StopTraining, unless the stop's budget cannot hold the save:
        then no save starts (a save cut off by a kill is worth nothing) and the steps since the
        newest checkpoint are named as lost. A background save in flight is waited for while the
        budget lasts (its state is already in memory), then abandoned."""
        budget, left = self._stop_clock()
        if left is not None and self._saver.in_flight is not None:
            if self._collectives.all_ok(self._saver.in_flight.done.wait(max(0.0, left))):
                self._wait_for_save(keep_going=True)
            else:
                step = self._saver.in_flight.step
                self._saver.close(0.0)
                self._stop_unsaved(why, f"the background save of step {step} could not finish within the stop's "
                                        f"{budget:.1f} s")
            budget, left = self._stop_clock()
        if left is not None:
            # rank 0 keeps the measured costs (costs.json): its verdict, and the figure it used
            fits, save_s = self._collectives.broadcast(
                (costing.save_fits(left, self.pacer.costs.save_s), self.pacer.costs.save_s) if self.is_main else None)
            if not fits:
                self._stop_unsaved(why, f"{max(0.0, left):.1f} s of the stop's {budget:.1f} s were left and a save "
                                        f"takes about {save_s:.1f} s")
        raise StopTraining(self._save(["preempt", *self._pending]), why)

    def _stop_clock(self) -> tuple[float | None, float | None]:
        """Collective: (the stop's budget, the time left of it), the same on every rank: rank 0's
        budget (the job's, or control.json's when shorter; None: unbounded), counted from the
        rank that was asked first."""
        asked = self.flag.set_at
        (waited_ms,) = self._collectives.all_max([int(1000 * (time.monotonic() - asked)) if asked is not None else 0])
        budget = self._collectives.broadcast(
            self.pacer.budget(self.watcher.control.stop_budget_s) if self.is_main else None)
        return budget, None if budget is None else budget - waited_ms / 1000

    def _stop_unsaved(self, why: str, reason: str) -> None:
        last = self.last_checkpoint or self.resumed_from
        lost = self.global_step - (last.step if last is not None else 0)
        log.warning("stopping without a save: %s; the %d step(s) since %s are lost", reason, lost,
                    last.path.name if last is not None else "the start")
        raise StopTraining(last, why, unsaved=reason, lost_steps=lost)

    # ------------------------------------------------------------------ saving
    def _position(self) -> Position:
        """The one record of where the run stands, for both manifest.json and trainer_state.json.
        Collective: the token and sample counts are summed over the ranks."""
        tokens, samples = self._collectives.all_sum([self._tokens_total - self._totals_at_save[0],
                                                     self._samples_total - self._totals_at_save[1]])
        return Position(
            global_step=self.global_step,
            epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch,
            epoch_complete=self._epoch_complete,
            micro_batch=self.micro_batch,
            grad_accum=self.grad_accum,
            world_size=self.world_size,
            tokens_seen=self.tokens_seen + tokens,
            samples_seen=self.samples_seen + samples,
            registered=tuple(self._names),
            config=self.config,
            config_fingerprint=self.config_fingerprint,
        )

    def _save(self, reasons: list[str], *, background: bool = False) -> Checkpoint | None:
        """Collective: every rank calls it at the same step. Returns the committed checkpoint,
        None when it is being written in the background. Any save first waits for the one in
        flight (a stop's save comes after it: both are kept)."""
        reasons = list(dict.fromkeys(reasons))
        previous_state, self._state = self._state, "saving"
        if not background:  # a background save holds the loop a few ms: no heartbeat says "saving"
            self.watcher.write_status()
        if self._metrics_log is not None:
            self._metrics_log.flush()  # the steps before the save are on disk whatever the save does
        t_wait = time.monotonic()
        self._wait_for_save(keep_going="preempt" in reasons or "final" in reasons)
        t0 = time.monotonic()
        stream_state = self._stream_state()
        position = self._position()
        state = position.trainer_state(best_metric=self.best_metric, best_mode=self.best_mode,
                                       best_value=self.best_value, best_step=self.best_step,
                                       metrics=self.metrics, seed=self.seed)
        args = dict(reasons=reasons, metrics=self._step_metrics, ours=(self.resumed_from, self.last_checkpoint),
                    safe=self.last_checkpoint or self.resumed_from, stream_state=stream_state)
        prune = self.is_main and self.retention is not None and self.supervisor_pid is None  # else the supervisor's job
        if background:
            result = self._saver.start(position, state, after_commit=self._prune if prune else None, **args)
        else:
            result = self._saver.save(position, state, **args)
        if result is None or result[1]:
            self.tokens_seen, self.samples_seen = position.tokens_seen, position.samples_seen
            self._totals_at_save = (self._tokens_total, self._samples_total)
        now = time.monotonic()
        self.pacer.started(position.global_step, now - t_wait)
        self._rates.restart()
        if self._metrics_log is not None:
            self._metrics_log.save(position.global_step, blocked_s=now - t_wait, reasons=reasons, background=background)
        if result is not None:
            ckpt, new = result
            if new:
                self.pacer.saved_sync(now - t0, now - t_wait)
                if prune:
                    self._prune()
            self.last_checkpoint = ckpt
        self._pending.clear()
        self._state = previous_state
        if not background:
            self.watcher.write_status()
        return self.last_checkpoint if result is not None else None

    def _stream_state(self) -> dict[str, Any] | None:
        """Collective when training on a stream with a position: the main process's stream
        state; StreamStateError on every rank when it is not plain data."""
        tracker = self._stream[0] if self._stream is not None else None
        if tracker is None:
            return None
        state, problem = None, ""
        if self.is_main:
            try:
                state = tracker.state()
                streams.check_plain(state)
            except streams.StreamStateError as e:
                problem = str(e)
        problem = self._collectives.broadcast(problem)
        if problem:
            raise streams.StreamStateError(problem)
        return state

    def _prune(self, _committed: Checkpoint | None = None) -> None:
        saving.prune(self.store, self.retention, [self.resumed_from.step] if self.resumed_from else [])

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        """Where this run starts: rank 0 chooses, every rank checks, loads and agrees (resume.py)."""
        choice = self._collectives.broadcast(
            resuming.choose(self.store, self.resume, self.supervisor_pid) if self.is_main else None)
        if choice.kind == "error":
            raise SessionError(choice.message)
        if choice.kind == "fresh":
            log.info("starting fresh (no checkpoint to resume)")
            return
        restored = resuming.restore(
            choice, self._collectives, store=self.store, accelerator=self.accelerator, objects=self._objects, registered=self._names,
            rank=self.rank, world_size=self.world_size, micro_batch=self.micro_batch, grad_accum=self.grad_accum,
            config=self.config, allow_changes=self.allow_changes, trust_pickle=self.trust_pickle)
        self.global_step, self.epoch = restored.global_step, restored.epoch
        self._skip_batches = self.batch_in_epoch = restored.skip_batches
        self.tokens_seen, self.samples_seen = restored.tokens_seen, restored.samples_seen
        self.best_value, self.best_step = restored.best_value, restored.best_step
        self.metrics = restored.metrics
        self.resumed_from = self.last_checkpoint = Checkpoint(Path(choice.path), self.global_step, choice.manifest)
        self._load_stream_state(Path(choice.path), choice.manifest)
        log.info("resumed from %s (step %d, epoch %d, batch %d)", Path(choice.path).name, self.global_step,
                 self.epoch, self.batch_in_epoch)

    def _load_stream_state(self, path: Path, manifest: Mapping[str, Any]) -> None:
        """Collective: the main process reads the checkpoint's stream position, if it has one
        (a checkpoint without one, or with one it cannot use, resumes a stream by re-reading)."""
        state = None
        if self.is_main and streams.STATE_FILE in resuming.listed_files(manifest):
            try:
                state = streams.load(path, trust=self.trust_pickle)
            except Exception as e:  # noqa: BLE001 - re-reading is still exact
                log.warning("%s: its stream position is unusable (%s): a stream resumes by re-reading", path.name,
                            one_line(e))
        self._stream_resume = (state, bool(self._collectives.broadcast(state is not None if self.is_main else None)))

    # ------------------------------------------------------------------ run-dir files
    def _where(self) -> dict[str, Any]:
        """Position and batch shape as the exit report and status.json give them."""
        return {
            "step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "world_size": self.world_size,
        }

    def _report_exit(self, kind: ExitKind, code: int, *, checkpoint: Any = None, detail: str = "",
                     transient: bool = False, lost_steps: int | None = None) -> None:
        if checkpoint is None and self.last_checkpoint is not None:
            checkpoint = self.last_checkpoint.path
        write_exit_report(self.paths, self.rank, self.attempt, kind, code, **self._where(), transient=transient,
                          checkpoint=str(checkpoint) if checkpoint is not None else None, detail=detail,
                          lost_steps=lost_steps)

    def _status(self) -> dict[str, Any]:
        return reporting.status(attempt=self.attempt, state=self._state, where=self._where(), max_steps=self.max_steps,
                                loss=self._last_loss, last=self.last_checkpoint, metrics=self.metrics,
                                rates=self._rates.rates())

    def _lr(self) -> float | None:
        """The first prepared optimizer's learning rate now (a plain number only: no sync)."""
        try:
            lr = self._optimizers[0].param_groups[0]["lr"] if self._optimizers else None
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
        return float(lr) if is_number(lr) else None
