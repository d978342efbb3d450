"""The stock Accelerate checkpointing recipe, as its docs and examples teach it (the baseline
of bench/goodput.py).

    accelerate launch --cpu bench/stock_recipe.py --out DIR [--steps 300 --save-every 25]

Every --save-every steps `accelerator.save_state(DIR/step_N)`; once it is written, all but
the newest --keep step dirs are deleted. On start, `load_state` of the highest-numbered
step dir and `skip_first_batches` into the epoch (examples/complete_nlp_example.py in
accelerate). A SIGTERM kills it where it stands (the recipe has no handler); a save cut
short leaves a step dir that `load_state` fails on, for a person to delete.
"""

import time

T_START = time.time()  # before the imports: restart cost includes them

import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from goodput_common import build, digest, log_event, parse_args, train_step  # noqa: E402

log_event("start", t_start=T_START)

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402


def step_dirs(out: Path) -> list[Path]:
    return sorted((p for p in out.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    set_seed(args.seed)
    train_set, model, optimizer, schedule = build(args)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.micro_batch, shuffle=True, drop_last=True)
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)

    overall_step, starting_epoch, resume_step = 0, 0, None
    existing = step_dirs(out)
    if existing:  # resume from the most recent checkpoint
        accelerator.load_state(str(existing[-1]))
        overall_step = int(existing[-1].name[5:])
        starting_epoch, resume_step = divmod(overall_step, len(loader))
        accelerator.print(f"resumed from {existing[-1].name}")

    first = True
    for epoch in range(starting_epoch, 10**9):
        if resume_step is not None and epoch == starting_epoch:
            active = accelerator.skip_first_batches(loader, resume_step)
        else:
            active = loader
        for batch in active:
            if first:
                log_event("first_batch", step=overall_step)
                first = False
            model.train()
            train_step(accelerator, model, optimizer, batch)
            schedule.step()
            overall_step += 1
            log_event("step", step=overall_step)
            if args.save_every and overall_step % args.save_every == 0:
                t0 = time.time()
                accelerator.save_state(str(out / f"step_{overall_step}"))
                if accelerator.is_main_process:
                    for old in step_dirs(out)[: -args.keep]:
                        shutil.rmtree(old)
                log_event("saved", step=overall_step, t0=t0)
            if overall_step >= args.steps:
                break
        if overall_step >= args.steps:
            break
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        log_event("done", step=overall_step, digest=digest(accelerator.unwrap_model(model)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
