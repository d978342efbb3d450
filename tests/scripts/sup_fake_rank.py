"""A torch-free rank that honours the supervisor <-> rank contract (contract.md), with faults on demand.

"Training" is deterministic arithmetic on a float vector: the state after step N depends
only on N and the state after step N-1, so a resumed run ends with exactly the weights of
an uninterrupted one when the resume is exact. Rank 0 commits checkpoints through the
real CheckpointStore; other ranks follow rank 0's commit (there is no collective here).

Faults (each applies only on the attempts listed by --fault-attempts, default: all):
  --crash-at STEP        raise an exception at STEP (exit report "error", exit 1)
  --hang-at STEP         stop training AND heartbeating at STEP (a deadlocked collective)
  --ignore-stop          keep training whatever the supervisor asks
  --slow-save-at STEP    the checkpoint of STEP sleeps --slow-save-s mid-write (to SIGKILL it there)
  --resume-fail-from STEP  exit "resume_failed" when asked to resume from STEP
--metrics: rank 0 writes RUN_DIR/metrics.jsonl as a TrainSession does (steps and saves).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train_core import runfiles  # noqa: E402
from train_core.metricslog import METRICS_FILE, MetricsLog  # noqa: E402
from train_core.store import CheckpointStore  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=50)
p.add_argument("--step-time", type=float, default=0.05)
p.add_argument("--save-every", type=int, default=0)
p.add_argument("--crash-at", type=int, default=-1)
p.add_argument("--hang-at", type=int, default=-1)
p.add_argument("--ignore-stop", action="store_true")
p.add_argument("--slow-save-at", type=int, default=-1)
p.add_argument("--slow-save-s", type=float, default=30.0)
p.add_argument("--resume-fail-from", type=int, default=-1)
p.add_argument("--fault-attempts", default="")
p.add_argument("--heartbeat-s", type=float, default=0.3)
p.add_argument("--metrics", action="store_true", help="rank 0 writes metrics.jsonl (train_core.metricslog)")
p.add_argument("--busy-iters", type=int, default=0, help="CPU-bound work per step instead of sleeping (benchmarks)")
args = p.parse_args()

run_dir = Path(os.environ[runfiles.ENV_RUN_DIR])
paths = runfiles.RunPaths(run_dir)
attempt = int(os.environ.get(runfiles.ENV_ATTEMPT, "1"))
rank = int(os.environ.get("RANK", "0"))
world = int(os.environ.get("WORLD_SIZE", "1"))
faulty = not args.fault_attempts or str(attempt) in args.fault_attempts.split(",")
store = CheckpointStore(paths.checkpoints)

metrics = MetricsLog(run_dir / METRICS_FILE, attempt=attempt) if args.metrics and rank == 0 else None
flags = {"stop": False, "hung": False}
state = {"step": 0, "state": "starting", "w": [0.0] * 8, "last_ckpt": None}


def on_signal(signum, frame):  # flag only (docs/platform.md: no I/O in handlers)
    flags["stop"] = True


sig_name = os.environ.get(runfiles.ENV_SAVE_SIGNAL, "SIGUSR1")
for s in {signal.SIGTERM, signal.SIGINT, getattr(signal, sig_name)}:
    signal.signal(s, on_signal)

paths.ranks.mkdir(parents=True, exist_ok=True)
runfiles.write_json_atomic(paths.rank_file(rank), {
    "pid": os.getpid(), "rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
    "world_size": world, "attempt": attempt, "host": socket.gethostname(), "started_at": time.time()})


def heartbeat_loop():
    while True:
        if not flags["hung"]:
            runfiles.write_json_atomic(paths.status, {
                "attempt": attempt, "pid": os.getpid(), "state": state["state"], "step": state["step"],
                "epoch": 0, "batch_in_epoch": state["step"], "max_steps": args.steps,
                "loss": 1.0 / (1 + state["step"]), "tokens_per_s": 1000.0, "samples_per_s": 10.0,
                "last_checkpoint": state["last_ckpt"], "metrics": {}, "micro_batch": 1, "grad_accum": 1,
                "world_size": world, "updated_at": time.time()}, durable=False)
        time.sleep(args.heartbeat_s)


def supervisor_watch():
    pid = int(os.environ.get(runfiles.ENV_SUPERVISOR_PID, "0") or 0)
    if not pid:
        return
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            flags["stop"] = True
            return
        time.sleep(0.3)


def exit_report(kind, code, detail="", checkpoint=None):
    if metrics is not None:
        metrics.close()
    runfiles.write_json_atomic(paths.exit_file(rank), {
        "rank": rank, "attempt": attempt, "kind": kind, "code": code, "step": state["step"],
        "checkpoint": checkpoint, "detail": detail})
    sys.stdout.flush()
    os._exit(code)


def step_fn(w, step):
    return [(x * 0.999 + 0.001 * ((step * 7 + i * 13) % 17)) for i, x in enumerate(w)]


def save(reason):
    step = state["step"]
    if (state["last_ckpt"] or {}).get("step") == step:
        return  # already saved at this step
    if rank == 0:
        t0 = time.time()
        prev = state["state"]
        state["state"] = "saving"
        tmp = store.begin(step)
        (tmp / "weights.json").write_text(json.dumps(state["w"]))
        if faulty and step == args.slow_save_at:
            (tmp / "optimizer.bin").write_bytes(b"\0" * 1000)
            time.sleep(args.slow_save_s)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        ck = store.commit(tmp, step, epoch=0, batch_in_epoch=step, reason=reason,
                          metrics={"val_loss": 1.0 / (1 + step)}, extra={"world_size": world})
        state["last_ckpt"] = {"step": step, "path": str(ck.path), "reason": reason}
        state["state"] = prev
        if metrics is not None:
            metrics.save(step, blocked_s=time.time() - t0, reasons=[reason], background=False)
    # other ranks hold no state of their own here: rank 0's checkpoint is the run's


def follow_rank0_exit():
    """A non-zero rank that stops waits for rank 0's commit (its exit report): no collective here."""
    deadline = time.time() + 30
    while not paths.exit_file(0).exists() and time.time() < deadline:
        time.sleep(0.02)


threading.Thread(target=supervisor_watch, daemon=True).start()
resume = os.environ.get(runfiles.ENV_RESUME_FROM)
if resume:
    if faulty and Path(resume).name == f"step-{args.resume_fail_from:08d}":
        exit_report("resume_failed", 1, "simulated: cannot load optimizer.bin", checkpoint=resume)
    ck = store.check(Path(resume))
    if not ck.valid:
        exit_report("resume_failed", 1, ck.problem, checkpoint=resume)
    state["w"] = json.loads((Path(resume) / "weights.json").read_text())
    state["step"] = ck.step
    state["last_ckpt"] = {"step": ck.step, "path": resume, "reason": ck.reason}
    print(f"rank {rank}: resumed from step {ck.step}", flush=True)
if rank == 0:
    threading.Thread(target=heartbeat_loop, daemon=True).start()

seen_save_seq = runfiles.read_control(paths.control).save_seq  # never replay an old request
if metrics is not None:
    metrics.start(state["step"], resumed=bool(resume))
t_train0 = time.perf_counter()
try:
    state["state"] = "training"
    print(f"rank {rank}/{world}: attempt {attempt} starting at step {state['step']}", flush=True)
    while state["step"] < args.steps:
        step = state["step"]
        if faulty and step == args.crash_at:
            raise RuntimeError(f"simulated crash at step {step}")
        if faulty and step == args.hang_at:
            flags["hung"] = True
            print(f"rank {rank}: hanging at step {step}", flush=True)
            while True:
                time.sleep(1)
        if args.busy_iters:
            acc = 0
            for i in range(args.busy_iters):
                acc += i * i
        else:
            time.sleep(args.step_time)
        state["w"] = step_fn(state["w"], step)
        state["step"] = step + 1
        if metrics is not None:
            metrics.step(step + 1, loss=1.0 / (2 + step))
        ctl = runfiles.read_control(paths.control)
        while ctl.pause and not flags["stop"] and not ctl.stop:  # hold at the step boundary
            state["state"] = "paused"
            time.sleep(0.05)
            ctl = runfiles.read_control(paths.control)
        state["state"] = "training"
        if ctl.save_seq > seen_save_seq:
            seen_save_seq = ctl.save_seq
            if rank == 0:
                save("request")
        if (flags["stop"] or ctl.stop) and not (faulty and args.ignore_stop):
            if rank == 0:
                save("preempt")
            else:
                follow_rank0_exit()
            state["state"] = "stopped"
            print(f"rank {rank}: saved step {state['step']} on request, exiting 75", flush=True)
            exit_report("saved", 75, checkpoint=str(paths.checkpoints / f"step-{state['step']:08d}"))
        ignoring = faulty and args.ignore_stop and (flags["stop"] or ctl.stop)  # no saves either
        if args.save_every and state["step"] % args.save_every == 0 and state["step"] < args.steps and not ignoring:
            save("interval")
    save("final")
    state["state"] = "finished"
    runfiles.write_json_atomic(run_dir / f"final-weights-{rank}.json", state["w"])
    runfiles.write_json_atomic(run_dir / f"timing-{rank}.json", {"train_s": time.perf_counter() - t_train0,
                                                                  "steps": args.steps})
    print(f"rank {rank}: finished at step {state['step']}", flush=True)
    exit_report("finished", 0)
except Exception as e:  # noqa: BLE001
    print(f"rank {rank}: error: {e}", flush=True)
    exit_report("error", 1, f"{type(e).__name__}: {e}")
