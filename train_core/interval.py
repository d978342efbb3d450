"""The checkpoint interval chosen from the run's own numbers (`[checkpoint] interval_steps = "auto"`).

The classic optimum between saving too often (each save costs C) and too rarely (a failure
loses, on average, half an interval of work): Young (1974) T = sqrt(2 C M), refined by Daly
(2006) for a C that is not small against the mean time between failures M:

    T = sqrt(2 C M) * (1 + sqrt(C / 2M) / 3 + (C / 2M) / 9) - C      for C < 2M
    T = M                                                           otherwise

C is what one periodic save costs the training: the time the loop waited for it plus the
extra time steps took while its background writer shared the machine (train_core.costs). M
counts only unannounced ends (crash, OOM, hang, kill: a saved stop loses nothing) over the time
the run was exposed to them, with the prior `expected_mtbf_s` worth PRIOR_WEIGHT (a tenth) of
an observed failure:

    M = (w * expected_mtbf_s + uptime_s) / (w + failures),   w = PRIOR_WEIGHT

that is the inverse of the posterior mean failure rate under a Gamma prior of shape w and mean
1 / expected_mtbf_s (the rate, not M, is what the expected loss C/T + T/2M is linear in). The
prior sets M until the run has a record; from its first failure on, the run's own record
outweighs it. With a weight of one failure, a prior of 1 h held M above 400 s through eight
kills in 330 s (bench/bench_interval.py: kills every 60 s on average), three times too long an
interval; a tenth lets the record win at once and costs a calm run next to nothing (a model of
the bench: docs/platform.md, "The auto interval's prior"). uptime_s and failures are kept across attempts in
RUN_DIR/failures.json by the supervisor; the rank adds the time of its own attempt. T in
seconds becomes steps by the mean step time, bounded by a floor (`min_interval_steps`) and a
ceiling (`max_interval_s` of work at risk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RECHOOSE_CHANGE = 0.2  # a new interval replaces the current one when it differs by more than this share
PRIOR_WEIGHT = 0.1  # expected_mtbf_s counts as this many observed failures


def optimal_interval_s(c_s: float, m_s: float) -> float:
    """Daly's optimum checkpoint interval in seconds (Young's to first order)."""
    if m_s <= 0:
        return 0.0
    if c_s >= 2 * m_s:
        return m_s
    r = c_s / (2 * m_s)
    return max(0.0, math.sqrt(2 * c_s * m_s) * (1 + math.sqrt(r) / 3 + r / 9) - c_s)


def mtbf_s(prior_s: float, uptime_s: float, failures: int) -> float:
    """M from the prior (worth PRIOR_WEIGHT failures) and the failures seen over `uptime_s`."""
    return (PRIOR_WEIGHT * prior_s + max(0.0, uptime_s)) / (PRIOR_WEIGHT + max(0, failures))


@dataclass(frozen=True)
class Choice:
    steps: int
    c_s: float
    m_s: float
    t_s: float  # the optimum in seconds, before the floor and the ceiling


def choose(*, c_s: float, step_s: float, prior_s: float, uptime_s: float, failures: int, min_steps: int,
           max_s: float) -> Choice:
    """The interval in optimizer steps for save cost `c_s` and step time `step_s`."""
    m = mtbf_s(prior_s, uptime_s, failures)
    t = optimal_interval_s(c_s, m)
    ceiling = max(min_steps, math.floor(max_s / step_s)) if step_s > 0 and max_s > 0 else None
    if step_s <= 0:
        steps = min_steps
    elif math.isfinite(t):
        steps = round(t / step_s)
    else:  # an M without bound (a history of huge uptimes): as rarely as the ceiling allows
        steps = ceiling or min_steps
    steps = max(min_steps, steps if ceiling is None else min(steps, ceiling))
    return Choice(steps, c_s, m, t)


def worth_changing(current: int | None, new: int) -> bool:
    return current is None or abs(new - current) > RECHOOSE_CHANGE * current
