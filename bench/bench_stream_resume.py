"""Resuming a stream: time from process start to the first new step, against the position in the
stream, for a stream that can say where it is (state_dict/load_state_dict: it resumes from the
saved position) and for the same stream without (it re-reads every consumed item).

    python bench/bench_stream_resume.py                       # positions 1k, 10k, 100k batches
    python bench/bench_stream_resume.py --positions 1000,10000 --item-ms 1

Each position: a run trains `position` steps (a tiny model, 4 items a batch, no delay) and
saves its final checkpoint; then, timed, a fresh process resumes it with items that cost
`--item-ms` each to read (a slow source: a network, a decompressor) and runs one step. The
fresh start (no checkpoint) is timed the same way, in the same run. Goal: a resumable stream
at most 1 s over the fresh start at every position, where re-reading grows with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train_core.checkpoint import step_dir_name  # noqa: E402 - torch-free


def child(args: argparse.Namespace) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from train_core import TrainSession

    class Stream(torch.utils.data.IterableDataset):
        """An endless stream of small items that cost `delay` seconds each to read."""

        def __init__(self, delay: float):
            self.delay, self.pos = delay, 0

        def __iter__(self):
            while True:
                if self.delay:
                    time.sleep(self.delay)
                g = torch.Generator().manual_seed(self.pos)
                self.pos += 1
                yield torch.randn(8, generator=g)

    class ResumableStream(Stream):
        def state_dict(self) -> dict:
            return {"pos": self.pos}

        def load_state_dict(self, state: dict) -> None:
            self.pos = state["pos"]

    torch.set_num_threads(1)
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    session = TrainSession(accelerator, config={"bench": "stream"}, micro_batch=4, max_steps=args.steps,
                           save_every_steps=0, run_dir=args.run_dir, write_metrics=False)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stream = (ResumableStream if args.resumable else Stream)(args.item_ms / 1000)
    model, opt, dl = session.prepare(model, opt, session.dataloader(stream))
    first = None
    with session:
        for x in session.batches(dl):
            loss = model(x).pow(2).mean()
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            session.step_done()
            if first is None:
                first = time.time()
    print(json.dumps({"first_step_at": first}), flush=True)


def run_child(run_dir: Path, steps: int, *, resumable: bool, item_ms: float) -> float:
    """Seconds from starting the process to the end of its first new step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if not k.startswith("TRAINSUP_")}
    t0 = time.time()
    out = subprocess.run([sys.executable, __file__, "--child", "--run-dir", str(run_dir), "--steps", str(steps),
                          "--item-ms", str(item_ms), *(["--resumable"] if resumable else [])],
                         env=env, capture_output=True, text=True, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)["first_step_at"] - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", default="1000,10000,100000", help="batches into the stream, comma-separated")
    p.add_argument("--item-ms", type=float, default=1.0, help="what reading one item costs when timed")
    p.add_argument("--reread-up-to", type=int, default=100000, help="time re-reading only up to this position")
    p.add_argument("--repeats", type=int, default=3, help="timed starts per case (the median is reported)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--resumable", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    positions = [int(x) for x in args.positions.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        root = Path(tmp)

        fresh = statistics.median(run_child(root / f"fresh-{i}", 1, resumable=True, item_ms=args.item_ms)
                                  for i in range(args.repeats))
        print(f"fresh start to the first step: {fresh:.2f} s (item {args.item_ms:g} ms, 4 items a batch)", flush=True)
        print(f"{'position':>10} {'resumable':>10} {'- fresh':>8} {'re-read':>9} {'- fresh':>8}", flush=True)
        for pos in positions:
            rows = {}
            for resumable in (True, False):
                if not resumable and pos > args.reread_up_to:
                    continue
                run_dir = root / f"{pos}-{resumable}"
                t = time.time()
                run_child(run_dir, pos, resumable=resumable, item_ms=0)  # to the position, fast, final checkpoint
                made = time.time() - t
                # each timed run trains one step more and saves it: go back to the position's checkpoint
                repeats = args.repeats if resumable else 1
                times = []
                for _ in range(repeats):
                    times.append(run_child(run_dir, pos + 1, resumable=resumable, item_ms=args.item_ms))
                    shutil.rmtree(run_dir / "checkpoints" / step_dir_name(pos + 1))
                rows[resumable] = statistics.median(times)
                print(f"  (position {pos}: made in {made:.0f} s)", file=sys.stderr, flush=True)
            reread = rows.get(False)
            print(f"{pos:>10} {rows[True]:>9.2f}s {rows[True] - fresh:>+7.2f}s "
                  f"{(f'{reread:.2f}s' if reread is not None else '-'):>9} "
                  f"{(f'{reread - fresh:+.2f}s' if reread is not None else '-'):>8}", flush=True)


if __name__ == "__main__":
    main()
