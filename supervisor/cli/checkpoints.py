"""`trainsup checkpoints list|verify|prune`: look at, check and thin out a run's checkpoints.

Exit codes: 0 ok; 1 `verify` found at least one invalid checkpoint (like `sha256sum -c`
and `cmp`: "the check ran and failed"; it is not a usage error, so scripts can tell
"corrupt checkpoint" from "wrong path" (2)); 2 bad input (missing/unreadable path, no
checkpoints, symlinked checkpoints dir, manifest of a newer trainsup), nothing deleted;
4 `prune` while a supervisor holds the run dir's job.lock.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import click

from supervisor.cli.common import is_job_file, load_job_file, open_store, resolve_run_dir
from supervisor.errors import LockedError, UserError
from train_core.contract import EXIT_INTERNAL
from train_core.manifest import hash_name
from train_core.retention import Entry, RetentionPolicy, plan_retention
from train_core.runfiles import RunPaths
from train_core.store import DUPLICATE_STEP, Checkpoint, CheckpointStore

EXIT_INVALID = EXIT_INTERNAL  # 1: `verify` found an invalid checkpoint (see the module docstring)


def _now() -> float:
    """Wall clock for ages (tests replace it)."""
    return time.time()


# --------------------------------------------------------------------------- formatting


def fmt_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError  # unreachable


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def fmt_metrics(metrics: dict[str, float | None]) -> str:
    if not metrics:
        return "-"
    return " ".join(f"{k}={'nan' if v is None else format(v, '.4g')}" for k, v in sorted(metrics.items()))


def _age_s(c: Checkpoint, now: float) -> float | None:
    created = c.created_at
    if created is None or created.tzinfo is None:
        return None
    return round(now - created.timestamp(), 1)


def _opt(value: Any) -> str:
    return "-" if value is None else str(value)


def _table(header: Sequence[str], rows: list[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [str(v).rjust(w) if i in right else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def checkpoint_json(c: Checkpoint, now: float) -> dict[str, Any]:
    """One checkpoint in `--json` output (a public schema: keys may grow, never change)."""
    created = c.created_at
    return {
        "step": c.step,
        "name": c.path.name,
        "path": str(c.path),
        "valid": c.valid,
        "problem": c.problem,
        "problem_code": c.code,
        "hashes_checked": c.checked_hashes,
        "epoch": c.epoch,
        "batch_in_epoch": c.batch_in_epoch,
        "reason": c.reason,
        "metrics": c.metrics,
        "size_bytes": c.size_bytes,
        "created_at": created.isoformat() if created else None,
        "age_s": _age_s(c, now),
        "strays": list(c.strays),  # files the manifest does not list and nothing loads
    }


def _report(run_dir: Path, store: CheckpointStore, ckpts: list[Checkpoint], full: bool, as_json: bool,
            any_tmp: bool) -> None:
    now = _now()
    valid = [c for c in ckpts if c.valid]
    newest = valid[-1].step if valid else None
    tmp_names = [p.name for p in store.tmp_dirs()] if any_tmp else []
    quarantined = [q.path.name for q in store.quarantined()]
    if as_json:
        click.echo(json.dumps({
            "run_dir": str(run_dir),
            "checkpoints_dir": str(store.root),
            "full_check": full,
            "count": len(ckpts),
            "valid": len(valid),
            "invalid": len(ckpts) - len(valid),
            "newest_valid_step": newest,
            "uncommitted": tmp_names,
            "quarantined": quarantined,
            "checkpoints": [checkpoint_json(c, now) for c in ckpts],
        }, indent=2, allow_nan=False))
        return
    rows = []
    for c in ckpts:
        if c.valid:
            status = f"ok ({hash_name(c.manifest)})" if c.checked_hashes else "ok"
        else:
            status = f"INVALID: {c.problem}"
        rows.append((str(c.step), _opt(c.epoch), _opt(c.batch_in_epoch), _opt(c.reason), fmt_metrics(c.metrics),
                     fmt_size(c.size_bytes), fmt_age(_age_s(c, now)), status))
    for line in _table(("STEP", "EPOCH", "BATCH", "REASON", "METRICS", "SIZE", "AGE", "STATUS"), rows,
                       right={0, 1, 2, 5, 6}):
        click.echo(line)
    bad = len(ckpts) - len(valid)
    summary = f"{len(ckpts)} checkpoint{'s' if len(ckpts) != 1 else ''}: {len(valid)} valid, {bad} invalid"
    summary += f"; resume from step {newest}" if newest is not None else "; none valid: the run starts from scratch"
    click.echo(summary + ("" if full else " (quick check; `verify` compares every file's hash)"))
    if tmp_names:
        click.echo(f"{len(tmp_names)} uncommitted save(s) ({', '.join(tmp_names)}): in progress, or left by a "
                   "crash and removed on the next start")
    for c in ckpts:
        if c.strays:
            click.echo(f"{c.path.name}: not in its manifest, never loaded: {', '.join(c.strays)}")
    if quarantined:
        click.echo(f"{len(quarantined)} quarantined (failed to load, never resumed from): {', '.join(quarantined)}; "
                   "`trainsup checkpoints prune --invalid` removes them")


# --------------------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def checkpoints() -> None:
    """List, verify and prune the checkpoints of a run.

    Each command takes RUN_DIR (the directory holding checkpoints/) or the JOB.toml
    whose run_dir holds them.

    \b
    Example:
      trainsup checkpoints list runs/gpt-tiny
      trainsup checkpoints verify examples/job.example.toml
      trainsup checkpoints prune runs/gpt-tiny --keep-last 2 --dry-run
    """


@checkpoints.command("list")
@click.argument("target", metavar="RUN_DIR|JOB.toml")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object, schema in the docs) instead of a table.")
def list_cmd(target: str, as_json: bool) -> None:
    """Show every checkpoint: step, epoch, batch, reason, metrics, size, age, valid or why not.

    Validation here is the quick check (manifest parses, every listed file has its
    size); `trainsup checkpoints verify` also compares every file's hash. Uncommitted saves
    (.tmp-*) are never listed as checkpoints.

    \b
    Example:
      $ trainsup checkpoints list runs/gpt-tiny
      STEP  EPOCH  BATCH  REASON    METRICS        SIZE  AGE  STATUS
       200      0    199  interval  val_loss=2.31  48.2 MiB  12m  ok
       300      1     49  preempt   -              48.2 MiB   2m  ok
      2 checkpoints: 2 valid, 0 invalid; resume from step 300 (quick check; ...)
    """
    run_dir = resolve_run_dir(target)
    store, ckpts, any_tmp = open_store(run_dir)
    _report(run_dir, store, ckpts, full=False, as_json=as_json, any_tmp=any_tmp)


@checkpoints.command("verify")
@click.argument("target", metavar="RUN_DIR|JOB.toml")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (same schema as `list --json`).")
@click.pass_context
def verify_cmd(ctx: click.Context, target: str, as_json: bool) -> None:
    """Full check: re-read every file of every checkpoint and compare its hash (the manifest's:
    BLAKE3, or sha256 for checkpoints of format 1).

    Exit code 0 when every checkpoint is valid; 1 when at least one is invalid (the
    check ran and found damage, like `sha256sum -c`); 2 when the path is wrong or
    holds no checkpoints. Nothing is changed on disk.

    \b
    Example:
      $ trainsup checkpoints verify runs/gpt-tiny || echo "damaged checkpoints"
    """
    run_dir = resolve_run_dir(target)
    store, quick, any_tmp = open_store(run_dir)
    full = [c if (not c.valid or c.code == DUPLICATE_STEP) else store.check(c.path, c.step, full=True) for c in quick]
    _report(run_dir, store, full, full=True, as_json=as_json, any_tmp=any_tmp)
    if not all(c.valid for c in full):
        ctx.exit(EXIT_INVALID)


def _policy_from(target: str, overrides: dict[str, Any]) -> RetentionPolicy:
    base = load_job_file(target).retention if is_job_file(target) else RetentionPolicy()
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return dataclasses.replace(base, **given)
    except ValueError as e:  # RetentionError names the [retention] key
        raise UserError(str(e)) from None


def _policy_line(p: RetentionPolicy) -> str:
    best = f"{p.keep_best} by {p.best_metric} ({p.best_mode})" if p.keep_best else "off"
    return (f"keep_last={p.keep_last}, keep_best={best}, keep_every={p.keep_every or 'off'}, "
            f"keep_final={'on' if p.keep_final else 'off'}")


@checkpoints.command("prune")
@click.argument("target", metavar="RUN_DIR|JOB.toml")
@click.option("--keep-last", type=click.IntRange(min=1), help="Keep the newest N valid checkpoints (N >= 1).")
@click.option("--keep-best", type=click.IntRange(min=0), help="Keep the K best by --best-metric (0: off).")
@click.option("--best-metric", help="Metric for --keep-best, as saved in the manifest (e.g. val_loss).")
@click.option("--best-mode", type=click.Choice(["min", "max"]), help="Whether lower (min) or higher (max) is better.")
@click.option("--keep-every", type=click.IntRange(min=0), help="Keep every checkpoint whose step is a multiple of M (0: off).")
@click.option("--keep-final/--no-keep-final", default=None, help="Keep checkpoints saved when training finished.")
@click.option("--invalid", "remove_invalid", is_flag=True, help="Also remove invalid checkpoints (reported otherwise).")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def prune_cmd(target: str, keep_last: int | None, keep_best: int | None, best_metric: str | None,
              best_mode: str | None, keep_every: int | None, keep_final: bool | None, remove_invalid: bool,
              dry_run: bool, as_json: bool) -> None:
    """Delete the checkpoints no retention rule keeps; say why each other one stays.

    The policy is the job file's [retention] when JOB.toml is given (defaults for a
    RUN_DIR: keep_last=3, keep_best=1 by val_loss min, keep_final), with any flag
    overriding its key. Rules combine as a union. Never removed: the newest valid
    checkpoint, anything that is not a committed step-N directory, and invalid
    checkpoints unless --invalid is given. Refuses (exit 4) while a supervisor holds
    the run dir's job.lock: the supervisor prunes after each commit itself.

    \b
    Example:
      trainsup checkpoints prune runs/gpt-tiny --keep-last 2 --keep-best 1 --dry-run
      trainsup checkpoints prune examples/job.example.toml --invalid
    """
    run_dir = resolve_run_dir(target)
    policy = _policy_from(target, dict(keep_last=keep_last, keep_best=keep_best, best_metric=best_metric,
                                       best_mode=best_mode, keep_every=keep_every, keep_final=keep_final))
    store, ckpts, _ = open_store(run_dir, for_writing=not dry_run)
    if dry_run:
        _prune(run_dir, store, ckpts, policy, remove_invalid, dry_run, as_json)
        return
    import filelock  # lazy: only a real prune takes the lock

    # the run dir's lock, and each node's of a run on several machines (RUN_DIR/nodes/node-M)
    paths = [*sorted(run_dir.glob("nodes/node-*/job.lock")), RunPaths(run_dir).lock]
    held = []
    try:
        for path in paths:
            lock = filelock.FileLock(str(path), timeout=0)
            try:
                lock.acquire()
            except filelock.Timeout:
                raise LockedError(f"{run_dir} is in use by a running supervisor ({path.relative_to(run_dir)} is "
                                  "held); it prunes after each commit itself: stop it first, or look with "
                                  "--dry-run") from None
            except PermissionError:
                raise UserError(f"{path}: permission denied; run as the run dir's owner; nothing was deleted") from None
            held.append(lock)
        ckpts = store.scan()  # again, under the locks: what a supervisor may have changed meanwhile
        _prune(run_dir, store, ckpts, policy, remove_invalid, dry_run, as_json)
    finally:
        for lock in held:
            lock.release()


def _prune(run_dir: Path, store: CheckpointStore, ckpts: list[Checkpoint], policy: RetentionPolicy,
           remove_invalid: bool, dry_run: bool, as_json: bool) -> None:
    doomed, kept = _prune_plan(store, ckpts, policy, remove_invalid)
    sizes = {c.path: c.size_bytes for c in doomed}  # before they are gone
    if not dry_run:
        _remove_all(store, doomed)
    freed = sum(sizes.values())
    if as_json:
        click.echo(json.dumps({
            "run_dir": str(run_dir),
            "dry_run": dry_run,
            "policy": dataclasses.asdict(policy),
            "remove_invalid": remove_invalid,
            "removed": [{"step": c.step, "name": c.path.name, "valid": c.valid, "why": _why_removed(c),
                         "size_bytes": sizes[c.path]} for c in doomed],
            "kept": [{"step": c.step, "name": c.path.name, "valid": c.valid, "why": why} for c, why in kept],
            "removed_bytes": freed,
        }, indent=2, allow_nan=False))
        return
    click.echo(f"Policy: {_policy_line(policy)}")
    verb = "would remove" if dry_run else "removed"
    rows = [(verb, c.path.name, _why_removed(c)) for c in doomed]
    rows += [("kept", c.path.name, ", ".join(why)) for c, why in kept]
    rows.sort(key=lambda r: r[1])
    for line in _table(("ACTION", "CHECKPOINT", "WHY"), rows, right=set()):
        click.echo(line)
    n = len(doomed)
    noun = f"{n} checkpoint{'s' if n != 1 else ''} ({fmt_size(freed)})"
    if dry_run:
        click.echo(f"Dry run: would remove {noun}, keep {len(kept)}; nothing was deleted.")
    else:
        click.echo(f"Removed {noun}; kept {len(kept)}.")


def _prune_plan(store: CheckpointStore, ckpts: list[Checkpoint], policy: RetentionPolicy,
                remove_invalid: bool) -> tuple[list[Checkpoint], list[tuple[Checkpoint, list[str]]]]:
    """(checkpoints to remove, [(checkpoint kept, why)])."""
    plan = plan_retention(policy, [Entry(c.step, c.valid, c.metrics, c.reason or "") for c in ckpts],
                          remove_invalid=remove_invalid)
    doomed_steps = set(plan.delete)
    doomed: list[Checkpoint] = []
    kept: list[tuple[Checkpoint, list[str]]] = []
    for q in store.quarantined():  # moved aside after failing to load: invalid by definition
        if remove_invalid:
            doomed.append(q)
        else:
            kept.append((q, [f"{q.problem}: pass --invalid to remove it"]))
    for c in ckpts:
        if c.valid:
            if c.step in doomed_steps and c.step not in plan.keep:
                doomed.append(c)
            else:
                kept.append((c, list(plan.keep.get(c.step, ()))))
        elif remove_invalid and (c.step not in plan.keep or c.code == DUPLICATE_STEP):
            doomed.append(c)  # a duplicate of a kept step is not the one that is kept
        else:
            kept.append((c, [f"invalid ({c.problem}): pass --invalid to remove it"]))
    return doomed, kept


def _why_removed(c: Checkpoint) -> str:
    return "not kept by any rule" if c.valid else f"invalid ({c.problem}), --invalid given"


def _remove_all(store: CheckpointStore, doomed: list[Checkpoint]) -> None:
    removed: list[Checkpoint] = []
    for c in doomed:
        try:
            store.remove(c)
        except OSError as e:
            done = ", ".join(str(r.step) for r in removed) or "none"
            raise UserError(f"{c.path}: cannot remove: {e.strerror or e}; fix its permissions and run prune "
                            f"again (already removed: {done})") from None
        removed.append(c)
