"""Train a small GPT on a text corpus, preemptible and exactly resumable, under trainsup.

    trainsup run examples/gpt/job.toml               # the tiny default job, supervised
    python examples/gpt/train.py --max-steps 50      # plainly, one process
    accelerate launch examples/gpt/train.py ...      # or through accelerate, any number of ranks

Reads like nanoGPT's train.py: prepare the data, build the model, optimizer and LR schedule,
then one loop. What trainsup adds is the TrainSession around the loop: a SIGTERM, SIGUSR1 or
a supervisor's request saves at the next optimizer step and exits 75, and the next run
resumes mid-epoch, bit for bit, from the newest valid checkpoint.

Every default is in parse_args() below (one block, grouped, commented). Relative paths are
relative to the working directory (under `trainsup run`: the job file's folder).

Files written in the run dir (besides trainsup's checkpoints/, status.json, ...):
  metrics.jsonl   written by the TrainSession: a line per step (loss, lr, tokens/s) and one per
                  evaluation (step, val_loss, val_ppl and the EMA's)
  tensorboard/    loss, lr, tokens/s, val loss and perplexity, a note at every resume
                  (tensorboard --logdir RUN_DIR); a resumed run continues the same curves
  sample.txt      text generated from the EMA weights when training is over
Bad input (corpus, block size, vocab size, hyperparameters) stops before training with a
one-line error naming the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: examples/ is not pip-installed

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DataLoaderConfiguration  # noqa: E402
from tqdm import tqdm  # noqa: E402

from examples.gpt.data import DataError, TokenBlockDataset, TokenStream, load_tokenizer, prepare_data  # noqa: E402
from examples.gpt.model import EMA, GPT, GPTConfig  # noqa: E402
from train_core import TrainSession  # noqa: E402
from train_core.contract import report_bad_input  # noqa: E402

log = logging.getLogger("examples.gpt.train")


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "trainsup", "gpt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a small GPT under trainsup (see the module docstring).")
    a = p.add_argument
    # -------------------------------------------------------------------------------------
    # Defaults: the tiny job (a few minutes on 2 CPU cores, loss visibly falling).
    # data: the CPython standard library sources exist wherever Python does (nothing to download)
    a("--corpus", default=None, help="text file or folder of text files (default: the Python standard library sources)")
    a("--cache-dir", default=default_cache_dir(), help="prepared tokenizer + token files, keyed by corpus and settings")
    a("--max-corpus-bytes", type=int, default=4_000_000, help="use at most this much of the corpus (0: all of it)")
    a("--vocab-size", type=int, default=4096, help="byte-level BPE vocabulary (257..65536)")
    a("--val-fraction", type=float, default=0.1, help="the last part of the token stream held out for evaluation")
    # model: ~1.3 M parameters at the defaults
    a("--block-size", type=int, default=128, help="context length in tokens")
    a("--n-layer", type=int, default=4)
    a("--n-head", type=int, default=4)
    a("--n-embd", type=int, default=128)
    a("--dropout", type=float, default=0.0, help="0 for pretraining on this much data; try 0.1+ when it overfits")
    a("--bias", action="store_true", help="biases in Linear and LayerNorm layers")
    # batch: tokens per optimizer step = micro_batch * grad_accum * block_size * ranks
    a("--micro-batch", type=int, default=16, help="sequences per forward pass (trainsup may shrink it after an OOM)")
    a("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    # optimizer: AdamW; warmup then cosine decay to min_lr (nanoGPT's get_lr)
    a("--max-steps", type=int, default=300, help="optimizer steps in total")
    a("--lr", type=float, default=2e-3, help="peak learning rate")
    a("--min-lr", type=float, default=None, help="learning rate at the end of the decay (default: lr / 10)")
    a("--warmup-steps", type=int, default=30)
    a("--lr-decay-steps", type=int, default=None, help="cosine decay ends here (default: max_steps)")
    a("--weight-decay", type=float, default=0.1)
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.95)
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    a("--ema-decay", type=float, default=0.999, help="EMA of the weights (warmed up: early steps average less)")
    # precision: normally set by the launcher (the job's [launch] mixed_precision; the demo job's "auto"
    # picks bf16 only where the hardware has it natively, else fp16 on an older CUDA GPU, else fp32)
    a("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
      help="override the launcher's choice: no (fp32), bf16 (slow where the CPU lacks native bf16), "
      "fp16 (CUDA, with a GradScaler)")
    # evaluation, checkpoints, logging
    a("--eval-every", type=int, default=50, help="evaluate every N steps (0: only at the start); best val_loss is kept")
    a("--eval-batches", type=int, default=8, help="val micro-batches per evaluation (the same ones every time)")
    a("--save-every", type=int, default=100, help="checkpoint every N steps (0: off; the job's [checkpoint] "
      "interval_steps wins); a stop request always saves")
    a("--log-every", type=int, default=10, help="a progress line every N steps when stdout is not a terminal; "
      "TensorBoard gets loss, lr and tokens/s as often")
    a("--tensorboard", choices=("auto", "on", "off"), default="auto",
      help="curves under RUN_DIR/tensorboard through accelerate's tracker (auto: when the package is installed)")
    a("--num-workers", type=int, default=0, help="DataLoader workers (memory-mapped tokens: 0 is usually enough)")
    a("--stream", action="store_true", help="read the training windows as a stream (shards in a seeded order, "
      "an IterableDataset that resumes from its position) instead of a shuffled map-style dataset")
    a("--seed", type=int, default=1337)
    a("--run-dir", default=None, help="default: $TRAINSUP_RUN_DIR (set by trainsup run), else ./runs/train")
    a("--allow-change", action="append", default=[], metavar="KEY",
      help="resume although this config key changed (e.g. optim.lr); repeatable")
    # sample at the end, from the EMA weights
    a("--sample-tokens", type=int, default=200, help="tokens to generate at the end (0: no sample)")
    a("--sample-prompt", default="", help="text to continue (default: the start of a new file)")
    a("--temperature", type=float, default=0.8)
    a("--top-k", type=int, default=50)
    # -------------------------------------------------------------------------------------
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, as a message naming the fix; None when all is well."""
    positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "micro_batch", "grad_accum", "max_steps",
                "eval_batches", "log_every")
    for name in positive:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    for name in ("warmup_steps", "eval_every", "save_every", "sample_tokens", "num_workers", "max_corpus_bytes"):
        if getattr(args, name) < 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}"
    if args.lr <= 0:
        return f"--lr must be > 0, got {args.lr}; use e.g. 1e-3"
    if args.min_lr is not None and not 0 <= args.min_lr <= args.lr:
        return f"--min-lr must be in [0, lr={args.lr}], got {args.min_lr}"
    if args.lr_decay_steps is not None and args.lr_decay_steps <= args.warmup_steps:
        return f"--lr-decay-steps ({args.lr_decay_steps}) must be larger than --warmup-steps ({args.warmup_steps})"
    if not 0 <= args.grad_clip:
        return f"--grad-clip must be >= 0 (0: off), got {args.grad_clip}"
    if args.top_k < 1:
        return f"--top-k must be >= 1, got {args.top_k}"
    return None


def get_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, cosine decay, then flat."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / (decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TokenBlockDataset, n_blocks: int, batch_size: int,
             accelerator: Accelerator) -> float:
    """Mean loss on the first n_blocks val blocks: the same blocks every time, so evaluations compare.
    The blocks are split over the ranks; `model` is the unwrapped model (no DDP collectives)."""
    model.eval()  # no dropout: evaluation draws no random numbers, so it never shifts the training RNG
    mine = list(range(accelerator.process_index, n_blocks, accelerator.num_processes))
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # sum of losses, blocks
    for i in range(0, len(mine), batch_size):
        xs, ys = zip(*(dataset[j] for j in mine[i : i + batch_size]))
        x, y = torch.stack(xs).to(accelerator.device), torch.stack(ys).to(accelerator.device)
        _, loss = model(x, y)
        total += torch.tensor([loss.item() * len(xs), len(xs)], dtype=torch.float64, device=accelerator.device)
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1])


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 80.0))  # capped: exp overflows past ~709, and such a model is noise anyway


def tensorboard_installed() -> bool:
    try:
        from torch.utils import tensorboard  # noqa: F401  (what accelerate's tracker imports)
    except ImportError:
        return False
    return True


def start_tensorboard(accelerator: Accelerator, run_dir: Path, first_step: int) -> None:
    """TensorBoard curves under RUN_DIR/tensorboard through accelerate's tracker (accelerator.log
    then writes to it on the main process, flushing at every call). A run that resumes at step S
    continues the same curves: its writer purges what earlier attempts logged past S (steps a
    crash made it recompute), so no step shows twice; from step 0, everything is logged again."""
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker("tensorboard", run_dir, purge_step=first_step + 1 if first_step else 0)
    accelerator.log_with = [tracker]
    accelerator.init_trackers("tensorboard")
    if accelerator.is_main_process:
        atexit.register(tracker.finish)  # the last points are written on any exit, a stop's (75) too


def fail(message: str) -> int:
    """Bad input: one line, exit 2, nothing trained. Under trainsup the rank's exit report says
    so too, and the supervisor stops with exit 2 instead of retrying the same input."""
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    return report_bad_input(message)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_args(args)
    if problem:
        return fail(problem)
    tensorboard = args.tensorboard == "on" or (args.tensorboard == "auto" and tensorboard_installed())
    if args.tensorboard == "on" and not tensorboard_installed():
        return fail("--tensorboard on: the tensorboard package is missing; pip install tensorboard "
                    "(or pip install -e '.[tensorboard]'), or --tensorboard off")
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    decay_steps = args.max_steps if args.lr_decay_steps is None else args.lr_decay_steps
    try:
        model_cfg = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                              n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=args.bias)
    except ValueError as e:
        return fail(str(e))

    # ---- data: before the session starts, so a bad corpus fails fast and the heartbeat only
    # starts once training can. Every rank calls prepare_data: one prepares (file lock), the
    # rest wait and read the cache; a second run finds the cache and trains no tokenizer.
    t_start = time.perf_counter()
    try:
        data = prepare_data(args.corpus, args.cache_dir, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                            max_corpus_bytes=args.max_corpus_bytes or None)
    except DataError as e:
        return fail(str(e))
    data_s = time.perf_counter() - t_start
    # tokenizers' thread pool and forked DataLoader workers do not mix (it warns, then serialises)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for split, n_tokens in (("train", data.n_train_tokens), ("val", data.n_val_tokens)):
        if args.block_size + 1 > n_tokens:
            more = " or a larger --val-fraction" if split == "val" else ""
            return fail(f"block size larger than the data: --block-size {args.block_size} needs "
                        f"{args.block_size + 1} tokens but the {split} split holds {n_tokens}; use "
                        f"--block-size <= {n_tokens - 1}{more} or a larger corpus")
    train_set = (TokenStream(data.train_path, args.block_size, seed=args.seed) if args.stream
                 else TokenBlockDataset(data.train_path, args.block_size))
    val_set = TokenBlockDataset(data.val_path, args.block_size)

    # ---- the session: seeds every RNG (before the model is built), resumes in `with session:`
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    ranks = accelerator.num_processes
    if len(train_set) < args.micro_batch * ranks:
        return fail(f"the train split holds {len(train_set)} blocks of {args.block_size} tokens, fewer than one "
                    f"batch (--micro-batch {args.micro_batch} x {ranks} ranks); lower --micro-batch or "
                    "--block-size, or use a larger corpus")
    # What the weights depend on: resuming with any of it changed is refused (--allow-change KEY).
    # Batch geometry is tracked by the session itself; eval, logging and max_steps may change freely.
    config = {
        "model": dataclasses.asdict(model_cfg),
        "data": {"key": data.key, "corpus": str(args.corpus or "stdlib"), "val_fraction": args.val_fraction,
                 "max_corpus_bytes": args.max_corpus_bytes, **({"stream": True} if args.stream else {})},
        "optim": {"lr": args.lr, "min_lr": min_lr, "warmup_steps": args.warmup_steps, "decay_steps": decay_steps,
                  "weight_decay": args.weight_decay, "betas": [args.beta1, args.beta2], "grad_clip": args.grad_clip},
        "ema_decay": args.ema_decay,
        "mixed_precision": accelerator.mixed_precision,
    }
    session = TrainSession(
        accelerator, config=config, seed=args.seed, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
        max_steps=args.max_steps, save_every_steps=args.save_every, eval_every_steps=args.eval_every,
        best_metric="val_loss", allow_changes=args.allow_change, run_dir=args.run_dir,
    )
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # free speed on Ampere+, no effect on fp16 autocast
        torch.backends.cudnn.allow_tf32 = True

    model = GPT(model_cfg)
    optimizer = model.configure_optimizer(weight_decay=args.weight_decay, lr=args.lr, betas=(args.beta1, args.beta2))
    # Not passed to prepare(): accelerate would step it once per rank per optimizer step. Stepped
    # here once per optimizer step, and checkpointed through session.register like any state.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: get_lr(
        step, lr=args.lr, min_lr=min_lr, warmup_steps=args.warmup_steps, decay_steps=decay_steps) / args.lr)
    # drop_last: every micro-batch has the same shape (steady tokens/s, no tiny last batch);
    # a map-style dataset is shuffled by the seeded sampler, a stream is read in its own order
    train_loader = session.dataloader(train_set, drop_last=True, num_workers=args.num_workers)
    model, optimizer, train_loader = session.prepare(model, optimizer, train_loader)
    raw_model = accelerator.unwrap_model(model)  # the GPT itself: for the EMA, eval and sampling
    ema = session.register("ema", EMA(raw_model, decay=args.ema_decay))
    session.register("lr_schedule", schedule)
    # With fp16 on CUDA, accelerate owns a GradScaler and save_state/load_state include it
    # (scaler.pt): nothing to register for it.

    main_rank = accelerator.is_main_process
    # the script's micro-batch, not session.micro_batch: an OOM back-off must not change what
    # val_loss is measured on (the best checkpoint compares values across attempts)
    n_eval_blocks = min(len(val_set), args.eval_batches * args.micro_batch)
    tokens_per_step = session.micro_batch * session.grad_accum * args.block_size * ranks
    if main_rank:
        print(f"model: {raw_model.num_params() / 1e6:.2f} M parameters | data: {data.n_train_tokens:,} train / "
              f"{data.n_val_tokens:,} val tokens, vocab {data.vocab_size} ({'cached' if data.cache_hit else 'prepared'} "
              f"in {data_s:.1f} s) | {tokens_per_step:,} tokens/step "
              f"(micro-batch {session.micro_batch} x accum {session.grad_accum} x {ranks} rank(s)) | "
              f"precision {accelerator.mixed_precision} on {accelerator.device}", flush=True)

    def record_eval(step: int, say) -> dict[str, float]:
        """Evaluate the model and its EMA; print and return the metrics (the session records them)."""
        val_loss = evaluate(raw_model, val_set, n_eval_blocks, session.micro_batch, accelerator)
        metrics = {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}
        if step > 0:  # at step 0 the EMA equals the model
            with ema.average_parameters(raw_model):
                ema_loss = evaluate(raw_model, val_set, n_eval_blocks, session.micro_batch, accelerator)
            metrics.update(ema_val_loss=ema_loss, ema_val_ppl=perplexity(ema_loss))
        accelerator.log({f"val/{k.replace('val_', '')}": v for k, v in metrics.items()}, step=step)
        if main_rank:
            ema_text = f" | ema {metrics['ema_val_loss']:.4f}" if "ema_val_loss" in metrics else ""
            say(f"step {step}: val loss {val_loss:.4f}, perplexity {metrics['val_ppl']:.1f}{ema_text}")
        return metrics

    with session:  # resumes here (model, optimizer, EMA, schedule, RNGs, position in the epoch)
        first_step = session.global_step
        # tqdm only on a terminal: under `trainsup run` output goes to a log, which gets plain lines
        bar = tqdm(total=args.max_steps, initial=first_step, unit="step", dynamic_ncols=True,
                   disable=not (main_rank and sys.stderr.isatty()))
        say = bar.write if not bar.disable else (lambda s: print(s, flush=True))
        if tensorboard:
            start_tensorboard(accelerator, session.paths.run_dir, first_step)
        if first_step == 0:
            session.log_metrics(record_eval(0, say))  # the baseline every later evaluation is compared with
        else:
            note = f"resumed at step {first_step} (epoch {session.epoch}, batch {session.batch_in_epoch})"
            say(note)
            accelerator.log({"resume": f"attempt {session.attempt}: {note}"}, step=first_step)
        loss_sum = torch.zeros((), device=accelerator.device)
        t_mark, step_mark = time.perf_counter(), first_step
        t_first = None
        for x, y in session.batches(train_loader):
            with accelerator.accumulate(model):  # gradients sync and the optimizer steps every grad_accum batches
                _, loss = model(x, y)
                accelerator.backward(loss)  # scales for fp16, divides by grad_accum
                if accelerator.sync_gradients and args.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)  # unscales fp16 first
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            if accelerator.sync_gradients:  # an optimizer step just happened
                schedule.step()
                ema.update(raw_model)
            session.step_done(loss=loss, tokens=x.numel())  # may save, or save and stop (exit 75)
            if not accelerator.sync_gradients:
                continue
            step = session.global_step
            if t_first is None:
                t_first = time.perf_counter()
                t_mark, step_mark = t_first, step
            bar.update(1)
            if step % args.log_every == 0 or step == args.max_steps:
                train_loss = loss_sum.item() / session.grad_accum  # .item() waits for the device: only here
                dt = time.perf_counter() - t_mark
                rate = (step - step_mark) * tokens_per_step / dt if dt > 0 and step > step_mark else float("nan")
                t_mark, step_mark = time.perf_counter(), step
                accelerator.log({"train/loss": train_loss, "train/lr": schedule.get_last_lr()[0],
                                 **({"train/tokens_per_s": rate} if math.isfinite(rate) else {})}, step=step)
                if not bar.disable:
                    bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
                elif main_rank:
                    print(f"step {step}/{args.max_steps} | loss {train_loss:.4f} | lr "
                          f"{schedule.get_last_lr()[0]:.2e} | {rate / 1e3:.1f}k tokens/s", flush=True)
            loss_sum.zero_()
            if session.should_evaluate():
                session.report_metrics(record_eval(step, say))  # a better val_loss adds a "best" checkpoint
        bar.close()
        if t_first is not None and main_rank and session.global_step > first_step + 1:
            # from the end of the first step (warm-up excluded) to the last; evaluations included
            n_steps = session.global_step - first_step - 1
            seconds = time.perf_counter() - t_first
            print(f"trained steps {first_step + 1}..{session.global_step}: {n_steps * tokens_per_step:,} tokens in "
                  f"{seconds:.1f} s after the first step = {n_steps * tokens_per_step / seconds:.0f} tokens/s", flush=True)
    # leaving the block saved the "final" checkpoint (after a stop request the process exited 75)

    if main_rank and args.sample_tokens > 0:
        tokenizer = load_tokenizer(data.tokenizer_path)
        prompt_ids = tokenizer.encode(args.sample_prompt).ids if args.sample_prompt else [data.eot_id]
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=accelerator.device)
        generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
        with ema.average_parameters(raw_model):  # the averaged weights usually sample better
            out = raw_model.generate(idx, args.sample_tokens, temperature=args.temperature,
                                     top_k=min(args.top_k, data.vocab_size), generator=generator)
        new_ids = out[0, 0 if args.sample_prompt else 1 :].tolist()
        text = tokenizer.decode(new_ids, skip_special_tokens=False)
        (session.paths.run_dir / "sample.txt").write_text(text + "\n")
        print(f"---- sample from the EMA weights at step {session.global_step} "
              f"({session.paths.run_dir / 'sample.txt'}) ----\n{text}\n---- end of sample ----", flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("examples", "train_core"):  # our own progress messages; accelerate's stay quiet
        logging.getLogger(name).setLevel(logging.INFO)
    # Every save: lm_head.weight IS wte.weight (tied), safetensors stores it once, load_state
    # ties it again. Expected, so not worth a warning per checkpoint.
    logging.getLogger("accelerate.utils.other").addFilter(
        lambda record: "Removed shared tensor {'lm_head.weight'}" not in record.getMessage())
    sys.exit(main())
