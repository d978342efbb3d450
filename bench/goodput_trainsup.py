"""The goodput bench's training under trainsup: the same model, data, optimizer and step as
bench/stock_recipe.py, checkpointed by a TrainSession (every --save-every steps and on every
stop request, resumed exactly). bench/goodput.py runs it through `trainsup run`;
bench/bench_restart.py adds --crash-when FILE (an exception in attempt 1 once FILE exists).
"""

import time

T_START = time.time()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from goodput_common import build, digest, log_event, parse_args, train_step  # noqa: E402

log_event("start", t_start=T_START)

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DataLoaderConfiguration  # noqa: E402

from train_core import TrainSession  # noqa: E402
from train_core.retention import RetentionPolicy  # noqa: E402


class SavedLog(logging.Handler):
    """Timestamps each committed checkpoint from the session's own "saved ..." log line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.t0 = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("saved "):
            log_event("saved", step=session.global_step, t0=self.t0)


def main() -> int:
    global session
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--crash-when", default=None, help="in attempt 1, raise after the first step that finds this file")
    known, rest = extra.parse_known_args()
    args = parse_args(rest)
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    session = TrainSession(accelerator, seed=args.seed, micro_batch=args.micro_batch, grad_accum=1,
                           max_steps=args.steps, save_every_steps=args.save_every, run_dir=args.out,
                           config={"steps": args.steps, "block_size": args.block_size},
                           retention=RetentionPolicy(keep_last=args.keep))
    train_set, model, optimizer, schedule = build(args)
    loader = session.dataloader(train_set, shuffle=True, drop_last=True)
    model, optimizer, loader = session.prepare(model, optimizer, loader)
    session.register("lr_schedule", schedule)
    saved = SavedLog()
    logging.getLogger("train_core.saving").addHandler(saved)
    logging.getLogger("train_core.saving").setLevel(logging.INFO)
    first = True
    with session:
        for batch in session.batches(loader):
            if first:
                log_event("first_batch", step=session.global_step)
                first = False
            train_step(accelerator, model, optimizer, batch)
            schedule.step()
            log_event("step", step=session.global_step + 1)
            if known.crash_when and session.attempt == 1 and os.path.exists(known.crash_when):
                log_event("crash", step=session.global_step + 1)
                raise RuntimeError(f"crash: {known.crash_when} exists (--crash-when)")
            saved.t0 = time.time()
            session.step_done(tokens=batch[0].numel())
    if accelerator.is_main_process:
        log_event("done", step=session.global_step, digest=digest(accelerator.unwrap_model(model)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
