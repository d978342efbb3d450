"""A model of bench/bench_interval.py: how much the "auto" interval's prior weight matters.

    python bench/model_interval.py     # a few seconds, no training

A run of --steps steps of --step-s seconds, each save costing C seconds of training, killed
at exponential intervals (mean --mtbf-s), each relaunch costing --restart-s and losing the
steps since the last save; fixed intervals against "auto" (train_core.interval, Daly's optimum
from the measured C and M) with the prior `expected_mtbf_s` = --prior-s at several weights.
Mean goodput (the run's steps x step time / its wall) over --runs seeded runs. A model, not a
measurement: it has none of the machine's noise, which is the point (bench_interval.py's runs
differ by 10-20 % in step speed from run to run here).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_core import interval  # noqa: E402


def goodput(every: int | None, seed: int, a: argparse.Namespace, weight: float) -> float:
    """One run; `every`: a fixed interval in steps, None: "auto" with the prior at `weight`."""
    rng = random.Random(seed)
    t = up = 0.0
    done = saved = failures = 0
    attempt_start, next_kill = 0.0, rng.expovariate(1 / a.mtbf_s)
    while done < a.steps:
        if every is None:
            m = (weight * a.prior_s + up + t - attempt_start) / (weight + failures)
            steps = max(1, round(interval.optimal_interval_s(a.c_s, m) / a.step_s))
        else:
            steps = every
        n = min(steps, a.steps - done)
        if t + n * a.step_s + a.c_s < next_kill:
            t += n * a.step_s + a.c_s
            done = saved = done + n
        else:  # killed: the steps since the last save are lost, the relaunch costs restart_s
            up += next_kill - attempt_start
            t, done, failures = next_kill + a.restart_s, saved, failures + 1
            attempt_start, next_kill = t, t + rng.expovariate(1 / a.mtbf_s)
    return a.steps * a.step_s / t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--step-s", type=float, default=0.28, help="the demo's step here")
    p.add_argument("--c-s", type=float, default=0.087, help="C as bench_interval's auto runs measured it")
    p.add_argument("--mtbf-s", type=float, default=60.0)
    p.add_argument("--restart-s", type=float, default=5.0)
    p.add_argument("--prior-s", type=float, default=3600.0)
    p.add_argument("--runs", type=int, default=400)
    a = p.parse_args()
    seeds = range(a.runs)
    for every in (1, 10, 100):
        print(f"fixed {every:>3}: {statistics.mean(goodput(every, s, a, 0) for s in seeds):.3f}")
    for weight in (1.0, 0.5, 0.25, 0.1, 0.05):
        print(f"auto, prior worth {weight:g} failure(s): {statistics.mean(goodput(None, s, a, weight) for s in seeds):.3f}")


if __name__ == "__main__":
    main()
