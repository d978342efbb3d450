"""Time from PrepareForSleep(true) to the release of the logind delay lock.

Real parts: a private dbus-daemon, the fake org.freedesktop.login1 from
tests/fake_login1.py (it timestamps the moment the lock fd reaches EOF, as logind
would see it), and the real LogindWatcher with its D-Bus thread.
Simulated parts: the supervisor loop (polls every --poll-s), the ranks (they
reach the next step boundary within --step-s and commit in --commit-s), and the
supervisor noticing the commit at its next tick. Replace them with the real
runner and the demo model for the number that matters; this harness already
gives the floor (D-Bus + thread overhead) and the budget picture.

    PYTHONPATH=. python bench/bench_sleep_lock.py --trials 10 --step-s 0.127 --commit-s 0.2
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_login1 import FakeLogind, PrivateBus  # noqa: E402

from supervisor.logind import LogindConfig, LogindWatcher  # noqa: E402
from supervisor.watch import Action  # noqa: E402


def one_cycle(fake: FakeLogind, w: LogindWatcher, step: int, poll_s: float, step_s: float,
              commit_s: float, rng: random.Random, wake: threading.Event | None = None) -> tuple[float, float]:
    """Returns (release latency, the part that was not simulated work)."""
    # The loop's tick is not aligned with the signal: start at a random phase.
    time.sleep(rng.uniform(0, poll_s))
    t0 = fake.prepare_for_sleep(True)
    while True:  # the supervisor loop
        decisions = w.poll(time.monotonic())
        if any(d.action is Action.SAVE for d in decisions):
            break
        if wake is None:
            time.sleep(poll_s)
        else:  # a loop that sleeps on an Event the watcher sets (LogindWatcher(wakeup=ev.set))
            wake.wait(poll_s)
            wake.clear()
    # ranks: finish the current step (uniform position inside it), then commit
    work = rng.uniform(0, step_s) + commit_s
    time.sleep(work)
    # the supervisor sees the new checkpoint at its next tick
    time.sleep(rng.uniform(0, poll_s))
    w.on_checkpoint(step, time.monotonic())
    if not fake.wait_for(lambda f: not f.held_locks(), 10):
        raise RuntimeError("lock not released")
    latency = fake.locks[-1].released_at - t0
    fake.prepare_for_sleep(False)
    if not fake.wait_for(lambda f: len(f.held_locks()) == 1, 5):
        raise RuntimeError("lock not re-taken after wake-up")
    w.poll(time.monotonic())  # drain the NOTE
    return latency, latency - work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--poll-s", type=float, default=0.5, help="supervisor loop tick ([watch] poll_interval_s)")
    ap.add_argument("--step-s", type=float, default=0.127, help="one optimizer step (facts.md: 1.9M GPT, 127 ms)")
    ap.add_argument("--commit-s", type=float, default=0.2, help="save_state + fsync + manifest (facts.md: ~0.2 s)")
    ap.add_argument("--delay-max-s", type=float, default=5.0, help="logind InhibitDelayMaxSec")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)

    with tempfile.TemporaryDirectory() as tmp:
        bus = PrivateBus(Path(tmp))
        fake = FakeLogind(bus.address, delay_max_usec=int(a.delay_max_s * 1e6))
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
        t = time.monotonic()
        wake = threading.Event()
        w = LogindWatcher(LogindConfig(), wakeup=wake.set)
        assert w.wait_ready(5) and fake.wait_for(lambda f: len(f.held_locks()) == 1)
        connect_s = time.monotonic() - t
        try:
            # floor: commit reported as soon as the decision is seen, loop polling fast
            floor = [one_cycle(fake, w, 1000 + i, 0.001, 0.0, 0.0, rng)[0] for i in range(a.trials)]
            runs = [one_cycle(fake, w, 2000 + i, a.poll_s, a.step_s, a.commit_s, rng) for i in range(a.trials)]
            woken = [one_cycle(fake, w, 3000 + i, a.poll_s, a.step_s, a.commit_s, rng, wake)
                     for i in range(a.trials)]
        finally:
            w.close()
            fake.stop()
            bus.stop()

    lat = [r[0] for r in runs]
    overhead = [r[1] for r in runs]
    budget = w.budget_s
    ms = lambda xs: f"median {1e3 * statistics.median(xs):7.1f} ms  max {1e3 * max(xs):7.1f} ms"  # noqa: E731
    print(f"connect + Inhibit + InhibitDelayMaxUSec: {1e3 * connect_s:.1f} ms")
    print(f"floor (D-Bus signal -> decision -> on_checkpoint -> fd EOF at logind), {a.trials} trials: {ms(floor)}")
    print(f"PrepareForSleep -> release, poll {a.poll_s} s, step {a.step_s} s, commit {a.commit_s} s, "
          f"{a.trials} trials: {ms(lat)}")
    print(f"  of which not step/commit work (polling + D-Bus): {ms(overhead)}")
    print(f"same, loop woken by the watcher (wakeup=event.set): {ms([r[0] for r in woken])}")
    print(f"  worst case / budget ({budget:.1f} s = InhibitDelayMaxSec {a.delay_max_s:g} s - margin): "
          f"{max(lat) / budget:.2f} polled, {max(r[0] for r in woken) / budget:.2f} woken; "
          f"median polled/woken: {statistics.median(lat) / statistics.median(r[0] for r in woken):.2f}")


if __name__ == "__main__":
    main()
