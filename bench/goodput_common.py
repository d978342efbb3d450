"""What the two goodput scripts share: the model, data, optimizer and step, and the timestamp log.

Imported by bench/stock_recipe.py and bench/goodput_trainsup.py, which differ only in how
they checkpoint and resume; bench/goodput.py runs both and reads their logs.

The log ($GOODPUT_LOG, one JSON object a line, appended with one write() each, so a SIGKILL
loses at most the line being written): {"ev": ..., "t": time.time(), "pid": ...} with ev
  start        the script's first line ran (before torch is imported)
  first_batch  the first batch of this process is in hand (training is about to start)
  step         an optimizer step ended ("step": its number, 1-based)
  saved        a checkpoint of "step" is complete ("t0": when the save began)
  done         training is over ("digest": sha256 of the final weights)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log_event(ev: str, **fields) -> None:
    path = os.environ.get("GOODPUT_LOG")
    if not path:
        return
    line = json.dumps({"ev": ev, "t": time.time(), "pid": os.getpid(), **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps in total")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per step (x block size = tokens/step)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--save-every", type=int, default=25, help="checkpoint every N steps (0: only on a stop)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (older ones deleted after a new one)")
    p.add_argument("--out", required=True, help="output dir: checkpoints go here")
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


LR, MIN_LR, WARMUP = 2e-3, 2e-4, 30


def lr_factor(step: int, total: int) -> float:
    """Warmup then cosine decay (the demo's schedule), as a factor of LR."""
    if step < WARMUP:
        return (step + 1) / (WARMUP + 1)
    ratio = min(1.0, (step - WARMUP) / max(1, total - WARMUP))
    return (MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)) / LR


def build(args: argparse.Namespace):
    """(train dataset, model, optimizer, LR schedule): the demo's tiny GPT on the cached corpus."""
    import torch

    from examples.gpt.data import TokenBlockDataset, prepare_data
    from examples.gpt.model import GPT, GPTConfig
    from examples.gpt.train import default_cache_dir

    data = prepare_data(None, default_cache_dir(), vocab_size=4096, val_fraction=0.1, max_corpus_bytes=4_000_000)
    train_set = TokenBlockDataset(data.train_path, args.block_size)
    model = GPT(GPTConfig(vocab_size=4096, block_size=args.block_size, n_layer=4, n_head=4, n_embd=128, dropout=0.0))
    optimizer = model.configure_optimizer(weight_decay=0.1, lr=LR, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps))
    return train_set, model, optimizer, schedule


def train_step(accelerator, model, optimizer, batch) -> None:
    x, y = batch
    _, loss = model(x, y)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def digest(model) -> str:
    """sha256 over the final weights, in state_dict order: equal digests = bitwise equal models."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
