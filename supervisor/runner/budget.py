"""What the ranks measured of saving (RUN_DIR/costs.json, train_core.costs), turned into events:
a stop's budget that cannot hold one step plus one save (at start, from the costs an earlier
attempt measured, and whenever the ranks re-measure), and each new choice of the "auto"
checkpoint interval. A part of Runner, kept apart like stopping.py."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from train_core import costs as costing

if TYPE_CHECKING:
    from supervisor.config import JobConfig
    from supervisor.runner.loop import Runner

log = logging.getLogger(__name__)

RE_REPORT_CHANGE = 0.2  # a short budget is reported again when the save cost moved this much


def stop_budget_s(job: JobConfig) -> float:
    """What a stop has to save: grace_s, or [stop] budget_s when the platform gives less."""
    return min(b for b in (job.stop.grace_s, job.stop.budget_s) if b > 0)


class CostWatch:
    """Mixed into Runner: whether a stop's budget holds one step plus one save; the interval."""

    def _check_costs(self: Runner) -> None:
        c = costing.load(self.paths.costs)
        if c.updated_at == self.costs_seen:
            return
        self.costs_seen = c.updated_at
        if c.interval_steps is not None and c.interval_steps != self.interval_seen:
            self.interval_seen = c.interval_steps
            self._event("checkpoint_interval", interval_steps=c.interval_steps, cost_s=c.cost_s, mtbf_s=c.mtbf_s,
                        optimum_s=c.optimum_s, step_s=c.step_s)
        budget = stop_budget_s(self.job)
        problem = costing.budget_problem(budget, c)
        self.budget_state = {"budget_s": budget, **costing.as_dict(c), "problem": problem}
        reported = self.budget_reported
        if problem is None:
            self.budget_reported = None
            return
        if reported is not None and abs(c.save_s - reported) <= RE_REPORT_CHANGE * reported:
            return  # reported already, with about this save cost
        self.budget_reported = c.save_s
        self._event("stop_budget_short", budget_s=budget, save_s=c.save_s, step_s=c.step_s,
                    save_measured=c.save_measured, message=problem)
        log.warning("stop budget too short: %s", problem)