"""Streams (IterableDataset) that resume where they stopped, without re-reading a single item.

A map-style dataset resumes by skipping sampler indices (cheap, loaders.py). A stream has no
sampler: the only generic way back to a position is to read and discard every consumed item,
which grows with the position (100k batches of 4 at 1 ms an item: ~8 minutes). A stream that
can say where it is, `state_dict()` / `load_state_dict()` (torchdata's Stateful protocol; HF
`datasets` iterable datasets have it), resumes in O(1):

- `session.prepare` builds its loader on torchdata's `StatefulDataLoader` (accelerate's
  `use_stateful_dataloader`, switched on for this loader only). That loader knows the state
  of the dataset in each worker process as of the last batch it handed out.
- accelerate's loader wrapper reads one batch ahead (a group of world_size batches ahead when
  it dispatches), so the base loader's state at a step boundary is ahead of the training.
  `Tracker` keeps the state before each read, a short deque, and a save takes the one that
  matches the batches the training consumed. (accelerate's own state_dict() for a dispatched
  stream corrects the batch counters but not the dataset's state; its save_state writes the
  state pickled, from every rank into one file: trainsup writes it itself, STATE_FILE.)
- The state is plain data (numbers, strings, lists, dicts, tensors), checked at every save,
  so a checkpoint's stream state loads with weights_only=True and cannot carry code.

Who reads a stream on several ranks: accelerate's default for an IterableDataset, dispatch.
Rank 0 reads world_size batches per step and sends each rank its slice; only rank 0's loader
has a position, saved by rank 0. With `DataLoaderConfiguration(dispatch_batches=False)` on
several ranks, accelerate's IterableDatasetShard makes every rank read the whole stream and
keep its slice; that wrapper has no state, so such a run resumes by re-reading (a warning
says so).

A stream without a position, or a checkpoint written before stream states existed, resumes
by re-reading, still exact; `reread` warns once with the count and an estimate of the time.
"""

from __future__ import annotations

import collections
import copy
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from train_core import safeload
from train_core.errors import StreamStateError

log = logging.getLogger(__name__)

STATE_FILE = "stream_state.pt"  # in a checkpoint, written by the main process
STATE_FORMAT = 1


def is_stream(dataloader: Any) -> bool:
    return isinstance(getattr(dataloader, "dataset", None), torch.utils.data.IterableDataset)


def has_position(dataset: Any) -> bool:
    """The torchdata Stateful protocol: the dataset can say where it is and go back there."""
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


def prepare(accelerator: Any, dataloader: Any) -> tuple[Any, "Tracker | None", str]:
    """accelerator.prepare_data_loader for a stream: (prepared loader, its Tracker or None,
    why it has none: it will resume by re-reading)."""
    dataset = dataloader.dataset
    config = accelerator.dataloader_config
    dispatch = True if config.dispatch_batches is None else config.dispatch_batches  # accelerate's default for a stream
    why = ""
    if not has_position(dataset):
        why = (f"{type(dataset).__name__} cannot say where it is: give it state_dict() and load_state_dict() "
               '(README, "Streams that resume")')
    elif not dispatch and accelerator.num_processes > 1:
        why = ("with dispatch_batches=False every rank reads the whole stream through accelerate's "
               "IterableDatasetShard, which has no position: leave dispatch_batches unset")
    if why:
        return accelerator.prepare_data_loader(dataloader), None, why
    before = config.use_stateful_dataloader
    config.use_stateful_dataloader = True
    try:
        with warnings.catch_warnings():  # torchdata 0.11 calls a torch API that torch 2.13 deprecates
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            prepared = accelerator.prepare_data_loader(dataloader)
    finally:
        config.use_stateful_dataloader = before
    # trainsup saves the state itself (STATE_FILE): accelerate's save_state would write every
    # rank's state into one pickled file, and staging.unsupported would refuse background saves
    prepared.use_stateful_dataloader = False
    return prepared, Tracker(prepared, lag=accelerator.num_processes if dispatch else 1), ""


class Tracker:
    """The base StatefulDataLoader's state before each of the wrapper's reads; `state()` is
    the one of the batches the training has consumed.

    accelerate's wrapper calls `_update_state_dict()` right before each read of its base
    loader and it yields a batch only after reading the next one (DataLoaderShard: one batch
    ahead; DataLoaderDispatcher: one group of num_processes ahead, on rank 0). So at a step
    boundary the state before the `lag`-th newest read is the consumed position."""

    def __init__(self, prepared: Any, *, lag: int) -> None:
        self.prepared = prepared
        self.lag = lag
        self._states: collections.deque = collections.deque(maxlen=lag)
        prepared._update_state_dict = self._snapshot  # replaces accelerate's (see the module doc)

    def _snapshot(self) -> None:
        # a copy: a dataset may hand out its live dict, which changes as it reads on
        self._states.append(copy.deepcopy(self.prepared.base_dataloader.state_dict()))

    def start_epoch(self, state: dict[str, Any] | None) -> None:
        """Before the epoch's iterator starts: forget the last epoch's states; `state` (from a
        checkpoint) makes the base loader start where that checkpoint stopped."""
        self._states.clear()
        if state is not None:
            self.prepared.base_dataloader.load_state_dict(state["loader"])

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint saves (main process): None before the loader has read `lag` times."""
        if len(self._states) < self.lag:
            return None
        return {"format": STATE_FORMAT, "loader": self._states[0]}


def check_plain(value: Any, path: tuple = ()) -> None:
    """StreamStateError naming the first value that is not plain data (what weights_only loads)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, (*path, i))
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise StreamStateError(f"{_where(path)} has a key {key!r} of type {type(key).__name__}: use str or "
                                       "int keys")
            check_plain(item, (*path, key))
        return
    if isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_quantized:
        return
    raise StreamStateError(
        f"{_where(path)} is a {type(value).__module__}.{type(value).__qualname__}: a dataset's state_dict() must "
        "return plain data (numbers, strings, lists, dicts, tensors), which a checkpoint stores without code; "
        "return what it is made of instead (a numpy Generator: rng.bit_generator.state; a numpy array: a tensor "
        "or a list; an object: a dict of its fields)")


def _where(path: tuple) -> str:
    """The dataset's own key (what its author wrote) when the path goes through one."""
    if "dataset_state" in path:
        path = path[len(path) - path[::-1].index("dataset_state"):]
        return "the stream's state_dict()" + "".join(f"[{k!r}]" for k in path)
    return "the stream loader's state" + "".join(f"[{k!r}]" for k in path)


def load(path: Path, *, trust: bool) -> dict[str, Any]:
    """A checkpoint's stream state (untrusted input: weights_only, then checked like at save)."""
    state = safeload.load_torch_file(path / STATE_FILE, trust=trust)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("loader"), dict):
        raise ValueError(f"{STATE_FILE} is not a format-{STATE_FORMAT} stream state")
    check_plain(state)
    return state


def reread(loader: Any, skip: int, *, items_per_batch: int, why: str) -> Iterator[Any]:
    """`loader`'s batches after the first `skip`, which are read and discarded, with one warning:
    how many items, about how long (from the time the first ones took), and `why` (with the fix)."""
    it = iter(loader)
    t0 = time.monotonic()
    warned = False
    for done in range(1, skip + 1):
        next(it)
        elapsed = time.monotonic() - t0
        if not warned and (elapsed >= 0.5 or done == min(skip, 64)):
            warned = True
            left_s = elapsed / done * (skip - done)
            log.warning("resuming a stream by re-reading the %d items (%d batches) it already trained on, about "
                        "%.0f s more; %s", skip * items_per_batch, skip, left_s, why)
    log.info("re-read %d batches in %.1f s", skip, time.monotonic() - t0)
    yield from it
