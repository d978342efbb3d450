"""Staging a checkpoint: the state of one step boundary copied to CPU memory, written later.

    staged = stage(accelerator, objects, scratch)     # at the step boundary (the only stall)
    ...training goes on...
    write(staged, tmp_dir, is_main=...)               # any thread: the files save_state writes

`write` produces exactly the files `accelerator.save_state` would have written at the moment of
`stage` (accelerate's own `save_accelerator_state` writes them, from the copies), plus
trainsup's registered objects (custom_checkpoint_<i>.pkl): the on-disk format does not change
and accelerate's `load_state` reads it.

What is copied: every tensor of the model, optimizer, scheduler, grad scaler and registered
objects' state dicts (to CPU; from a GPU into pinned buffers kept from save to save), the
sampler of an iterable dataset's shard, and the random number generators' states, which
accelerate reads from the global generators when it writes: they are captured here, through
accelerate's own code, into a scratch file whose bytes go into the checkpoint.

Not every setup can be staged; `unsupported(accelerator)` says why not, and those save
synchronously with `save_state` as before: FSDP, DeepSpeed, Megatron-LM and XLA (their save
is collective or sharded), a model-state pre-hook (it may edit files), a stateful DataLoader.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate.checkpointing import save_accelerator_state
from accelerate.data_loader import IterableDatasetShard
from accelerate.utils import DistributedType, RNG_STATE_NAME

STAGEABLE = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def unsupported(accelerator: Any) -> str:
    """"" when `stage` can copy this accelerator's state, else why it cannot (saves stay synchronous)."""
    if accelerator.distributed_type not in STAGEABLE:
        return f"{accelerator.distributed_type} saves its state collectively"
    if getattr(accelerator, "_save_model_state_pre_hook", None):
        return "a save_state pre-hook is registered (it may change what is written)"
    if any(getattr(dl, "use_stateful_dataloader", False) for dl in accelerator._dataloaders):
        return "a stateful DataLoader's state is read while it iterates"
    return ""


class Pinned:
    """CPU copies of GPU tensors in page-locked buffers, reused from save to save (one save is
    staged at a time: the next stage() starts after the last write() ended)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def copy(self, key: tuple, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        return buf


def snapshot(obj: Any, pinned: Pinned | None = None, key: tuple = (), memo: dict | None = None) -> Any:
    """A copy of `obj` sharing nothing with it: tensors copied to CPU, containers rebuilt, any
    other value deep-copied. Tensors that are views of the same memory (tied weights) stay one
    tensor in the copy, as safetensors expects. Call torch.cuda.synchronize() before reading
    GPU copies."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        same = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if same not in memo:
            if t.device.type == "cpu":
                memo[same] = t.clone()
            else:
                memo[same] = pinned.copy(key, t) if pinned is not None else t.to("cpu", copy=True)
        return memo[same]
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) is not dict else {}
        for k, v in obj.items():
            out[k] = snapshot(v, pinned, (*key, k), memo)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(snapshot(v, pinned, (*key, i), memo) for i, v in enumerate(obj))
    return copy.deepcopy(obj)


class _Frozen:
    """Stands in for an optimizer, scheduler or scaler: its state_dict() is the staged copy."""

    def __init__(self, state: Any) -> None:
        self._state = state

    def state_dict(self) -> Any:
        return self._state


@dataclass
class Staged:
    """One step boundary's state, in memory, owned by nobody else."""

    process_index: int
    step: int  # accelerator.step (accelerate's own counter, written into the random states)
    weights: list[Any]
    optimizers: list[_Frozen]
    schedulers: list[_Frozen]
    dataloaders: list[SimpleNamespace]
    scaler: _Frozen | None
    rng: bytes  # random_states_<rank>.pkl, as accelerate wrote it at stage time
    custom: list[Any] = field(default_factory=list)  # registered objects' state dicts (rank 0 writes them)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held (what one staged copy adds to the process's memory)."""
        seen: set[int] = set()

        def walk(obj: Any) -> int:
            if isinstance(obj, torch.Tensor):
                if id(obj) in seen:
                    return 0
                seen.add(id(obj))
                return obj.numel() * obj.element_size()
            if isinstance(obj, dict):
                return sum(walk(v) for v in obj.values())
            if isinstance(obj, (list, tuple)):
                return sum(walk(v) for v in obj)
            return 0

        return walk([self.weights, [o._state for o in self.optimizers], [s._state for s in self.schedulers],
                     self.scaler._state if self.scaler else None, self.custom])


def stage(accelerator: Any, objects: list[Any], scratch: Path, pinned: Pinned | None = None) -> Staged:
    """Copy everything save_state would write, and the registered `objects`' state dicts.
    `scratch`: a private directory for the random-state file (a few KiB)."""
    weights = [snapshot(accelerator.get_state_dict(m, unwrap=False), pinned, ("model", i))
               for i, m in enumerate(accelerator._models)]
    optimizers = [_Frozen(snapshot(o.state_dict(), pinned, ("opt", i))) for i, o in enumerate(accelerator._optimizers)]
    schedulers = [_Frozen(snapshot(s.state_dict())) for s in accelerator._schedulers]
    dataloaders = [SimpleNamespace(
        dataset=dl.dataset,
        use_stateful_dataloader=False,
        get_sampler=(lambda s=copy.deepcopy(dl.get_sampler()) if isinstance(dl.dataset, IterableDatasetShard)
                     else None: s),
    ) for dl in accelerator._dataloaders]
    scaler = _Frozen(snapshot(accelerator.scaler.state_dict())) if accelerator.scaler is not None else None
    custom = [snapshot(obj.state_dict(), pinned, ("custom", i)) for i, obj in enumerate(objects)]
    # accelerate reads the generators when it writes: let it write them now, with nothing else
    save_accelerator_state(str(scratch), [], [], [], [], accelerator.process_index, accelerator.step, None)
    rng_file = scratch / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    rng = rng_file.read_bytes()
    rng_file.unlink()
    if pinned is not None and torch.cuda.is_available():
        torch.cuda.synchronize()  # the pinned copies were queued without waiting
    return Staged(accelerator.process_index, accelerator.step, weights, optimizers, schedulers, dataloaders,
                  scaler, rng, custom)


def write(staged: Staged, tmp: Path, *, is_main: bool, custom_name: Any) -> None:
    """This rank's files of `staged` into `tmp` (the directory exists): what save_state writes,
    and on rank 0 the registered objects as `custom_name(i)`. Any thread; raises on failure."""
    save_accelerator_state(str(tmp), staged.weights, staged.optimizers, staged.schedulers, staged.dataloaders,
                           staged.process_index, staged.step, staged.scaler)
    # save_accelerator_state just wrote the generators' states of now; the staged ones replace them
    (tmp / f"{RNG_STATE_NAME}_{staged.process_index}.pkl").write_bytes(staged.rng)
    if is_main:
        for i, state in enumerate(staged.custom):
            torch.save(state, tmp / custom_name(i))


def scratch_dir() -> tempfile.TemporaryDirectory:
    """A private scratch directory for stage(): in memory (/dev/shm) where there is one."""
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(prefix="trainsup-stage-", dir=base)
