"""Save request -> committed checkpoint, against plain `accelerator.save_state` of the same state.

    PYTHONPATH=. python bench/bench_save.py                      # GPT ~10M params, 5 repeats
    PYTHONPATH=. python bench/bench_save.py --n-embd 512 --n-layer 8 --repeats 3

One process, the examples/gpt model with AdamW state and an EMA (what a real checkpoint
holds). Measured in one run, medians of --repeats:
  plain      accelerator.save_state(dir)          (no fsync, no hashes: not crash-safe)
  session    TrainSession's save at a step boundary: begin tmp dir, save_state, trainer state,
             sha256 + fsync of every file, manifest last, rename, fsync parent
  request    SIGUSR1 sent while a step is half done (mid gradient-accumulation) -> commit
             renamed into place: waits for the step boundary, then the save above
Target (issue 3): request < 1.5 x plain + one optimizer step.

It also times the resume position cost: the first batch out of session.batches() when the
checkpoint sits 0 / 1k / 100k batches into an epoch of a map-style dataset (the sampler skips
indices, no item is loaded; target: 100k batches < 1 s).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DataLoaderConfiguration  # noqa: E402

from examples.gpt.model import EMA, GPT, GPTConfig  # noqa: E402
from train_core.session import StopTraining, TrainSession  # noqa: E402


def build(run_dir: Path, args: argparse.Namespace, grad_accum: int):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    session = TrainSession(acc, config={"bench": 1}, micro_batch=args.batch, grad_accum=grad_accum,
                           max_steps=10**6, run_dir=run_dir, resume=None)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.n_layer, n_head=4,
                    n_embd=args.n_embd, dropout=0.1)
    model = GPT(cfg)
    opt = model.configure_optimizer(weight_decay=0.1, lr=3e-4, betas=(0.9, 0.95))
    data = torch.randint(0, args.vocab, (args.batch * 64, args.block + 1))
    dl = session.dataloader(torch.utils.data.TensorDataset(data), shuffle=True)
    model, opt, dl = session.prepare(model, opt, dl)
    ema = session.register("ema", EMA(acc.unwrap_model(model)))
    return acc, session, model, opt, dl, ema


def train_micro(acc, model, opt, ema, batch) -> None:
    (xy,) = batch
    with acc.accumulate(model):
        _, loss = model(xy[:, :-1], xy[:, 1:])
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
    if acc.sync_gradients:
        ema.update(acc.unwrap_model(model))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", help="where to write (default: a temp dir; put it on the disk you train on)")
    args = p.parse_args()
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "Removed shared tensor" (tied weights)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = Path(tempfile.mkdtemp(prefix="bench-save-", dir=args.dir))
    try:
        acc, session, model, opt, dl, ema = build(root / "run", args, grad_accum=1)
        n_params = sum(p.numel() for p in acc.unwrap_model(model).parameters())
        it = iter(session.batches(dl))
        with session:
            for _ in range(3):  # warm up and fill the AdamW state
                train_micro(acc, model, opt, ema, next(it))
                session.step_done()
            plain_s, session_s = [], []
            for i in range(args.repeats):
                d = root / f"plain-{i}"
                os.sync()  # each measurement starts with no dirty pages of the previous one
                t0 = time.perf_counter()
                acc.save_state(str(d))
                plain_s.append(time.perf_counter() - t0)
                session.global_step = 1000 + i  # a fresh step-N each time
                os.sync()
                t0 = time.perf_counter()
                ckpt = session._save(["request"])
                session_s.append(time.perf_counter() - t0)
                shutil.rmtree(d)
            size_mb = ckpt.path.stat().st_size and sum(f.stat().st_size for f in ckpt.path.iterdir()) / 1e6
            session.close()

        # End to end: SIGUSR1 arrives after the first of grad_accum=2 micro-batches; the save
        # waits for the boundary (one more micro-batch), commits, and the loop raises.
        request_s, step2_s, sync_micro_s = [], [], []
        for i in range(args.repeats):
            acc, session, model, opt, dl, ema = build(root / f"req-{i}", args, grad_accum=2)
            it = iter(session.batches(dl))
            session.__enter__()
            for _ in range(3):
                train_micro(acc, model, opt, ema, next(it))
                session.step_done()
            t0 = time.perf_counter()  # micro-batch 4 closes step 2: fwd+bwd+AdamW+EMA+agreement
            train_micro(acc, model, opt, ema, next(it))
            session.step_done()
            sync_micro = time.perf_counter() - t0
            t0 = time.perf_counter()  # micro-batch 5 opens step 3
            train_micro(acc, model, opt, ema, next(it))
            session.step_done()
            step2_s.append(time.perf_counter() - t0 + sync_micro)
            sync_micro_s.append(sync_micro)
            os.sync()
            os.kill(os.getpid(), signal.SIGUSR1)  # mid gradient-accumulation
            t0 = time.perf_counter()
            try:
                train_micro(acc, model, opt, ema, next(it))  # micro-batch 6 closes step 3, then the save
                session.step_done()
                raise RuntimeError("the stop request was not honoured at the step boundary")
            except StopTraining:
                request_s.append(time.perf_counter() - t0)
            session._teardown()
            session.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    skip_s = {n: first_batch_after_skip(root, n) for n in (0, 1_000, 100_000)}

    med = statistics.median
    plain, sess, req = med(plain_s), med(session_s), med(request_s)
    step, sync_micro = med(step2_s), med(sync_micro_s)
    print(f"GPT {n_params / 1e6:.1f} M params (+AdamW +EMA), checkpoint {size_mb:.0f} MB, "
          f"{args.repeats} repeats, medians")
    print(f"  plain accelerator.save_state       {plain * 1000:8.1f} ms")
    print(f"  session save (commit, fsync, sha)  {sess * 1000:8.1f} ms   ratio {sess / plain:.2f}x plain")
    print(f"  one optimizer step (2 micro-batches) {step * 1000:6.1f} ms   (closing micro-batch {sync_micro * 1000:.1f} ms)")
    print(f"  request mid-step -> committed      {req * 1000:8.1f} ms   = rest of the step + save; "
          f"(request - closing micro-batch) / plain = {(req - sync_micro) / plain:.2f}x")
    target = 1.5 * plain + step
    print(f"  target 1.5 x plain + one step      {target * 1000:8.1f} ms   -> {'OK' if req < target else 'MISSED'} "
          f"(request / target = {req / target:.2f})")
    print("resume position (map-style, 400k items, batch 4): first batch after skipping")
    for n, t in skip_s.items():
        print(f"  {n:>7} batches                    {t * 1000:8.1f} ms   ({t / skip_s[0]:.1f}x the 0-batch case)")


class _Items(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i])


def first_batch_after_skip(root: Path, n_batches: int) -> float:
    """Seconds from entering session.batches() at `n_batches` into epoch 0 to its first batch."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    session = TrainSession(acc, micro_batch=4, max_steps=10**6, run_dir=root / f"skip-{n_batches}", resume=None)
    dl = session.prepare(session.dataloader(_Items(400_000), shuffle=True))
    session.__enter__()
    session._skip_batches = session.batch_in_epoch = n_batches  # what a resume at that position sets
    t0 = time.perf_counter()
    next(iter(session.batches(dl)))
    elapsed = time.perf_counter() - t0
    session._teardown()
    session.close()
    return elapsed


if __name__ == "__main__":
    main()
