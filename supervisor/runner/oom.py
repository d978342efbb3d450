"""The out-of-memory back-off: after an OOM exit the next attempts run a smaller micro-batch
with more gradient accumulation (the same effective batch, the same samples), passed to the
ranks as TRAINSUP_MICRO_BATCH / TRAINSUP_GRAD_ACCUM. Pure: the loop records what it returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from supervisor.events import read_events
from supervisor.watch.thermal import GpuConfig
from train_core import runfiles
from train_core.store import Checkpoint

log = logging.getLogger(__name__)


class BatchBackoff:
    """The batch shape of the next attempts: `env` (TRAINSUP_MICRO_BATCH/GRAD_ACCUM, empty for
    the script's own) and the events that change it, recorded through `record(event, **fields)`."""

    def __init__(self, cfg: GpuConfig, record: Callable[..., Any]) -> None:
        self.cfg = cfg
        self.record = record
        self.env: dict[str, str] = {}

    def after_oom(self, attempt: int, reports: list[dict[str, Any]],
                  heartbeat: dict[str, Any] | None) -> tuple[str | None, bool]:
        """(the reason to give up or None, whether the shape changed)."""
        step = after_oom(self.cfg, reports, heartbeat)
        if step is None:
            return None, False
        self.record(step.event, attempt=attempt, reason=step.reason, **step.fields)
        if step.give_up is None:
            log.warning("%s%s", "" if step.env else "out of memory, but ", step.reason)
        self.env.update(step.env)
        return step.give_up, bool(step.env)

    def restore(self, events_path: Path, resume: Checkpoint | None) -> None:
        """Keep the shape an earlier supervisor of this run dir chose (restored_shape)."""
        shape = None if self.env else restored_shape(events_path, resume)
        if shape is None:
            return
        self.env.update(shape_env(*shape))
        self.record("oom_backoff_restored", new={"micro_batch": shape[0], "grad_accum": shape[1]},
                    checkpoint=str(resume.path))
        log.info("keeping the OOM back-off of an earlier run: micro-batch %d x %d accumulation (%s was saved so)",
                 shape[0], shape[1], resume.path.name)


@dataclass(frozen=True)
class OomStep:
    """What to do after an OOM exit: `env` for the next attempts (empty: unchanged), the
    event to record, and `give_up` (the reason) when no smaller micro-batch is allowed."""

    event: str
    fields: dict[str, Any]
    reason: str
    env: dict[str, str] = field(default_factory=dict)
    give_up: str | None = None


def batch_shape(sources: Iterable[Any]) -> tuple[int, int] | None:
    """The first (micro_batch, grad_accum) of positive ints among dicts (exit reports, heartbeat)."""
    for src in sources:
        if not isinstance(src, dict):
            continue
        micro, accum = src.get("micro_batch"), src.get("grad_accum")
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (micro, accum)):
            return micro, accum
    return None


def after_oom(cfg: GpuConfig, reports: list[dict[str, Any]], heartbeat: dict[str, Any] | None) -> OomStep | None:
    """The back-off step after an attempt ran out of memory; None when [gpu] oom_recovery is off."""
    if not cfg.oom_recovery:
        return None
    shape = batch_shape([r for r in reports if r.get("kind") == "oom"] + reports + [heartbeat or {}])
    if shape is None:
        why = ("the ranks did not report their micro-batch (build the TrainSession with micro_batch=...): "
               "restarting with the same batch")
        return OomStep("oom_backoff", {"changed": False}, why)
    micro, accum = shape
    smaller = next_batch_shape(micro, accum, cfg.oom_min_micro_batch)
    if smaller is None:
        reason = oom_give_up_reason(micro, accum, cfg.oom_min_micro_batch)
        return OomStep("oom_give_up", {"micro_batch": micro, "grad_accum": accum}, reason, give_up=reason)
    new_micro, new_accum = smaller
    reason = (f"out of memory at micro-batch {micro} x {accum} accumulation: next attempts run "
              f"{new_micro} x {new_accum} (effective batch per rank {micro * accum}, unchanged)")
    return OomStep("oom_backoff", {
        "changed": True, "old": {"micro_batch": micro, "grad_accum": accum},
        "new": {"micro_batch": new_micro, "grad_accum": new_accum}, "effective_batch_per_rank": micro * accum,
    }, reason, env=shape_env(new_micro, new_accum))


def restored_shape(events_path: Path, resume: Checkpoint | None) -> tuple[int, int] | None:
    """An earlier supervisor of this run dir shrank the batch and the checkpoint we resume
    from was written with that shape: keep it (else the first attempt runs out of memory
    again). Anything else (a fresh start, another shape) starts from the script's values."""
    if resume is None:
        return None
    last = None
    for e in read_events(events_path):
        if e.get("event") == "oom_backoff" and isinstance(e.get("new"), dict):
            last = e["new"]
    shape = batch_shape([last or {}])
    m = resume.manifest or {}
    if shape is None or (m.get("micro_batch"), m.get("grad_accum")) != shape:
        return None
    return shape


def shape_env(micro_batch: int, grad_accum: int) -> dict[str, str]:
    return {runfiles.ENV_MICRO_BATCH: str(micro_batch), runfiles.ENV_GRAD_ACCUM: str(grad_accum)}


def next_batch_shape(micro_batch: int, grad_accum: int, floor: int = 1) -> tuple[int, int] | None:
    """Smaller micro-batch after a CUDA out-of-memory exit, same effective batch.

    Even micro-batch: halve it and double accumulation. Odd micro-batch: halving
    is not an integer, so take the largest micro-batch <= micro_batch // 2 that
    divides the effective batch (micro_batch * grad_accum) exactly, e.g. 5 x 2 ->
    2 x 5, 7 x 1 -> 1 x 7. The effective batch is always exactly preserved and the
    micro-batch at least halves (a shrink by one sample would likely OOM again and
    cost another restart). Returns None when no such size >= floor exists: give up.
    """
    for name, v, low in (("micro_batch", micro_batch, 1), ("grad_accum", grad_accum, 1), ("floor", floor, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    effective = micro_batch * grad_accum
    for candidate in range(micro_batch // 2, floor - 1, -1):
        if effective % candidate == 0:
            return candidate, effective // candidate
    return None


def oom_give_up_reason(micro_batch: int, grad_accum: int, floor: int = 1) -> str:
    """The one sentence for events/exit when next_batch_shape returned None."""
    return (
        f"CUDA out of memory at micro-batch {micro_batch} (x{grad_accum} accumulation), and no smaller "
        f"micro-batch >= oom_min_micro_batch {floor} divides the effective batch {micro_batch * grad_accum}: "
        "giving up; reduce the model or sequence size, or lower [gpu] oom_min_micro_batch"
    )
