"""The default GPT job on this machine: tokens/s fp32 vs bf16, and command -> first training step.

    PYTHONPATH=. python bench/bench_gpt.py                     # ~4 minutes on 2 cores
    PYTHONPATH=. python bench/bench_gpt.py --steps 40 --repeats 3 --starts 5

1. Throughput. examples/gpt/train.py with the args and env of examples/gpt/job.toml, run plainly
   (one process, as the job's single rank) for --steps optimizer steps without evaluation, saves
   or sample; fp32 and bf16 alternate, --repeats times each, so both see the same machine load.
   tokens/s is the script's own figure: from the end of the first step to the last. Reported:
   the best run (the one least disturbed on a shared machine) and the median.
2. Start-up with the data cache warm (the first run of the bench prepares it). `trainsup run
   examples/gpt/job.toml` (and, for comparison, `python train.py` with the same args) with
   --save-every 1: the time from starting the command to
     - status.json appearing: the session is ready (launcher, imports, data, model, prepare);
     - the step-1 checkpoint's created_at: step 1 done (the default job's step-0 evaluation
       included) and saved; a save of this model takes ~0.05 s, so this is an upper bound.
   Then SIGTERM, which saves and exits 75. Target: under 10 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "examples" / "gpt" / "job.toml"
TRAIN = REPO / "examples" / "gpt" / "train.py"
CLI = [sys.executable, "-c", "from supervisor.cli import main; main()"]
RATE = re.compile(r"= (\d+) tokens/s")


def job_settings() -> tuple[list[str], dict[str, str], str]:
    """(args, env, precision) of the job; its "auto" as `trainsup run` resolves it for a new run here."""
    job = tomllib.loads(JOB.read_text())
    precision = job["launch"].get("mixed_precision", "no")
    if precision == "auto":
        sys.path.insert(0, str(REPO))
        from supervisor.config import load_job
        from supervisor.precision import by_hardware

        precision = by_hardware(load_job(JOB)).value
    return list(job["train"]["args"]), dict(job["train"].get("env", {})), precision


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINSUP_", "ACCELERATE_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def throughput(args: list[str], env: dict[str, str], precision: str, steps: int, work: Path) -> float:
    run_dir = work / f"tput-{precision}-{time.monotonic_ns()}"
    cmd = [sys.executable, str(TRAIN), *args, "--run-dir", str(run_dir), "--max-steps", str(steps),
           "--eval-every", "0", "--save-every", "0", "--sample-tokens", "0", "--mixed-precision", precision]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=TRAIN.parent, timeout=1800)
    shutil.rmtree(run_dir, ignore_errors=True)
    m = RATE.search(proc.stdout)
    if proc.returncode != 0 or not m:
        raise SystemExit(f"train.py failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return float(m.group(1))


def first_step(cmd: list[str], env: dict[str, str], run_dir: Path) -> tuple[float, float]:
    """(s to status.json, s to the step-1 checkpoint), from the moment the command starts."""
    t0_wall, t0 = time.time(), time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                            start_new_session=True)
    ready = None
    manifest = run_dir / "checkpoints" / "step-00000001" / "manifest.json"
    try:
        while not manifest.exists():
            if ready is None and (run_dir / "status.json").exists():
                ready = time.monotonic() - t0
            if proc.poll() is not None:
                raise SystemExit(f"{cmd[:4]}... exited {proc.returncode} before step 1")
            if time.monotonic() - t0 > 300:
                raise SystemExit("no step-1 checkpoint after 300 s")
            time.sleep(0.02)
        created = dt.datetime.fromisoformat(json.loads(manifest.read_text())["created_at"]).timestamp()
        os.kill(proc.pid, signal.SIGTERM)  # saved on request: exit 75
        proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return (ready if ready is not None else float("nan")), created - t0_wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=25, help="optimizer steps per throughput run")
    ap.add_argument("--repeats", type=int, default=3, help="throughput runs per precision (alternating)")
    ap.add_argument("--starts", type=int, default=3, help="start-up measurements per command")
    opts = ap.parse_args()

    args, env_extra, job_precision = job_settings()
    env = child_env(env_extra)
    work = Path(tempfile.mkdtemp(prefix="bench-gpt-"))
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}, job env {env_extra}, "
          f"job mixed_precision {job_precision}")
    try:
        # warm the data cache (the job's own cache dir: what a second `trainsup run` finds)
        t = time.perf_counter()
        throughput(args, env, "no", 2, work)
        print(f"warm-up run (data cache prepared if it was cold): {time.perf_counter() - t:.1f} s")

        rates: dict[str, list[float]] = {"no": [], "bf16": []}
        for _ in range(opts.repeats):
            for precision in ("no", "bf16"):
                rates[precision].append(throughput(args, env, precision, opts.steps, work))
        # best of N: on a shared machine the fastest run is the one least disturbed by others
        print(f"\nthroughput, default job, {opts.steps} steps x {opts.repeats} runs each:")
        for precision, label in (("no", "fp32"), ("bf16", "bf16")):
            r = rates[precision]
            print(f"  {label}  best {max(r):8.0f} tokens/s  median {statistics.median(r):8.0f}   "
                  f"(all: {[round(x) for x in r]})")
        print(f"  bf16 / fp32 = {max(rates['bf16']) / max(rates['no']):.2f}x (best), "
              f"{statistics.median(rates['bf16']) / statistics.median(rates['no']):.2f}x (median)")

        sets = ["--set", f"train.args={json.dumps(args + ['--save-every', '1'])}"]
        results: dict[str, list[tuple[float, float]]] = {"trainsup run": [], "python train.py": []}
        for i in range(opts.starts):
            run_dir = work / f"start-sup-{i}"
            results["trainsup run"].append(first_step([*CLI, "run", str(JOB), "--run-dir", str(run_dir), *sets],
                                                      env, run_dir))
            run_dir = work / f"start-py-{i}"
            results["python train.py"].append(first_step(
                [sys.executable, str(TRAIN), *args, "--save-every", "1", "--run-dir", str(run_dir),
                 "--mixed-precision", job_precision], env, run_dir))
        print(f"\nstart-up with the data cache warm, median of {opts.starts} (target: first step < 10 s):")
        for name, rows in results.items():
            ready = statistics.median(r[0] for r in rows)
            step1 = statistics.median(r[1] for r in rows)
            print(f"  {name:16s} session ready {ready:5.2f} s   step 1 saved {step1:5.2f} s (median), "
                  f"{min(r[1] for r in rows):5.2f} s (best)   (all: {[round(r[1], 2) for r in rows]})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
