"""Goodput under preemption: the stock Accelerate recipe and trainsup, side by side in one run.

    python bench/goodput.py            # every scenario, ~45 min on 2 cores
    python bench/goodput.py --quick    # uninterrupted + a SIGTERM every 20 s, ~5 min

Both systems train the same GPT (bench/goodput_common.py: 2,048 tokens a step, fp32, 1 rank)
with the same checkpoint interval; only how they checkpoint and resume differs:
  stock     bench/stock_recipe.py under `accelerate launch` (save_state every N steps, keep
            the last few, load_state of the highest step dir + skip_first_batches)
  trainsup  bench/goodput_trainsup.py under `trainsup run` (a TrainSession: the same
            interval, plus a save on every stop request)
Scenarios, each run until the training is done, the driver relaunching the same command
after every interruption (as a requeue or a restart script would):
  sigterm20  a SIGTERM to the process group every 20 s of wall time (spot/preemptible VMs)
  sigterm60  the same every 60 s, on a run long enough for >= 4 stops
  sigkill    SIGKILL of the whole process tree (power loss, VM kill) at times drawn from one
             seeded exponential schedule (mean 60 s), the same for both systems
goodput = the fastest uninterrupted wall time of the two systems for the same steps (each run
before and after the interrupted ones) / this wall time. "step": the run's mean step time
(steps without a save), to see how much the machine's speed drifted between runs (on a shared
VM by 10-20 % from run to run). "at equal speed": the same goodput with that drift taken out:
every run's wall less its steps trained x (its step - the ideal run's step), the ideal being
the smaller such wall of the two uninterrupted runs.
"bound": the best goodput any system that restarts cold could reach with this many stops:
ideal / (ideal + stops x floor), where the floor is what every relaunch pays before its first
batch even with no launcher, no supervisor and nothing to resume (python, import torch and
accelerate, the script's set-up: `python bench/stock_recipe.py` on an empty dir, median of 3,
measured in the same run). A SIGTERM ends every process, so no system can keep torch imported
across it.
Each interruption's cost is split into save (signal -> checkpoint committed), exit (-> the
process tree gone), restart (relaunch -> first new batch in hand, timestamped in the rank)
and recomputed steps (trained before the interruption, lost with it). "bitwise": the final
weights equal this system's uninterrupted run's. "person": how often the driver had to step
in as a person would (a process that exits on its own without finishing, e.g. load_state on
a half-written step dir: the newest step dir is deleted and the command run again).

Caveat: a SIGKILL leaves the page cache alone; a real power loss does not. The stock recipe
does not fsync, so after a real one its newest checkpoints may be empty files; trainsup's
commits are durable. This bench cannot show that difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SYSTEMS = ("stock", "trainsup")


@dataclass
class Interruption:
    kind: str  # "sigterm" | "sigkill"
    t: float
    save_s: float = 0.0
    exit_s: float = 0.0
    restart_s: float = 0.0
    recomputed_steps: int = 0


@dataclass
class Result:
    system: str
    scenario: str
    steps: int
    wall_s: float
    launches: int
    interruptions: list[Interruption] = field(default_factory=list)
    person: int = 0
    digest: str = ""
    step_s: float = 0.0  # mean time of a step without a save
    finished: bool = False

    @property
    def trained_steps(self) -> int:
        return self.steps + sum(i.recomputed_steps for i in self.interruptions)


# ---------------------------------------------------------------------------------- running
def child_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1), TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(REPO))


def prepare() -> None:
    """Outside every timed run: the data cache, and bytecode for this repo's modules, as an
    installed package has (PYTHONDONTWRITEBYTECODE would otherwise make every start of both
    systems compile their scripts, and trainsup's supervisor and train_core, from source)."""
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from goodput_common "
                    "import build, parse_args; build(parse_args(['--out', '.']))", str(HERE)], check=True,
                   env=child_env())
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(REPO / d) for d in
                    ("supervisor", "train_core", "examples", "bench"))], check=True, stdout=subprocess.DEVNULL)


def command(system: str, out: Path, steps: int, save_every: int, job_extra: str = "") -> list[str]:
    args = ["--steps", str(steps), "--save-every", str(save_every)]
    if system == "stock":
        return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_cpu_threads_per_process", str(os.cpu_count() or 1),
                str(HERE / "stock_recipe.py"), "--out", str(out), *args]
    job = out / "job.toml"
    run_dir = out / "run"
    job.write_text(
        f'run_dir = "{run_dir}"\n[train]\nscript = "{HERE / "goodput_trainsup.py"}"\n'
        f'args = {json.dumps(["--out", str(run_dir), *args])}\n'
        '[launch]\nlauncher = "accelerate"\nnum_processes = 1\ncpu = true\nmixed_precision = "no"\n'
        '[retention]\nkeep_last = 3\nkeep_best = 0\n' + job_extra
    )
    return [sys.executable, "-m", "supervisor", "run", str(job)]


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def interrupt(proc: subprocess.Popen, kind: str) -> None:
    if kind == "sigterm":
        os.killpg(proc.pid, signal.SIGTERM)  # the process group, as a VM's shutdown or a scheduler does
        return
    procs = tree(proc.pid)  # every process of the run, whatever its session, at once
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the line a SIGKILL cut short
            pass
    return out


def newest_step_dir(system: str, out: Path) -> Path | None:
    root = out if system == "stock" else out / "run" / "checkpoints"
    dirs = [p for p in root.glob("step*") if p.is_dir()]
    return max(dirs, key=lambda p: int("".join(c for c in p.name if c.isdigit()) or 0), default=None)


def run_one(system: str, scenario: str, steps: int, times: list[tuple[float, str]], work: Path,
            save_every: int, job_extra: str = "") -> Result:
    """`job_extra`: TOML appended to trainsup's job file (bench/bench_interval.py: its [checkpoint])."""
    out = work / f"{scenario}-{system}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log_path = out / "goodput.jsonl"
    env = dict(child_env(), GOODPUT_LOG=str(log_path))
    argv = command(system, out, steps, save_every, job_extra)
    res = Result(system, scenario, steps, 0.0, 0)
    pending = list(times)
    windows: list[tuple[float, float]] = []  # each launch: (start, exit)
    start = time.time()
    with open(out / "output.log", "ab") as sink:
        while res.launches < 100:
            t_launch = time.time()
            proc = subprocess.Popen(argv, env=env, cwd=out, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            res.launches += 1
            hit = None
            while proc.poll() is None:
                due = start + pending[0][0] if pending else None
                try:
                    proc.wait(timeout=None if due is None else max(0.0, due - time.time()))
                except subprocess.TimeoutExpired:
                    hit = Interruption(pending.pop(0)[1], time.time())
                    interrupt(proc, hit.kind)
                    res.interruptions.append(hit)
                    proc.wait()
            t_exit = time.time()
            windows.append((t_launch, t_exit))
            if hit is not None:
                hit.exit_s = t_exit - hit.t  # save + exit for now: split below from the rank's log
                continue
            done = [e for e in read_log(log_path) if e["ev"] == "done" and e["t"] >= t_launch]
            if proc.returncode == 0 and done:
                res.finished, res.digest = True, done[-1]["digest"]
                break
            # ended on its own, unfinished: what a person would do, then run it again
            res.person += 1
            bad = newest_step_dir(system, out)
            print(f"  {system}/{scenario}: exit {proc.returncode} without finishing; a person deletes "
                  f"{bad.name if bad else 'nothing'} and runs it again", flush=True)
            if bad is not None and system == "stock":
                shutil.rmtree(bad)
    res.wall_s = windows[-1][1] - start
    account(res, read_log(log_path), windows)
    return res


def account(res: Result, log: list[dict], windows: list[tuple[float, float]]) -> None:
    """Split each interruption's cost using the rank's timestamps."""
    steps = [e for e in log if e["ev"] == "step"]
    saved_at = {round(e["t"], 6) for e in log if e["ev"] == "saved"}
    gaps = [b["t"] - a["t"] for a, b in zip(steps, steps[1:])
            if b["pid"] == a["pid"] and b["step"] == a["step"] + 1
            and not any(a["t"] <= s <= b["t"] for s in saved_at)]
    res.step_s = statistics.mean(gaps) if gaps else 0.0

    def in_window(i: int, ev: str) -> list[dict]:
        lo, hi = windows[i]
        return [e for e in log if e["ev"] == ev and lo <= e["t"] <= hi]

    w = 0
    for hit in res.interruptions:
        while w < len(windows) and windows[w][1] < hit.t:
            w += 1
        if w >= len(windows) - 1:
            break
        saves = [e for e in in_window(w, "saved") if e["t"] >= hit.t]
        if saves:
            hit.save_s = saves[0]["t"] - hit.t
            hit.exit_s = windows[w][1] - saves[0]["t"]
        reached = max((e["step"] for e in in_window(w, "step")), default=0)
        first = in_window(w + 1, "first_batch")
        if first:
            hit.restart_s = first[0]["t"] - windows[w + 1][0]
            hit.recomputed_steps = max(0, reached - first[0]["step"])
        elif windows[w + 1][1] - windows[w + 1][0] > 0:  # interrupted again before training
            hit.restart_s = windows[w + 1][1] - windows[w + 1][0]


# ---------------------------------------------------------------------------------- reporting
def schedule(scenario: str, seed: int, horizon_s: float = 3600.0) -> list[tuple[float, str]]:
    if scenario == "uninterrupted":
        return []
    if scenario.startswith("sigterm"):
        every = float(scenario[len("sigterm"):])
        return [(every * k, "sigterm") for k in range(1, int(horizon_s / every))]
    rng, t, out = random.Random(seed), 0.0, []
    while t < horizon_s:
        t += rng.expovariate(1 / 60.0)
        out.append((t, "sigkill"))
    return out


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def floor_s(work: Path, env: dict[str, str], repeats: int = 3) -> float:
    """What any relaunch pays before its first batch: the plain script on an empty dir, no
    launcher, no supervisor, nothing to resume (median of `repeats`)."""
    took = []
    for k in range(repeats):
        out = work / f"floor-{k}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        log = out / "goodput.jsonl"
        t0 = time.time()
        subprocess.run([sys.executable, str(HERE / "stock_recipe.py"), "--out", str(out), "--steps", "1",
                        "--save-every", "0"], env=dict(env, GOODPUT_LOG=str(log)), cwd=out, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        took.append(next(e["t"] for e in read_log(log) if e["ev"] == "first_batch") - t0)
    return statistics.median(took)


def table(results: list[Result], floor: float) -> str:
    ideal: dict[int, Result] = {}
    for r in results:
        if r.scenario == "uninterrupted" and (r.steps not in ideal or r.wall_s < ideal[r.steps].wall_s):
            ideal[r.steps] = r

    def at_ideal_speed(r: Result) -> float:
        return r.wall_s - r.trained_steps * (r.step_s - ideal[r.steps].step_s)

    ideal_equal = {}
    for r in results:
        if r.scenario == "uninterrupted":
            ideal_equal[r.steps] = min(ideal_equal.get(r.steps, float("inf")), at_ideal_speed(r))
    plain = {(r.system, r.steps): r for r in results if r.scenario == "uninterrupted"}
    rows = ["| scenario | system | steps | wall | goodput | at equal speed | bound | stops | lost a stop | save | "
            "exit | restart | recomputed a stop | bitwise | person | step |", "|" + "---|" * 16]
    for r in results:
        n = len(r.interruptions)
        best = ideal[r.steps]
        lost = (r.wall_s - best.wall_s) / n if n else 0.0
        rec = mean(i.recomputed_steps for i in r.interruptions)
        ref = plain.get((r.system, r.steps))
        bitwise = "—" if r.scenario == "uninterrupted" else ("yes" if ref and r.digest == ref.digest else "no")
        equal_speed = ideal_equal[r.steps] / at_ideal_speed(r)
        bound = best.wall_s / (best.wall_s + n * floor)
        rows.append(
            f"| {r.scenario} | {r.system} | {r.steps} | {r.wall_s:.1f} s | {best.wall_s / r.wall_s:.2f} | "
            f"{equal_speed:.2f} | {bound:.2f} | {n} | "
            f"{lost:.1f} s | {mean(i.save_s for i in r.interruptions):.2f} s | "
            f"{mean(i.exit_s for i in r.interruptions):.2f} s | {mean(i.restart_s for i in r.interruptions):.2f} s | "
            f"{rec:.1f} steps ({rec * r.step_s:.1f} s) | {bitwise} | {r.person} | {1000 * r.step_s:.0f} ms |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the uninterrupted and SIGTERM-every-20-s runs (~5 min)")
    p.add_argument("--short-steps", type=int, default=300, help="steps of the 20 s scenario (>= 4 stops at 20 s)")
    p.add_argument("--long-steps", type=int, default=1500, help="steps of the 60 s and SIGKILL scenarios (>= 4 stops)")
    p.add_argument("--save-every", type=int, default=25, help="both systems' checkpoint interval in steps")
    p.add_argument("--seed", type=int, default=0, help="seeds the SIGKILL schedule")
    p.add_argument("--ideal-once", action="store_true", help="the uninterrupted runs only first, not also last")
    p.add_argument("--work", default=None, help="where the runs go (default: a temporary dir, removed)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="goodput-"))
    plan = [("uninterrupted", args.short_steps), ("sigterm20", args.short_steps)]
    if not args.quick:
        # the uninterrupted runs both first and last: a shared machine's speed drifts by a few
        # percent over half an hour, and the ideal is the fastest the machine did
        plan[1:1] = [("uninterrupted", args.long_steps)]
        plan += [("sigterm60", args.long_steps), ("sigkill", args.long_steps)]
        if not args.ideal_once:
            plan += [("uninterrupted", args.short_steps), ("uninterrupted", args.long_steps)]
    prepare()
    results = []
    floor = floor_s(work, child_env())
    print(f"floor (python + imports + the script's set-up to its first batch): {floor:.2f} s", flush=True)
    try:
        for scenario, steps in plan:
            for system in SYSTEMS:
                t = time.time()
                r = run_one(system, scenario, steps, schedule(scenario, args.seed), work, args.save_every)
                results.append(r)
                print(f"{scenario:>13} {system:>8}: {r.wall_s:6.1f} s, {len(r.interruptions)} interruptions, "
                      f"{r.launches} launches, finished={r.finished} ({time.time() - t:.0f} s)", flush=True)
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"goodput bench: {os.cpu_count()} CPUs, fp32, 1 rank, 2,048 tokens/step, checkpoint every "
          f"{args.save_every} steps, SIGKILL seed {args.seed}")
    print(table(results, floor))
    print(f"floor: {floor:.2f} s")
    return 0 if all(r.finished for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
