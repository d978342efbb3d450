"""The rank of bench/bench_sleep_lock.py: the demo GPT (examples/gpt/model.py) at the default
tiny job's shape (vocab 4096, block 128, 4 layers x 4 heads x 128, micro-batch 16 x 2
accumulation, AdamW, EMA of the weights) trained on random tokens through TrainSession.

Random tokens instead of the stdlib corpus: no tokenizer to train, the same step cost and
the same checkpoint size, which is all a sleep-lock measurement depends on.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DataLoaderConfiguration  # noqa: E402

from examples.gpt.model import EMA, GPT, GPTConfig  # noqa: E402
from train_core import TrainSession  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--blocks", type=int, default=2048, help="random sequences in the data set")
    args = p.parse_args()

    cfg = GPTConfig(vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    session = TrainSession(accelerator, config={"model": dataclasses.asdict(cfg)},
                           seed=1337, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
                           max_steps=args.max_steps)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.blocks, cfg.block_size + 1), generator=g)
    data = torch.utils.data.TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    model = GPT(cfg)
    opt = model.configure_optimizer(weight_decay=0.1, lr=2e-3, betas=(0.9, 0.95))
    loader = session.dataloader(data, shuffle=True, drop_last=True)
    model, opt, loader = session.prepare(model, opt, loader)
    raw = accelerator.unwrap_model(model)
    ema = session.register("ema", EMA(raw, decay=0.999))
    if accelerator.is_main_process:
        print(f"model: {raw.num_params() / 1e6:.2f} M parameters, precision {accelerator.mixed_precision}", flush=True)
    with session:
        for x, y in session.batches(loader):
            with accelerator.accumulate(model):
                _, loss = model(x, y)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                ema.update(raw)
            session.step_done(loss=loss, tokens=x.numel())
    return 0


if __name__ == "__main__":
    sys.exit(main())
