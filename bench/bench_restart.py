"""Restart -> first new step: trainsup against the stock recipe, and a same-machine restart
with and without a standby rank. Side by side, alternated, medians of --repeats.

    python bench/bench_restart.py [--repeats 3] [--ranks 1,2]

cold      a run stopped by a SIGTERM to its process group, then its command run again: from
          the relaunch to the first new batch in hand (the last rank's, timestamped in the
          rank). stock: bench/stock_recipe.py under `accelerate launch`; trainsup: the same
          training under `trainsup run` (bench/goodput_common.py, fp32, CPU).
same      inside one `trainsup run`, attempt 1 crashes (bench/goodput_trainsup.py
          --crash-when) and the supervisor restarts it at once (backoff 0): from the crash to
          attempt 2's first batch. "standby": a rank that imported torch and accelerate while
          attempt 1 trained takes attempt 2 ([restart] standby = true, the default); "cold":
          standby = false. The crash comes once the standby says it is ready (logs/standby.log),
          and as long after the start without one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from goodput import HERE, REPO, prepare, read_log, tree  # noqa: E402

THREADS = os.cpu_count() or 1


def stock_argv(out: Path, ranks: int) -> tuple[list[str], dict[str, str]]:
    multi = ["--multi_gpu"] if ranks > 1 else ["--cpu"]
    argv = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(ranks),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", str(max(1, THREADS // ranks)),
            str(HERE / "stock_recipe.py"), "--out", str(out), "--steps", "100000"]
    return argv, ({"ACCELERATE_USE_CPU": "1"} if ranks > 1 else {})


def trainsup_job(out: Path, ranks: int, *, standby: bool = True, crash_when: Path | None = None) -> list[str]:
    run_dir = out / "run"
    args = ["--out", str(run_dir), "--steps", "100000"] + (["--crash-when", str(crash_when)] if crash_when else [])
    (out / "job.toml").write_text(
        f'run_dir = "{run_dir}"\n[train]\nscript = "{HERE / "goodput_trainsup.py"}"\nargs = {json.dumps(args)}\n'
        f'env = {{ OMP_NUM_THREADS = "{max(1, THREADS // ranks)}" }}\n'
        f'[launch]\nnum_processes = {ranks}\ncpu = true\nmixed_precision = "no"\n'
        f'[restart]\nbackoff_initial_s = 0.0\njitter = 0.0\nstandby = {str(standby).lower()}\n')
    return [sys.executable, "-m", "supervisor", "run", str(out / "job.toml")]


def start(argv: list[str], out: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, GOODPUT_LOG=str(out / "goodput.jsonl"), PYTHONPATH=str(REPO),
               TOKENIZERS_PARALLELISM="false", **(extra_env or {}))
    return subprocess.Popen(argv, env=env, cwd=out, stdout=open(out / "output.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_until(pred, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not pred():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def first_batches(out: Path, since: float, ranks: int) -> list[float]:
    return [e["t"] for e in read_log(out / "goodput.jsonl") if e["ev"] == "first_batch" and e["t"] >= since][:ranks]


def steps_since(out: Path, since: float) -> int:
    return sum(1 for e in read_log(out / "goodput.jsonl") if e["ev"] == "step" and e["t"] >= since)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        for p in tree(proc.pid):
            p.kill()
        proc.wait()


def cold(system: str, ranks: int, work: Path) -> float:
    out = Path(tempfile.mkdtemp(prefix=f"{system}-{ranks}-", dir=work))
    argv, extra = stock_argv(out, ranks) if system == "stock" else (trainsup_job(out, ranks), {})
    t0 = time.time()
    proc = start(argv, out, extra)
    wait_until(lambda: steps_since(out, t0) >= 30 * ranks, 300, "30 steps")  # past the first save (25)
    stop(proc)
    t1 = time.time()
    proc = start(argv, out, extra)
    wait_until(lambda: len(first_batches(out, t1, ranks)) == ranks, 300, "first batch after the relaunch")
    stop(proc)
    return max(first_batches(out, t1, ranks)) - t1


def same_machine(standby: bool, work: Path, ready_after: list[float]) -> float:
    out = Path(tempfile.mkdtemp(prefix=f"same-{standby}-", dir=work))
    flag = out / "crash-now"
    t0 = time.time()
    proc = start(trainsup_job(out, 1, standby=standby, crash_when=flag), out)
    log = out / "run" / "logs" / "standby.log"
    if standby:
        wait_until(lambda: log.exists() and "ready" in log.read_text(), 600, "the standby to be ready")
        ready_after.append(time.time() - t0)
    else:
        wait_until(lambda: time.time() - t0 >= (statistics.median(ready_after) if ready_after else 20), 600, "")
    flag.touch()
    wait_until(lambda: any(e["ev"] == "crash" for e in read_log(out / "goodput.jsonl")), 60, "the crash")
    crash = next(e["t"] for e in read_log(out / "goodput.jsonl") if e["ev"] == "crash")
    wait_until(lambda: first_batches(out, crash, 1), 120, "attempt 2's first batch")
    stop(proc)
    events = [json.loads(x) for x in (out / "run" / "events.jsonl").read_text().splitlines()]
    used = [e.get("standby") for e in events if e.get("event") == "state" and e.get("to") == "starting"]
    assert used == [False, standby], f"standby use per attempt: {used}"
    return first_batches(out, crash, 1)[0] - crash


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", default="1,2")
    args = p.parse_args()
    prepare()  # the data cache and bytecode, outside every timed run
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        work = Path(tmp)
        for ranks in [int(r) for r in args.ranks.split(",")]:
            got = {"stock": [], "trainsup": []}
            for _ in range(args.repeats):
                for system in got:
                    got[system].append(cold(system, ranks, work))
            s, t = statistics.median(got["stock"]), statistics.median(got["trainsup"])
            rows.append(f"| cold restart, {ranks} rank(s) | stock {s:.2f} s | trainsup {t:.2f} s | {t / s:.2f}x |")
            print(rows[-1], got, flush=True)
        ready: list[float] = []
        same = {True: [], False: []}
        for _ in range(args.repeats):
            for standby in (True, False):
                same[standby].append(same_machine(standby, work, ready))
        c, w = statistics.median(same[False]), statistics.median(same[True])
        rows.append(f"| same-machine restart (crash), 1 rank | cold {c:.2f} s | standby {w:.2f} s | {w / c:.2f}x |")
        print(rows[-1], same, f"standby ready {statistics.median(ready):.1f} s after the start", flush=True)
    print("\n| restart -> first new step | baseline | trainsup | ratio |\n|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
