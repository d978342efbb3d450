"""toy_train.py with a simulated GPU memory limit, for the OOM back-off tests (CPU only).

  --fit N             a micro-batch of more than N samples "does not fit": the rank raises
                      torch.OutOfMemoryError, as CUDA would (the session reports kind "oom")
  --oom-from-step K   ... only from optimizer step K on, so the run first makes progress and
                      commits checkpoints (like a run whose memory use grows)
  --oom-rank R        ... only on rank R (default: every rank); the other ranks meet a dead peer
  --sample-log PATH   append one JSON line per trained micro-batch: attempt, rank, step,
                      micro_batch, grad_accum and the rows (first feature of each sample)
Every other argument goes to toy_train.py (--micro-batch, --grad-accum, --steps, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import toy_train  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fit", type=int, required=True)
    p.add_argument("--oom-from-step", type=int, default=0)
    p.add_argument("--oom-rank", type=int)
    p.add_argument("--sample-log")
    args, rest = p.parse_known_args()
    attempt = int(os.environ.get("TRAINSUP_ATTEMPT", "0"))

    def on_micro(n: int, session, x) -> None:
        mine = args.oom_rank is None or args.oom_rank == session.rank
        if mine and x.shape[0] > args.fit and session.global_step >= args.oom_from_step:
            raise torch.OutOfMemoryError(
                f"simulated: CUDA out of memory. Tried to allocate a micro-batch of {x.shape[0]} "
                f"(fits {args.fit}) at step {session.global_step}")
        if args.sample_log:
            rec = {"attempt": attempt, "rank": session.rank, "step": session.global_step,
                   "micro_batch": session.micro_batch, "grad_accum": session.grad_accum,
                   "rows": [float(v) for v in x[:, 0].tolist()]}
            with open(args.sample_log, "a") as f:
                f.write(json.dumps(rec) + "\n")

    return toy_train.main(rest, on_micro=on_micro)


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("TOY_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
