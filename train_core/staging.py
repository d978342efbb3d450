"""Staging a checkpoint: the state of one step boundary copied to CPU memory, written later.

    staged = stage(accelerator, objects, buffers)     # at the step boundary (the only stall)
    ...training goes on...
    write(staged, tmp_dir, is_main=...)               # any thread: the files save_state writes

`write` produces exactly the files `accelerator.save_state` would have written at the moment of
`stage` (accelerate's own `save_accelerator_state` writes them, from the copies), plus
trainsup's registered objects (custom_checkpoint_<i>.pkl): the on-disk format does not change
and accelerate's `load_state` reads it.

What is copied: every tensor of the model, optimizer, scheduler, grad scaler and registered
objects' state dicts (to CPU; from a GPU into pinned buffers), the sampler of an iterable
dataset's shard, and the random number generators' states, which accelerate reads from the
global generators when it writes: they are read here (rng_states). The copies go into buffers
reused from save to save: one copy of the state stays allocated on the main process (the peak
RSS of a run with background saves is one copy more); the other ranks copy only what they
write, their generators' states.

Not every setup can be staged; `unsupported(accelerator)` says why not, and those save
synchronously with `save_state` as before: FSDP, DeepSpeed, Megatron-LM and XLA (their save
is collective or sharded), a model-state pre-hook (it may edit files), a stateful DataLoader.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from accelerate.checkpointing import save_accelerator_state
from accelerate.data_loader import IterableDatasetShard
from accelerate.utils import RNG_STATE_NAME, DistributedType, get_torch_accelerator_backend, is_torch_xla_available

STAGEABLE = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def unsupported(accelerator: Any) -> str:
    """"" when `stage` can copy this accelerator's state, else why it cannot (saves stay synchronous)."""
    if is_torch_xla_available():
        return "XLA's generator state is read through torch_xla"
    if accelerator.distributed_type not in STAGEABLE:
        return f"{accelerator.distributed_type} saves its state collectively"
    if getattr(accelerator, "_save_model_state_pre_hook", None):
        return "a save_state pre-hook is registered (it may change what is written)"
    if any(getattr(dl, "use_stateful_dataloader", False) for dl in accelerator._dataloaders):
        return "a stateful DataLoader's state is read while it iterates"
    return ""


class Buffers:
    """Where the copies go: buffers kept from save to save (the next stage() starts after the
    last write() ended), so a save costs one copy, not an allocation and its page faults too.
    Copies of GPU tensors go into page-locked (pinned) buffers. One staged copy of the state
    stays allocated for the life of the session."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.nbytes = 0

    def get(self, key: tuple, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.stride() != t.stride():
            pin = t.device.type != "cpu" and torch.cuda.is_available()
            buf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, pin_memory=pin)
            old = self._buffers.get(key)
            self.nbytes += _nbytes(buf) - (_nbytes(old) if old is not None else 0)
            self._buffers[key] = buf
        return buf


_ATOMS = (int, float, bool, str, bytes, type(None))  # immutable: shared, not copied


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class _Copies:
    """The copies of one stage(), made at once at its end (one call for all CPU tensors: the
    per-call overhead matters for many small ones). Views of the same memory (tied weights)
    stay one tensor in the copy, as safetensors expects."""

    def __init__(self, buffers: Buffers) -> None:
        self.buffers = buffers
        self.memo: dict[Any, torch.Tensor] = {}
        self.sources: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def walk(self, o: Any, k: tuple) -> Any:
        """`o` rebuilt with every tensor replaced by its (not yet filled) buffer."""
        if isinstance(o, torch.Tensor):
            same = (o.data_ptr(), o.shape, o.stride(), o.dtype, o.device) if o.numel() else id(o)
            buf = self.memo.get(same)
            if buf is None:
                buf = self.memo[same] = self.buffers.get(k, o)
                self.sources.append(o)
                self.targets.append(buf)
            return buf
        if isinstance(o, dict):
            out = type(o)() if type(o) is not dict else {}
            for name, v in o.items():
                out[name] = self.walk(v, (*k, name))
            return out
        if type(o) in (list, tuple):
            if all(type(v) in _ATOMS for v in o):  # e.g. an optimizer's param indices
                return type(o)(o)
            return type(o)(self.walk(v, (*k, i)) for i, v in enumerate(o))
        return o if type(o) in _ATOMS else copy.deepcopy(o)

    def copy(self) -> None:
        with torch.no_grad():
            on_cpu = [i for i, t in enumerate(self.sources) if t.device.type == "cpu"]
            if on_cpu:
                torch._foreach_copy_([self.targets[i] for i in on_cpu], [self.sources[i] for i in on_cpu])
            for t, buf in zip(self.sources, self.targets):
                if t.device.type != "cpu":
                    buf.copy_(t, non_blocking=True)  # synchronized once, at the end of stage()


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
    rng: dict[str, Any]  # random_states_<rank>.pkl's content at stage time (rng_states)
    custom: list[Any] = field(default_factory=list)  # registered objects' state dicts (rank 0 writes them)

    nbytes: int = 0  # tensor bytes of the staging buffers (one copy of the state, kept allocated)


def stage(accelerator: Any, objects: list[Any], buffers: Buffers) -> Staged:
    """Copy everything save_state would write, and the registered `objects`' state dicts, into
    `buffers`."""
    c = _Copies(buffers)
    # save_accelerator_state writes the model, optimizer, scheduler, sampler and scaler files on
    # the main process only; the other ranks write their generators' states, so that is all they copy
    main = accelerator.is_main_process
    models, opts, scheds = (accelerator._models, accelerator._optimizers, accelerator._schedulers) if main else ([],) * 3
    weights = [c.walk(accelerator.get_state_dict(m, unwrap=False), ("model", i)) for i, m in enumerate(models)]
    optimizers = [_Frozen(c.walk(o.state_dict(), ("opt", i))) for i, o in enumerate(opts)]
    schedulers = [_Frozen(c.walk(s.state_dict(), ("sched", i))) for i, s in enumerate(scheds)]
    dataloaders = [SimpleNamespace(
        dataset=dl.dataset,
        use_stateful_dataloader=False,
        get_sampler=(lambda s=copy.deepcopy(dl.get_sampler()) if isinstance(dl.dataset, IterableDatasetShard)
                     else None: s),
    ) for dl in (accelerator._dataloaders if main else [])]
    scaler = (_Frozen(c.walk(accelerator.scaler.state_dict(), ("scaler",)))
              if main and accelerator.scaler is not None else None)
    custom = [c.walk(obj.state_dict(), ("custom", i)) for i, obj in enumerate(objects)]
    c.copy()
    rng = rng_states(accelerator)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the copies from a GPU were queued without waiting
    return Staged(accelerator.process_index, accelerator.step, weights, optimizers, schedulers, dataloaders,
                  scaler, rng, custom, buffers.nbytes)


def rng_states(accelerator: Any) -> dict[str, Any]:
    """What accelerate's save_accelerator_state puts into random_states_<rank>.pkl, read now (it
    reads the generators when it writes, and the writer writes later). The same keys as
    accelerate 1.x; a test compares this file with accelerate's own, byte for byte in content."""
    states: dict[str, Any] = {"step": accelerator.step, "random_state": random.getstate(),
                              "numpy_random_seed": np.random.get_state(), "torch_manual_seed": torch.get_rng_state()}
    device_type, device_module = get_torch_accelerator_backend()
    if device_type is not None:
        key = f"torch_{device_type}_manual_seed"
        if device_module is getattr(torch, "accelerator", None):
            states[key] = (torch.accelerator.random.get_rng_state() if hasattr(torch.accelerator, "random")
                           else torch.get_device_module(device_type).get_rng_state())
        elif device_type == "mps":
            states[key] = device_module.get_rng_state()
        else:
            states[key] = device_module.get_rng_state_all()
    return states


def write(staged: Staged, tmp: Path, *, is_main: bool, custom_name: Any) -> None:
    """This rank's files of `staged` into `tmp` (the directory exists): what save_state writes,
    and on rank 0 the registered objects as `custom_name(i)`. Any thread; raises on failure."""
    save_accelerator_state(str(tmp), staged.weights, staged.optimizers, staged.schedulers, staged.dataloaders,
                           staged.process_index, staged.step, staged.scaler)
    # save_accelerator_state just wrote the generators' states of now; the staged ones replace them
    torch.save(staged.rng, tmp / f"{RNG_STATE_NAME}_{staged.process_index}.pkl")
    if is_main:
        for i, state in enumerate(staged.custom):
            torch.save(state, tmp / custom_name(i))
