"""Which checkpoints to keep: a pure function of a policy and what is on disk.

Rules combine as a union (docs/format.md, "Retention"): a checkpoint stays when ANY rule keeps it.
`keep_last` newest N valid, `keep_best` K best by `best_metric`, `keep_every` steps that
are multiples of M, and final saves. Never deleted, whatever the policy says: the newest
valid checkpoint, the `protected` steps (the one the current attempt resumed from), and
invalid checkpoints unless `remove_invalid` is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping

from train_core.runfiles import is_number


class RetentionError(ValueError):
    """A bad retention setting; the message names the key and the fix."""


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int = 3
    keep_best: int = 1
    best_metric: str = "val_loss"
    best_mode: Literal["min", "max"] = "min"
    keep_every: int = 0  # 0 = off
    keep_final: bool = True

    def __post_init__(self) -> None:
        def must_int(name: str, value: object, low: int, hint: str) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise RetentionError(f"[retention] {name} must be an integer >= {low}{hint}, got {value!r}")

        must_int("keep_last", self.keep_last, 1, " (the newest checkpoint is always kept)")
        must_int("keep_best", self.keep_best, 0, " (0 turns it off)")
        must_int("keep_every", self.keep_every, 0, " (0 turns it off)")
        if self.best_mode not in ("min", "max"):
            raise RetentionError(f"[retention] best_mode must be \"min\" or \"max\", got {self.best_mode!r}")
        if not isinstance(self.best_metric, str) or not self.best_metric:
            raise RetentionError(f"[retention] best_metric must be a metric name such as \"val_loss\", got {self.best_metric!r}")
        if not isinstance(self.keep_final, bool):
            raise RetentionError(f"[retention] keep_final must be true or false, got {self.keep_final!r}")


@dataclass(frozen=True)
class Entry:
    """What retention needs to know of one checkpoint."""

    step: int
    valid: bool = True
    metrics: Mapping[str, float] = field(default_factory=dict)
    reason: str = "interval"


@dataclass(frozen=True)
class RetentionPlan:
    keep: dict[int, tuple[str, ...]]  # step -> why it stays
    delete: tuple[int, ...]  # steps to remove, oldest first
    invalid: tuple[int, ...]  # invalid steps (deleted only when remove_invalid)


def plan_retention(
    policy: RetentionPolicy,
    entries: Iterable[Entry],
    *,
    protected: Iterable[int] = (),
    remove_invalid: bool = False,
) -> RetentionPlan:
    entries = sorted(entries, key=lambda e: e.step)
    valid = [e for e in entries if e.valid]
    invalid = [e for e in entries if not e.valid]
    why: dict[int, list[str]] = {}

    def keep(step: int, reason: str) -> None:
        why.setdefault(step, []).append(reason)

    for e in valid[-policy.keep_last:]:
        keep(e.step, f"keep_last={policy.keep_last}")
    if valid:
        keep(valid[-1].step, "newest valid")
    if policy.keep_best:
        scored = [e for e in valid if is_number(e.metrics.get(policy.best_metric))]
        sign = 1.0 if policy.best_mode == "min" else -1.0
        scored.sort(key=lambda e: (sign * float(e.metrics[policy.best_metric]), e.step))
        for e in scored[: policy.keep_best]:
            keep(e.step, f"best {policy.best_metric}={float(e.metrics[policy.best_metric]):.4g}")
    if policy.keep_every:
        for e in valid:
            if e.step % policy.keep_every == 0:
                keep(e.step, f"keep_every={policy.keep_every}")
    if policy.keep_final:
        for e in valid:
            if e.reason == "final":
                keep(e.step, "final")
    protected = set(protected)
    for e in entries:
        if e.step in protected:
            keep(e.step, "resume source")
    delete = [e.step for e in valid if e.step not in why]
    if remove_invalid:
        delete += [e.step for e in invalid if e.step not in why]
    return RetentionPlan(
        keep={s: tuple(r) for s, r in sorted(why.items())},
        delete=tuple(sorted(delete)),
        invalid=tuple(e.step for e in invalid),
    )
