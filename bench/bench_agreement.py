"""Per-step cost of the stop/pause/save agreement collective, against a training step.

    PYTHONPATH=. python bench/bench_agreement.py            # launches 2 gloo CPU ranks itself
    PYTHONPATH=. python bench/bench_agreement.py --nproc 1  # no collective at all (baseline)

Every optimizer step, TrainSession all_reduces (MAX) one int64[3] tensor [stop, pause,
save_seq] so that all ranks act at the same step (docs/platform.md: ranks that disagree deadlock).
This measures that call (session._agree(), as the loop makes it) and a DDP training step of
the examples/gpt model at ~2M parameters (batch 8, block 64) on the same 2 ranks, in one run.
Target (issue 3): agreement < 1% of a step.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(args: argparse.Namespace) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if args.nproc > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(port)]
    cmd += [__file__, "--worker", "--steps", str(args.steps), "--agreements", str(args.agreements)]
    return subprocess.call(cmd, env=env)


def worker(args: argparse.Namespace) -> None:
    import logging

    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    sys.path.insert(0, str(REPO))
    from examples.gpt.model import GPT, GPTConfig
    from train_core.session import TrainSession

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    acc = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    session = TrainSession(acc, config={}, micro_batch=8, max_steps=10**6,
                           run_dir=Path(tempfile.mkdtemp(prefix="bench-agree-")), resume=None)
    model = GPT(GPTConfig(vocab_size=2048, block_size=64, n_layer=4, n_head=4, n_embd=192, dropout=0.1))
    n_params = sum(p.numel() for p in model.parameters())
    opt = model.configure_optimizer(weight_decay=0.1, lr=3e-4)
    model, opt = acc.prepare(model, opt)
    xy = torch.randint(0, 2048, (8, 65))

    def step() -> None:
        _, loss = model(xy[:, :-1], xy[:, 1:])
        acc.backward(loss)
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()
    step_s = []
    for _ in range(args.steps):
        acc.wait_for_everyone()
        t0 = time.perf_counter()
        step()
        step_s.append(time.perf_counter() - t0)
    for _ in range(50):
        session._agree()
    agree_s = []
    acc.wait_for_everyone()
    for _ in range(args.agreements // 100):
        t0 = time.perf_counter()
        for _ in range(100):
            session._agree()
        agree_s.append((time.perf_counter() - t0) / 100)
    session.close()
    if acc.is_main_process:
        st, ag = statistics.median(step_s), statistics.median(agree_s)
        print(f"{acc.num_processes} rank(s) ({'gloo' if dist.is_initialized() else 'no collective'}), "
              f"GPT {n_params / 1e6:.2f} M params, batch 8 x 64 tokens, medians")
        print(f"  training step (DDP fwd+bwd+AdamW)   {st * 1000:9.2f} ms")
        print(f"  agreement all_reduce int64[3] MAX   {ag * 1e6:9.1f} us")
        print(f"  ratio agreement / step               {ag / st * 100:8.3f} %   (target < 1%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--agreements", type=int, default=2000)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
    else:
        sys.exit(launch(args))


if __name__ == "__main__":
    main()
