"""When a TrainSession saves, and whether a stop still can: the rank's side of the costs.

  Pacer.stepped        at each optimizer-step boundary: the step's time (a step taken while a
                       background save was being written adds its extra time to that save's cost)
  Pacer.due            whether a periodic save is due at this step
  Pacer.saved_*        after a save: what it cost (train_core.costs), then, with "auto", the
                       interval chosen anew (train_core.interval)
  Pacer.budget         a stop's budget (the job's, or control.json's when shorter)

Rank 0 measures and decides; its choice of interval reaches every rank through one small
collective (`agree`), so every rank saves at the same step. RUN_DIR/costs.json is rank 0's
record, rewritten at most every COSTS_WRITE_S (saves after every step must not each pay for
it), at once after a synchronous save or a new interval.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

from train_core import costs as costing
from train_core import interval
from train_core.runfiles import RunPaths
from train_core.settings import AutoInterval

log = logging.getLogger(__name__)

COSTS_WRITE_S = 5.0


class Pacer:
    def __init__(self, paths: RunPaths, *, is_main: bool, fixed_steps: int, auto: AutoInterval | None,
                 budget_s: float | None, agree: Callable[[int], int]) -> None:
        """`fixed_steps`: the interval when not "auto" (0: none); `budget_s`: the job's stop
        budget (None: a stop always saves); `agree(value)`: rank 0's value on every rank."""
        self.paths = paths
        self.is_main = is_main
        self.steps = fixed_steps
        self.auto = auto
        self.budget_s = budget_s
        self.agree = agree
        self.costs = costing.load(paths.costs) if is_main else costing.Costs()
        self.last_save_step = 0  # the step of the newest save started ("auto" counts from it)
        self._started_at = time.monotonic()
        self._written_at = -COSTS_WRITE_S
        self._last_boundary: float | None = None
        self._stalled_s = 0.0  # of the time since the last boundary, spent saving
        self._drag_s = 0.0  # steps' extra time while the save in flight was written
        self._timed_sync = False  # this process timed a synchronous save (costs.json may hold an older one)

    # -- the loop --------------------------------------------------------------
    def stepped(self, *, writing: bool) -> None:
        """At an optimizer-step boundary; `writing`: a background save was in flight meanwhile."""
        now = time.monotonic()
        if self._last_boundary is not None:
            took = max(0.0, now - self._last_boundary - self._stalled_s)
            if writing and self.costs.step_s is not None:
                self._drag_s += took - self.costs.step_s  # signed: a step's noise cancels out over the save
            else:
                self.costs = self.costs.stepped(took)
        self._last_boundary, self._stalled_s = now, 0.0

    def paused(self) -> None:
        """The loop waited (a pause): the next step's time starts at the next boundary."""
        self._last_boundary = None

    def due(self, step: int) -> bool:
        if not self.steps:
            return False
        if self.auto is not None:
            return step - self.last_save_step >= self.steps
        return step % self.steps == 0

    # -- after a save ------------------------------------------------------------
    def started(self, step: int, stall_s: float) -> None:
        """A save of `step` began and held the loop `stall_s` (a background one: it is in flight)."""
        self.last_save_step = step
        self._stalled_s += stall_s
        self.costs = self.costs.stalled(stall_s)

    def saved_sync(self, save_s: float, stall_s: float) -> None:
        """A synchronous save took `save_s` (boundary to commit); the loop waited `stall_s`."""
        self._timed_sync = True
        self._record(self.costs.saved(save_s, background=False).cost(stall_s), force=True)
        self.choose()

    def saved_background(self, stage_s: float, written_s: float) -> None:
        """A background save committed: its copy took `stage_s`, its writer `written_s`."""
        c = self.costs.saved(stage_s + written_s, background=True, keep_sync=self._timed_sync)
        stall = self.costs.stall_s if self.costs.stall_s is not None else stage_s
        # a writer cannot slow the training by more than its own time (an eval meanwhile is no drag)
        self._record(c.cost(max(0.0, stall + min(self._drag_s, written_s))))
        self._drag_s = 0.0
        self.choose()

    def choose(self) -> None:
        """Collective, "auto" only: rank 0 chooses the interval from C, the step time and M;
        every rank takes its choice. A change goes into costs.json (the supervisor's event)."""
        auto = self.auto
        if auto is None:
            return
        mine, choice = 0, None
        if self.is_main:
            c = self.costs
            if c.cost_s is None or c.step_s is None:  # not measured yet: save soon, which measures it
                mine = auto.min_steps
            else:
                current = self.steps or None
                try:
                    choice = interval.choose(c_s=c.cost_s, step_s=c.step_s, prior_s=auto.expected_mtbf_s,
                                             uptime_s=auto.uptime_s + time.monotonic() - self._started_at,
                                             failures=auto.failures, min_steps=auto.min_steps, max_s=auto.max_s)
                    mine = choice.steps if interval.worth_changing(current, choice.steps) else current
                except (ArithmeticError, ValueError) as e:  # every rank waits in agree(): never raise here
                    log.warning("checkpoint interval: keeping %s (%s)", current, e)
                    choice, mine = None, current or auto.min_steps
        steps = self.agree(mine)
        if steps == self.steps:
            return
        self.steps = steps
        log.info("checkpoint interval: %d step(s)%s", steps, f" (C {choice.c_s:.3f} s, M {choice.m_s:.0f} s)"
                 if choice else " until the save cost is measured")
        chosen = dict(mtbf_s=choice.m_s, optimum_s=choice.t_s) if choice is not None else {}
        self._record(replace(self.costs, interval_steps=steps, **chosen), force=True)

    def _record(self, costs: costing.Costs, *, force: bool = False) -> None:
        self.costs = costs
        now = time.monotonic()
        if self.is_main and (force or now - self._written_at >= COSTS_WRITE_S):
            self._written_at = now
            try:
                self.costs = costing.store(self.paths.costs, self.costs)
            except OSError as e:
                log.warning("could not write %s: %s", self.paths.costs, e)

    # -- stops -------------------------------------------------------------------
    def budget(self, control_budget_s: float) -> float | None:
        """This stop's budget: the job's, or control.json's when shorter; None: unbounded."""
        budgets = [b for b in (self.budget_s, control_budget_s) if b and b > 0]
        return min(budgets) if budgets else None
