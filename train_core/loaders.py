"""DataLoaders set up for exact resume (docs/platform.md, "Exact mid-epoch resume"): a
dedicated generator reseeded per epoch, workers that ignore the stop signals, the batch size
the session expects.

Randomness inside a Dataset (augmentation) stays exact only when derived from (seed, epoch,
index): a resumed worker has not seen the skipped items, so its own RNG state differs.

Skipping the consumed part of an epoch costs O(batches) index work for map-style datasets
(the sampler yields indices, no item is loaded; ~0.1 s per 100k batches, bench/bench_save.py).
A stream (IterableDataset) has no sampler: it resumes from its saved position, or re-reads
(train_core/streams.py).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from train_core.runfiles import ENV_MICRO_BATCH
from train_core.errors import SessionError
from train_core.signals import ignore_stop_signals_worker_init

log = logging.getLogger(__name__)


def make_dataloader(dataset: Any, micro_batch: int | None, *, shuffle: bool | None,
                    **kwargs: Any) -> torch.utils.data.DataLoader:
    """batch_size = micro_batch, a dedicated generator, workers that ignore stop signals;
    shuffle None: a map-style dataset shuffled, a stream in its own order."""
    if micro_batch is None and "batch_size" not in kwargs:
        raise SessionError("session.dataloader needs TrainSession(micro_batch=...) or batch_size=...")
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if shuffle:  # torch refuses it with "expected unspecified shuffle option"
            raise SessionError(
                f"session.dataloader(shuffle=True) with a stream ({type(dataset).__name__} is an IterableDataset): "
                "a stream yields its items in its own order, so no sampler can shuffle it; shuffle inside the "
                "dataset (a seeded shuffle buffer, or shuffled shards) and leave shuffle out")
        shuffle = None
    elif shuffle is None:
        shuffle = True
    kwargs.setdefault("batch_size", micro_batch)
    kwargs.setdefault("generator", torch.Generator())
    if kwargs.get("num_workers", 0) > 0:
        kwargs["worker_init_fn"] = ignore_stop_signals_worker_init(kwargs.get("worker_init_fn"))
    return torch.utils.data.DataLoader(dataset, shuffle=shuffle, **kwargs)


def fix_dataloader(dl: Any) -> None:
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


def check_batch_size(dataloader: Any, micro_batch: int | None) -> None:
    """SessionError when the training DataLoader's batch size is not session.micro_batch."""
    batch_size = getattr(dataloader, "batch_size", None)
    if batch_size is None:  # prepared loaders carry it on their batch sampler
        batch_size = getattr(getattr(dataloader, "batch_sampler", None), "batch_size", None)
    if micro_batch is not None and batch_size is not None and batch_size != micro_batch:
        raise SessionError(
            f"the training DataLoader's batch_size is {batch_size} but session.micro_batch is "
            f"{micro_batch}{' (set by ' + ENV_MICRO_BATCH + ')' if os.environ.get(ENV_MICRO_BATCH) else ''}: "
            "build it with batch_size=session.micro_batch (or use session.dataloader(...))"
        )


def start_epoch(dataloader: Any, *, seed: int, epoch: int, rank: int) -> None:
    """Seed the sampler and the generator for `epoch`, before its iterator starts (and before
    skip_first_batches skips into it)."""
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)  # before skip_first_batches (docs/platform.md)
    generator = getattr(dataloader, "generator", None)
    if isinstance(generator, torch.Generator):
        # the worker base seed is drawn from it when the epoch's iterator starts
        generator.manual_seed((seed * 1_000_003 + epoch * 7919 + rank) % (2**63))


def shutdown_workers(dataloaders: list[Any]) -> None:
    """Stop the worker processes of these loaders' live iterators (persistent workers would
    otherwise hang sys.exit)."""
    for dl in dataloaders:
        base = getattr(dl, "base_dataloader", dl)
        it = getattr(base, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
