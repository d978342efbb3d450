"""What saving and stepping cost in this run, measured by rank 0, kept in RUN_DIR/costs.json
across attempts (torch-free: the supervisor reads it to check a stop's budget).

  save_s   a synchronous save, from the step boundary to the commit (what a stop's save
           takes); until one was timed, a background save's copy plus its writer's time
  stall_s  what one periodic save kept the training loop waiting (a background save: the copy
           to memory; a synchronous one: all of it): the checkpoint cost C of the interval choice
  step_s   an optimizer step, saves left out (a running mean)
  cost_s   C, what one periodic save cost the training in all: its stall plus the time steps
           lost while its background writer shared the machine (a running mean over saves)
  interval_steps, mtbf_s, optimum_s   the "auto" interval's latest choice, from C and M

A stop's budget (train_core.session, supervisor.runner.budget) must hold one step (the stop
lands mid-step; the step finishes first) plus one save.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from train_core.runfiles import json_number, read_json, write_json_atomic

STEP_MEAN_WEIGHT = 0.1  # each new step's share of the running mean
COST_MEAN_WEIGHT = 0.2  # each new save's share of C's running mean
SAVE_MARGIN = 1.25  # a save is expected to fit when the time left is this much more than its cost...
SAVE_SLACK_S = 0.25  # ...plus this


@dataclass(frozen=True)
class Costs:
    save_s: float | None = None
    save_measured: str = ""  # "sync" or "background": how save_s was timed
    stall_s: float | None = None
    step_s: float | None = None
    cost_s: float | None = None
    interval_steps: int | None = None
    mtbf_s: float | None = None
    optimum_s: float | None = None
    updated_at: float = 0.0

    def saved(self, seconds: float, *, background: bool, keep_sync: bool = True) -> "Costs":
        """After a save that took `seconds` (a background one: the copy plus the writer).
        `keep_sync`: a synchronous timing stays (the better estimate of a stop's save); a process
        that has not timed one itself passes False, so that a figure left by an earlier attempt
        (another machine, another disk) cannot hold forever."""
        if background and keep_sync and self.save_measured == "sync":
            return self
        return replace(self, save_s=seconds, save_measured="background" if background else "sync")

    def stalled(self, seconds: float) -> "Costs":
        """After a periodic save kept the loop waiting `seconds` (waiting for the one before included)."""
        return replace(self, stall_s=seconds)

    def cost(self, seconds: float) -> "Costs":
        """One more measurement of C: a running mean (one save's drag is noisy, and the
        interval follows C: it must not jump with it)."""
        mean = seconds if self.cost_s is None else (1 - COST_MEAN_WEIGHT) * self.cost_s + COST_MEAN_WEIGHT * seconds
        return replace(self, cost_s=mean)

    def stepped(self, seconds: float) -> "Costs":
        mean = seconds if self.step_s is None else (1 - STEP_MEAN_WEIGHT) * self.step_s + STEP_MEAN_WEIGHT * seconds
        return replace(self, step_s=mean)


def save_fits(left_s: float, save_s: float | None) -> bool:
    """A save expected to take `save_s` (None: never timed, assumed to fit) within `left_s`."""
    return save_s is None or left_s >= save_s * SAVE_MARGIN + SAVE_SLACK_S


def budget_problem(budget_s: float, costs: Costs) -> str | None:
    """Why a stop with `budget_s` cannot hold one step plus one save, with the fix; None when it can
    (or when the costs are not measured yet)."""
    if costs.save_s is None or not budget_s:
        return None
    step = costs.step_s or 0.0
    if save_fits(budget_s - step, costs.save_s):
        return None
    need = (costs.save_s * SAVE_MARGIN + SAVE_SLACK_S) + step
    return (f"a stop has {budget_s:.1f} s but one step ({step:.1f} s) and one save ({costs.save_s:.1f} s, "
            f"{costs.save_measured}) need about {need:.1f} s: a stop will end without saving the steps since the "
            f"last checkpoint; give it at least {math.ceil(need)} s ([stop] grace_s, or the scheduler's warning "
            f"lead, e.g. Slurm --signal=B:USR1@{math.ceil(need) + 5}), or save more often so that less is lost")


def load(path: str | os.PathLike) -> Costs:
    """costs.json, or Costs() when it is missing or not what this module writes (never raises)."""
    obj = read_json(path) or {}
    measured = obj.get("save_measured")
    interval = obj.get("interval_steps")
    return Costs(
        save_s=json_number(obj, "save_s"),
        save_measured=measured if measured in ("sync", "background") else "",
        stall_s=json_number(obj, "stall_s"),
        step_s=json_number(obj, "step_s"),
        cost_s=json_number(obj, "cost_s"),
        interval_steps=interval if isinstance(interval, int) and not isinstance(interval, bool) and interval > 0
        else None,
        mtbf_s=json_number(obj, "mtbf_s"),
        optimum_s=json_number(obj, "optimum_s"),
        updated_at=json_number(obj, "updated_at") or 0.0,
    )


def store(path: str | os.PathLike, costs: Costs) -> Costs:
    costs = replace(costs, updated_at=time.time())
    # advisory (a lost update is re-measured at the next save): no fsync in the training loop
    write_json_atomic(path, {k: v for k, v in asdict(costs).items() if v is not None}, durable=False)
    return costs


def as_dict(costs: Costs) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(costs).items() if k != "updated_at"}
