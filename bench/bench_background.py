"""Background saves against synchronous ones, fp32 on this CPU, side by side in one run.

    python bench/bench_background.py                          # ~25 min on 2 cores
    python bench/bench_background.py --steps 100 --repeats 1  # quicker, noisier

stall  In one process, the demo's model at its defaults (examples/gpt: ~1.3 M parameters,
       AdamW, an EMA): how long a periodic save blocks the training loop, written
       synchronously (files, BLAKE3, fsync, commit) and in the background (the copy to memory;
       the writer is left to finish before the next one), medians of --saves. Also: the
       writer's own time, the bytes one staged copy holds, the RSS before and the peak.
interleaved
       The same model in one process, trained in blocks of --block steps (grad_accum 2, as the
       demo) with no save, a background save after every step and a synchronous one after every
       step, in a rotating order for --rounds rounds, each block after an os.sync(): this VM's
       speed drifts 10-20 % from run to run, and blocks side by side cancel that out. Seconds
       per step, medians; every checkpoint is counted (then deleted, outside the timed blocks).
writer Thread or helper process: the same model in one process, trained in blocks (as
       interleaved) with no save, or a save after every step whose state is staged at the step
       boundary and then written, hashed, fsynced and committed (the same work both ways) by a
       writer thread at nice 19 in the training process, or by a helper process at nice 19
       (spawned once; the staging buffers live in shared memory it maps, so a save hands it a
       small structure, not the bytes). Seconds per step, medians.
wall   The demo itself (examples/gpt/train.py --mixed-precision no --eval-every 0, run
       plainly, each run in a fresh run dir) trained --steps steps with no checkpoint, with
       one after EVERY step written synchronously, and with one after every step written in
       the background; its own "trained steps" time (the end of the first step to the last,
       so start-up is left out); every checkpoint is counted on disk afterwards (none may be
       coalesced away). Runs interleave, in a rotating order, --repeats times, each after an
       os.sync() (no run pays for the previous one's writeback); medians.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from train_core.runfiles import ENV_BACKGROUND_SAVES  # noqa: E402
from train_core.store import CheckpointStore  # noqa: E402

DEMO = REPO / "examples" / "gpt" / "train.py"
TRAINED = re.compile(r"trained steps \d+\.\.(\d+): [\d,]+ tokens in ([\d.]+) s")


def setup(run_dir: Path, grad_accum: int):
    """The demo's model at its defaults with AdamW and an EMA, in a TrainSession (random tokens)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    from examples.gpt.model import EMA, GPT, GPTConfig
    from examples.gpt.train import parse_args
    from train_core.session import TrainSession

    a = parse_args([])
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    session = TrainSession(acc, config={"bench": 1}, micro_batch=a.micro_batch, grad_accum=grad_accum,
                           max_steps=10**6, run_dir=run_dir, resume=None)
    model = GPT(GPTConfig(vocab_size=a.vocab_size, block_size=a.block_size, n_layer=a.n_layer, n_head=a.n_head,
                          n_embd=a.n_embd, dropout=0.0))
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
    data = torch.randint(0, a.vocab_size, (a.micro_batch * 64, a.block_size + 1))
    dl = session.dataloader(torch.utils.data.TensorDataset(data), shuffle=True)
    model, opt, dl = session.prepare(model, opt, dl)
    ema = session.register("ema", EMA(acc.unwrap_model(model)))

    def train(batch) -> None:
        (xy,) = batch
        with acc.accumulate(model):
            _, loss = model(xy[:, :-1], xy[:, 1:])
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            ema.update(acc.unwrap_model(model))

    return session, train, dl


def stall(saves: int, root: Path) -> dict[str, float]:
    session, train, dl = setup(root / "stall", grad_accum=1)
    sync_s, stall_s, writer_s, copy_s = [], [], [], []
    with session:
        it = iter(session.batches(dl))
        for _ in range(3):  # warm up; AdamW's state exists
            train(next(it))
            session.step_done()
        rss_before = psutil.Process().memory_info().rss
        for i in range(saves):
            # each save follows a training step, as a periodic save does (the state was just
            # written by the optimizer; the caches hold the step's working set, not the state),
            # started without the previous save's dirty pages
            os.sync()
            train(next(it))
            session.global_step = 1000 + 2 * i
            t0 = time.perf_counter()
            session._save(["interval"])
            sync_s.append(time.perf_counter() - t0)
            os.sync()
            train(next(it))
            session.global_step += 1
            t0 = time.perf_counter()
            session._save(["interval"], background=True)
            stall_s.append(time.perf_counter() - t0)
            job = session._saver.in_flight
            staged = job.staged_bytes
            copy_s.append(job.stage_s)
            job.done.wait()
            writer_s.append(time.perf_counter() - t0)
            session._wait_for_save()
            shutil.rmtree(root / "stall" / "checkpoints")
        session.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"sync_s": statistics.median(sync_s), "stall_s": statistics.median(stall_s),
            "writer_s": statistics.median(writer_s), "copy_s": statistics.median(copy_s), "staged_mb": staged / 2**20,
            "rss_before_mb": rss_before / 2**20, "rss_peak_mb": peak / 2**20}


def interleaved(rounds: int, block: int, root: Path) -> dict[str, float]:
    """The demo's training in one process, blocks of `block` steps with no save, a background
    save after every step, a synchronous save after every step, in a rotating order: the
    machine's drift (10-20 % from run to run here) cancels out. Medians of seconds per step; a
    block's last background write is waited for inside the block."""
    run_dir = root / "interleaved"
    session, train, dl = setup(run_dir, grad_accum=2)  # the demo's accumulation
    modes = ("none", "background", "sync")
    per_step: dict[str, list[float]] = {m: [] for m in modes}
    saved = 0
    with session:
        it = iter(session.batches(dl))
        batch = next(it)
        for _ in range(2 * 2):  # warm up
            train(batch)
            session.step_done()
            batch = next(it)
        for r in range(rounds):
            for mode in modes[r % 3:] + modes[:r % 3]:
                session.pacer.steps = 0 if mode == "none" else 1
                session.background_saves = mode == "background"
                os.sync()
                t0 = time.perf_counter()
                for _ in range(block * 2):
                    train(batch)
                    session.step_done()
                    batch = next(it)  # ends the iteration: this step's save happens here
                session._wait_for_save()
                per_step[mode].append((time.perf_counter() - t0) / block)
                ckpts = [c for c in CheckpointStore(run_dir / "checkpoints").scan() if c.valid]
                saved += len(ckpts)
                for c in ckpts:
                    shutil.rmtree(c.path)
        session.close()
    expected = rounds * 2 * block
    if saved != expected:
        raise SystemExit(f"interleaved: {saved} checkpoints committed, expected {expected}")
    return {m: statistics.median(v) for m, v in per_step.items()} | {"saved": saved}


def _commit_staged(store: CheckpointStore, tmp: Path, step: int, staged) -> None:
    """The writer's work, the same in a thread and in the helper process."""
    from train_core import staging
    from train_core.saving import custom_file

    staging.write(staged, tmp, is_main=True, custom_name=custom_file)
    store.commit(tmp, step, epoch=0, batch_in_epoch=step, reason="interval")


def _helper(jobs, results, root: str) -> None:
    """The helper process: maps the staging buffers once, then writes each staged save it is sent."""
    import threading

    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    store, tensors = CheckpointStore(Path(root)), []
    while (msg := jobs.get()) is not None:
        kind, payload = msg
        if kind == "buffers":
            tensors.extend(payload)
            continue
        tmp, step, staged = payload
        _commit_staged(store, Path(tmp), step, _swap(staged, lambda ix: tensors[ix.i]))
        results.put(step)


def _swap(o, f):
    """`o` with every tensor (or _Ix) replaced by f(it): what crosses to the helper is _Ix, indices of
    the buffers it was sent once."""
    import dataclasses

    import torch

    from train_core import staging

    if isinstance(o, (torch.Tensor, _Ix)):
        return f(o)
    if isinstance(o, staging.Staged):
        return dataclasses.replace(o, weights=_swap(o.weights, f), custom=_swap(o.custom, f), dataloaders=[],
                                   optimizers=[staging._Frozen(_swap(x.state_dict(), f)) for x in o.optimizers],
                                   schedulers=[staging._Frozen(_swap(x.state_dict(), f)) for x in o.schedulers],
                                   scaler=None if o.scaler is None else staging._Frozen(_swap(o.scaler.state_dict(), f)))
    if isinstance(o, dict):
        return type(o)((k, _swap(v, f)) for k, v in o.items())
    if type(o) in (list, tuple):
        return type(o)(_swap(v, f) for v in o)
    return o


class _Ix:
    """A staging buffer, by its index among those sent to the helper."""

    def __init__(self, i: int) -> None:
        self.i = i


def executors(rounds: int, block: int, root: Path) -> dict[str, float]:
    """Seconds per step with no save, and with a save after every step written by a thread or by
    the helper process (see the module's doc): medians of blocks in a rotating order."""
    import threading

    import torch.multiprocessing as tmp_mp

    from train_core import staging

    session, train, dl = setup(root / "executors", grad_accum=2)
    acc = session.accelerator
    store = CheckpointStore(root / "executors" / "writer")
    store.root.mkdir(parents=True, exist_ok=True)
    shared = staging.Buffers()
    real_get = shared.get

    def get_shared(key, t):
        buf = real_get(key, t)
        return buf if buf.is_shared() else buf.share_memory_()

    shared.get = get_shared
    index: dict[int, int] = {}
    ctx = tmp_mp.get_context("spawn")
    jobs, results = ctx.SimpleQueue(), ctx.SimpleQueue()
    helper = ctx.Process(target=_helper, args=(jobs, results, str(store.root)), daemon=True)
    helper.start()
    own = staging.Buffers()
    writer: list[threading.Thread] = []

    def thread_write(tmp: Path, step: int, staged) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        _commit_staged(store, tmp, step, staged)

    def to_helper(t):
        key = t.untyped_storage().data_ptr()
        if key not in index:
            index[key] = len(index)
            jobs.put(("buffers", [t]))
        return _Ix(index[key])

    modes = ("none", "thread", "process")
    per_step: dict[str, list[float]] = {m: [] for m in modes}
    pending = {"thread": 0, "process": 0}
    step = 0
    with session:
        it = iter(session.batches(dl))
        batch = next(it)
        session.pacer.steps = 0
        for _ in range(4):
            train(batch)
            session.step_done()
            batch = next(it)
        for r in range(rounds):
            for mode in modes[r % 3:] + modes[:r % 3]:
                os.sync()
                t0 = time.perf_counter()
                for _ in range(block * 2):
                    train(batch)
                    session.step_done()
                    batch = next(it)
                    if mode == "none" or not acc.sync_gradients:
                        continue
                    step += 1
                    if mode == "thread":
                        if writer:
                            writer.pop().join()
                        staged = staging.stage(acc, list(session._objects), own)
                        writer.append(threading.Thread(target=thread_write, args=(store.begin(step), step, staged)))
                        writer[-1].start()
                    else:
                        if pending["process"]:
                            results.get()
                        staged = staging.stage(acc, list(session._objects), shared)
                        jobs.put(("save", (str(store.begin(step)), step, _swap(staged, to_helper))))
                    pending[mode] = step
                if writer:
                    writer.pop().join()
                if mode == "process" and pending["process"]:
                    results.get()
                    pending["process"] = 0
                per_step[mode].append((time.perf_counter() - t0) / block)
                for c in store.scan():
                    shutil.rmtree(c.path)
        session.close()
    jobs.put(None)
    helper.join(30)
    return {m: statistics.median(v) for m, v in per_step.items()}


def demo(steps: int, save_every: int, background: bool, root: Path) -> tuple[float, int]:
    """The demo's trained-steps seconds, and the checkpoints it left on disk."""
    run_dir = Path(tempfile.mkdtemp(prefix="demo-", dir=root))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    env.update({ENV_BACKGROUND_SAVES: "1" if background else "0", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)})
    out = subprocess.run([sys.executable, str(DEMO), "--max-steps", str(steps), "--save-every", str(save_every),
                          "--mixed-precision", "no", "--eval-every", "0", "--sample-tokens", "0",
                          "--run-dir", str(run_dir)], env=env, capture_output=True, text=True, check=True)
    m = TRAINED.search(out.stdout)
    if not m or int(m.group(1)) != steps:
        raise SystemExit(f"no timing in the demo's output:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    saved = sum(1 for c in CheckpointStore(run_dir / "checkpoints").scan() if c.valid)
    shutil.rmtree(run_dir)
    return float(m.group(2)), saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="demo steps per wall run")
    p.add_argument("--repeats", type=int, default=3, help="wall runs of each kind")
    p.add_argument("--saves", type=int, default=7, help="saves of each kind in the stall part")
    p.add_argument("--dir", help="where to write (default: a temp dir; put it on the disk you train on)")
    p.add_argument("--only", choices=("stall", "interleaved", "writer", "wall"), help="run one part")
    p.add_argument("--rounds", type=int, default=8, help="interleaved: rounds of the three kinds of block")
    p.add_argument("--block", type=int, default=10, help="interleaved: steps per block")
    args = p.parse_args()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    root = Path(tempfile.mkdtemp(prefix="bench-background-", dir=args.dir))
    try:
        if args.only in (None, "stall"):
            report_stall(args.saves, root)
        if args.only in (None, "interleaved"):
            i = interleaved(args.rounds, args.block, root)
            print(f"interleaved in one process, {args.rounds} rounds of {args.block}-step blocks, medians of the "
                  f"seconds per step: none {i['none']:.3f}, a background save after every step {i['background']:.3f} "
                  f"({i['background'] / i['none']:.3f} x none), a synchronous one {i['sync']:.3f} "
                  f"({i['sync'] / i['none']:.3f} x none); {i['saved']} checkpoints committed", flush=True)
        if args.only in (None, "writer"):
            e = executors(args.rounds, args.block, root)
            print(f"writer thread or helper process, {args.rounds} rounds of {args.block}-step blocks, medians of "
                  f"the seconds per step: none {e['none']:.3f}, a save after every step written by a thread "
                  f"{e['thread']:.3f} ({e['thread'] / e['none']:.3f} x none), by a helper process "
                  f"{e['process']:.3f} ({e['process'] / e['none']:.3f} x none)", flush=True)
        if args.only in (None, "wall"):
            report_wall(args.steps, args.repeats, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report_stall(saves: int, root: Path) -> None:
    s = stall(saves, root)
    print(f"stall per periodic save (median of {saves}): synchronous {s['sync_s'] * 1e3:.1f} ms, "
          f"background {s['stall_s'] * 1e3:.1f} ms (the copy {s['copy_s'] * 1e3:.1f} ms) = "
          f"{s['stall_s'] / s['sync_s']:.3f} x synchronous "
          f"(the writer then takes {s['writer_s'] * 1e3:.0f} ms); one staged copy {s['staged_mb']:.1f} MiB, "
          f"RSS {s['rss_before_mb']:.0f} MiB before, peak {s['rss_peak_mb']:.0f} MiB", flush=True)


def report_wall(steps: int, repeats: int, root: Path) -> None:
    demo(2, 0, True, root)  # the data cache, bytecode: outside the timed runs
    walls: dict[str, list[float]] = {"none": [], "sync": [], "background": []}
    kinds = [("none", 0), ("sync", 1), ("background", 1)]
    for r in range(repeats):
        for kind, every in kinds[r % 3:] + kinds[:r % 3]:
            os.sync()
            wall, saved = demo(steps, every, kind == "background", root)
            expected = steps if every else 1  # the final save is always there
            if saved != expected:
                raise SystemExit(f"{kind}: {saved} checkpoints on disk, expected {expected}")
            walls[kind].append(wall)
            print(f"  {kind:>10}: {wall:.1f} s, {saved} checkpoints", flush=True)
    none = statistics.median(walls["none"])
    print(f"demo, {steps} steps, a checkpoint after every step (median of {repeats}): "
          + ", ".join(f"{k} {statistics.median(v):.1f} s ({statistics.median(v) / none:.3f} x none)"
                      for k, v in walls.items()), flush=True)


if __name__ == "__main__":
    main()
