"""A tiny training script on TrainSession, for the tests (and a readable example).

Everything that makes bitwise resume hard is on: dropout, shuffling, gradient accumulation,
an LR schedule, an EMA registered for checkpointing, AdamW state. The model is tiny so one
`accelerate launch` takes ~3 s, most of it imports.

Test hooks (all optional):
  --signal-at N[,M...]  send the save signal to this very process (a real os.kill) after the N-th
                        micro-batch of this attempt, before step_done (so N = k*grad_accum lands
                        on a step boundary, anything else mid gradient-accumulation)
  --signal-rank R       only rank R does that (default 0; -1 = every rank)
  --oom-at N            raise torch.OutOfMemoryError at the N-th micro-batch (how a CPU test
                        simulates CUDA running out of memory: the session reports kind "oom")
  --crash-at N          raise RuntimeError at the N-th micro-batch of every attempt (a crash)
  --sleep-s S           sleep S seconds per micro-batch (gives external signals time to land)
  --load-oom NAME[:N]   accelerator.load_state of checkpoint NAME raises torch.OutOfMemoryError,
                        the first N times in this process (default: every time)
  --save-sleep-s S      every save sleeps S seconds before writing (a slow disk, a big model)
  --write-sleep-s S     every background save's writer sleeps S seconds before writing (ditto,
                        for saves written in the background)
  --no-marker-rank R    rank R's background writer cannot leave its marker file (an I/O error)
  --prehook-rank R      rank R registers a save_state pre-hook (so it cannot stage its state)
  --stream KIND         read the data as a stream (IterableDataset, a seeded order per epoch,
                        each worker its share): "stateful" (state_dict/load_state_dict),
                        "plain" (no position: resumes by re-reading), "bad" (a state that is
                        not plain data)
  --stream-via-accelerate  prepare the stream's loader with accelerator.prepare, not
                        session.prepare (how a loader was prepared before stream positions)
On a normal finish rank 0 writes RUN_DIR/final_hash.json (sha256 of model, EMA and optimizer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root (not pip-installed)

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DataLoaderConfiguration  # noqa: E402

from train_core import TrainSession  # noqa: E402
from train_core.retention import RetentionPolicy  # noqa: E402

class EMA:
    """Exponential moving average of the parameters (a registered, checkpointed object)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


def make_data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


class ToyStream(torch.utils.data.IterableDataset):
    """A dataset read as a stream: a seeded order of its items per epoch, worker w of W reads
    every W-th item of it. No position: resuming re-reads. READS: (epoch, worker, k) of each
    item read in this process (in-process tests, no workers)."""

    READS: list = []

    def __init__(self, data: torch.utils.data.Dataset, seed: int):
        self.data, self.seed, self.epoch, self.pos = data, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order = order[worker::workers].tolist()
        start, self.pos = self.pos, 0
        for k in range(start, len(order)):
            self.pos = k + 1  # items handed out, as the state says
            ToyStream.READS.append((self.epoch, worker, k))
            yield self.data[order[k]]
        self.pos = 0


class StatefulToyStream(ToyStream):
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


class BadToyStream(StatefulToyStream):
    def state_dict(self) -> dict:
        import numpy as np

        return {"epoch": self.epoch, "pos": self.pos, "rng": np.random.default_rng(0)}


STREAMS = {"stateful": StatefulToyStream, "plain": ToyStream, "bad": BadToyStream}


def state_hash(model, ema, opt) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for k, v in sorted(ema.shadow.items()):
        h.update(v.cpu().contiguous().numpy().tobytes())
    for pid, st in sorted(opt.state_dict()["state"].items()):
        for k, v in sorted(st.items()):
            if isinstance(v, torch.Tensor):
                h.update(v.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def patch_for_tests(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """--load-oom and --save-sleep-s: faults inside accelerate's own load_state / save_state."""
    if args.load_oom:
        name, _, times = args.load_oom.partition(":")
        left = [int(times) if times else -1]
        real_load = accelerator.load_state

        def load_state(input_dir, **kw):
            if Path(input_dir).name == name and left[0] != 0:
                left[0] -= 1
                raise torch.OutOfMemoryError(f"simulated: out of memory while loading {name}")
            return real_load(input_dir, **kw)

        accelerator.load_state = load_state
    if args.save_sleep_s:
        real_save = accelerator.save_state

        def save_state(output_dir=None, **kw):
            print(f"toy: slow save into {Path(output_dir).name} ({args.save_sleep_s:g} s)", flush=True)
            time.sleep(args.save_sleep_s)
            return real_save(output_dir, **kw)

        accelerator.save_state = save_state


def slow_background_writes(session: TrainSession, seconds: float) -> None:
    """--write-sleep-s: this session's background writer sleeps before writing (in this session
    only: the in-process tests run many sessions in one process)."""
    saver = session._saver
    real = saver._write_files

    def write_files(tmp, trainer_state, staged=None, *rest, **kw):
        if staged is not None:
            print(f"toy: slow background write into {tmp.name} ({seconds:g} s)", flush=True)
            time.sleep(seconds)
        return real(tmp, trainer_state, staged, *rest, **kw)

    saver._write_files = write_files


def main(argv: list[str] | None = None, on_micro=None) -> int:
    """`on_micro(n, session, x)` (in-process tests only) runs after each micro-batch, before step_done."""
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--epochs", type=int)
    p.add_argument("--dataset-size", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--save-every", default="0", type=lambda v: v if v == "auto" else int(v))
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--resume", default="auto")
    p.add_argument("--allow-change", action="append", default=[])
    p.add_argument("--keep-last", type=int)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--persistent-workers", action="store_true")
    p.add_argument("--signal-at", default="")
    p.add_argument("--signal-rank", type=int, default=0)
    p.add_argument("--oom-at", type=int)
    p.add_argument("--crash-at", type=int)
    p.add_argument("--sleep-s", type=float, default=0.0)
    p.add_argument("--load-oom", default="")
    p.add_argument("--save-sleep-s", type=float, default=0.0)
    p.add_argument("--write-sleep-s", type=float, default=0.0)
    p.add_argument("--no-marker-rank", type=int)
    p.add_argument("--prehook-rank", type=int)
    p.add_argument("--stream", choices=sorted(STREAMS))
    p.add_argument("--stream-via-accelerate", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    patch_for_tests(accelerator, args)
    config = {"lr": args.lr, "hidden": args.hidden, "dropout": 0.2, "dataset_size": args.dataset_size,
              "optim": {"name": "adamw", "weight_decay": 0.01}}
    session = TrainSession(
        accelerator, config=config, seed=1234, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
        max_steps=args.steps, max_epochs=args.epochs, save_every_steps=args.save_every,
        eval_every_steps=args.eval_every, allow_changes=tuple(args.allow_change), run_dir=args.run_dir,
        resume=None if args.resume == "never" else args.resume,
        retention=RetentionPolicy(keep_last=args.keep_last, keep_best=0) if args.keep_last else None,
    )
    if args.write_sleep_s:
        slow_background_writes(session, args.write_sleep_s)
    if args.no_marker_rank == accelerator.process_index:
        def no_marker(job, error):
            raise OSError(5, "Input/output error (--no-marker-rank)")

        session._saver._leave_marker = no_marker
    if args.prehook_rank == accelerator.process_index:
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: None)
    model = torch.nn.Sequential(torch.nn.Linear(8, args.hidden), torch.nn.GELU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(args.hidden, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    total = args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * max(0.05, 1 - s / (total * 2)))
    data = make_data(args.dataset_size, 1)
    train_dl = session.dataloader(STREAMS[args.stream](data, seed=7) if args.stream else data,
                                  num_workers=args.num_workers, persistent_workers=args.persistent_workers)
    val = make_data(16, 2)
    if args.stream_via_accelerate:
        model, opt, sched = session.prepare(model, opt, sched)
        train_dl = accelerator.prepare(train_dl)
    else:
        model, opt, train_dl, sched = session.prepare(model, opt, train_dl, sched)
    ema = session.register("ema", EMA(accelerator.unwrap_model(model)))

    signal_at = {int(n) for n in args.signal_at.split(",") if n}
    me = args.signal_rank in (-1, accelerator.process_index)
    n_micro = 0
    with session:
        for x, y in session.batches(train_dl):
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
            if accelerator.sync_gradients:
                ema.update(accelerator.unwrap_model(model))
            n_micro += 1
            if me and n_micro in signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            if args.crash_at == n_micro:
                raise RuntimeError(f"simulated crash at micro-batch {n_micro}")
            if args.oom_at == n_micro:
                raise torch.OutOfMemoryError(f"simulated: tried to allocate at micro-batch {n_micro}")
            if args.sleep_s:
                time.sleep(args.sleep_s)
            if on_micro is not None:
                on_micro(n_micro, session, x)
            session.step_done(loss=loss, tokens=x.numel())
            if session.should_evaluate():
                model.eval()
                with torch.no_grad():
                    val_loss = torch.nn.functional.mse_loss(model(val.tensors[0]), val.tensors[1]).item()
                model.train()
                session.report_metrics({"val_loss": val_loss})
    if accelerator.is_main_process:
        out = {"hash": state_hash(accelerator.unwrap_model(model), ema, opt), "step": session.global_step,
               "epoch": session.epoch}
        (session.paths.run_dir / "final_hash.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("TOY_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
