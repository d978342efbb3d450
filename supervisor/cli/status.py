"""`trainsup status`: a run dir (or job file) as a person wants to see it: the supervisor,
the step, the checkpoints, the watchers, where the time went (supervisor/accounting.py); with
--watch, a live view refreshed about once a second."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

from supervisor.cli.common import resolve_run_dir
from supervisor.cli.console import _fmt_num
from train_core import costs as costing
from train_core.contract import pid_alive
from train_core.metricslog import parse_line
from train_core.runfiles import is_number

# --------------------------------------------------------------------------- status


def supervisor_running(sup: dict[str, Any]) -> bool:
    """supervisor.json says a supervisor runs, and its pid is alive."""
    return sup.get("state") not in (None, "exited", "fatal") and pid_alive(sup.get("pid"))


def collect_status(run_dir: Path) -> dict[str, Any]:
    from supervisor.events import read_events
    from train_core.runfiles import paths_here, read_json
    from train_core.store import CheckpointStore

    paths = paths_here(run_dir)
    sup = read_json(paths.supervisor) or {}
    hb = read_json(paths.status) or {}
    running = supervisor_running(sup)
    latest = CheckpointStore(paths.checkpoints).latest_valid()
    events = read_events(paths.events, last=1)
    now = time.time()
    return {
        "run_dir": str(run_dir),
        "supervisor_running": running,
        "supervisor_pid": sup.get("pid"),
        "state": sup.get("state") if running or sup.get("state") in ("exited", "fatal") else
        (f"not running (last: {sup.get('state')})" if sup else "never run"),
        "attempt": sup.get("attempt"),
        "restarts": sup.get("restarts"),
        "exit_code": sup.get("exit_code"),
        "exit_reason": sup.get("exit_reason"),
        "step": hb.get("step"),
        "max_steps": hb.get("max_steps"),
        "loss": hb.get("loss"),
        "tokens_per_s": hb.get("tokens_per_s"),
        "rank_state": hb.get("state"),
        "heartbeat_age_s": round(now - hb["updated_at"], 1) if isinstance(hb.get("updated_at"), (int, float)) else None,
        "last_checkpoint": {"step": latest.step, "path": str(latest.path), "reason": latest.reason,
                            "created_at": latest.manifest.get("created_at")} if latest else None,
        "last_event": events[-1] if events else None,
        "watchers": sup.get("watchers") or {},
        "batch": {k: hb.get(k) for k in ("micro_batch", "grad_accum", "world_size")} if hb.get("micro_batch") else None,
        "launch_env": sup.get("launch_env"),
        "costs": costing.as_dict(costing.load(paths.costs)),
        "stop_budget": sup.get("stop_budget"),
        "accounting": accounting_summary(run_dir, running),
    }


def accounting_summary(run_dir: Path, live: bool) -> dict[str, Any]:
    """supervisor/accounting.py's numbers; a run dir it cannot make sense of gets the reason."""
    from supervisor.accounting import account

    try:
        return account(run_dir, live=live).summary()
    except Exception as e:  # noqa: BLE001 - untrusted files must never take `status` down
        return {"error": f"{type(e).__name__}: {e}"}


@click.command("status")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--watch", is_flag=True, help="Refresh about once a second until Ctrl-C (one line per change when "
              "stdout is not a terminal).")
@click.option("--count", type=click.IntRange(min=1), default=None, hidden=True)  # --watch: stop after N refreshes
@click.option("--interval", type=click.FloatRange(min=0.0), default=1.0, hidden=True)  # --watch: seconds between
def status_cmd(target: Path, as_json: bool, watch: bool, count: int | None, interval: float) -> None:
    """Show a run: state, attempt, step, loss, tokens/s, last checkpoint, restarts, last event,
    goodput and the time lost by cause.

    \b
    Example:
      trainsup status runs/gpt-tiny
      trainsup status job.toml --json
      trainsup status runs/gpt-tiny --watch
    """
    if watch and as_json:
        raise click.UsageError("--watch and --json do not go together: use one of them")
    run_dir = resolve_run_dir(str(target), not_yet_run_ok=True)
    if watch:
        watch_status(run_dir, count=count, interval=interval)
        return
    st = collect_status(run_dir)
    if as_json:
        click.echo(json.dumps(st, indent=1, sort_keys=True))
        return
    click.echo(format_status(st))


def format_status(st: dict[str, Any]) -> str:
    sup = (f"running (pid {st['supervisor_pid']})" if st["supervisor_running"] else "not running")
    state = st["state"]
    if st.get("exit_code") is not None and not st["supervisor_running"]:
        state = f"{state} (exit {st['exit_code']}: {st.get('exit_reason')})"
    step = st.get("step")
    step_txt = "-" if step is None else (f"{step}/{st['max_steps']}" if st.get("max_steps") else str(step))
    ck = st.get("last_checkpoint")
    ev = st.get("last_event")
    lines = [
        f"run dir:         {st['run_dir']}",
        f"supervisor:      {sup}",
        f"state:           {state}",
        f"attempt:         {st.get('attempt') or '-'} (restarts: {st.get('restarts') or 0})",
        f"step:            {step_txt}  loss {_fmt_num(st.get('loss'), '.4f')}  "
        f"tokens/s {_fmt_num(st.get('tokens_per_s'), ',.0f')}"
        + (f"  (heartbeat {st['heartbeat_age_s']:g} s ago)" if st.get("heartbeat_age_s") is not None else ""),
        "last checkpoint: " + (f"step {ck['step']} ({ck['reason']}) {ck['path']}" if ck else "none"),
    ]
    if st.get("batch"):
        lines.insert(-1, format_batch(st["batch"], st.get("launch_env") or {}))
    saving = format_saving(st.get("costs") or {}, st.get("stop_budget") or {})
    if saving:
        lines.append(saving)
    if ev:
        try:  # events.jsonl is untrusted: a ts of any size or type
            when = dt.datetime.fromtimestamp(ev["ts"]).strftime("%Y-%m-%d %H:%M:%S") if is_number(ev.get("ts")) else "?"
        except (OverflowError, OSError, ValueError):
            when = "?"
        rest = {k: v for k, v in ev.items() if k not in ("ts", "time", "event", "argv")}
        detail = " ".join(f"{k}={v}" for k, v in rest.items())
        lines.append(f"last event:      {when} {ev.get('event')} {detail}".rstrip())
    else:
        lines.append("last event:      none")
    lines += format_accounting(st.get("accounting") or {})
    for name, ws in (st.get("watchers") or {}).items():
        if name == "gpu" and isinstance(ws, dict):
            lines += format_gpu_status(ws)
        else:
            lines.append(f"{name + ':':<16} {watcher_summary(ws)}")
    return "\n".join(lines)


def fmt_duration(s: Any) -> str:
    """12.3 s, 4m05s, 2h07m."""
    if not is_number(s):
        return "-"
    if s < 59.95:
        return f"{s:.1f} s"
    s = int(round(s))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_accounting(acc: dict[str, Any]) -> list[str]:
    """`goodput:` and `lost:` lines: productive against wall time, the time lost by cause,
    asleep apart."""
    if acc.get("error"):
        return [f"{'goodput:':<16} unknown: {acc['error']}"]
    if not acc.get("wall_s"):
        return []
    g = acc.get("goodput")
    asleep = acc.get("asleep_s") if is_number(acc.get("asleep_s")) else 0.0
    awake = acc["wall_s"] - asleep if is_number(acc.get("wall_s")) else None  # the goodput's denominator
    head = (f"{'goodput:':<16} {'-' if g is None else format(g, '.3f')} = {fmt_duration(acc.get('productive_s'))} "
            f"productive of {fmt_duration(awake)} wall" + (f" awake; asleep {fmt_duration(asleep)} apart" if asleep
                                                          else ""))
    if acc.get("steps_recomputed"):
        head += f" ({acc['steps_recomputed']} step(s) run again)"
    if acc.get("estimated"):
        head += " (estimated from checkpoints: no metrics.jsonl)"
    lost = sorted(((v, k) for k, v in (acc.get("lost_s") or {}).items() if isinstance(v, (int, float)) and v >= 0.05),
                  reverse=True)
    tail = ", ".join(f"{k} {fmt_duration(v)}" for v, k in lost) or "none"
    return [head, f"{'lost:':<16} {tail}"]


def format_saving(costs: dict[str, Any], budget: dict[str, Any]) -> str:
    """What a save costs (RUN_DIR/costs.json) and whether a stop's budget holds one."""
    parts = []
    if costs.get("save_s") is not None:
        parts.append(f"a save {costs['save_s']:.2f} s ({costs.get('save_measured') or '?'})")
    if costs.get("stall_s") is not None:
        parts.append(f"stalls training {costs['stall_s'] * 1e3:.0f} ms")
    if costs.get("step_s") is not None:
        parts.append(f"a step {costs['step_s']:.2f} s")
    if costs.get("interval_steps"):
        m = f", M {costs['mtbf_s']:.0f} s" if costs.get("mtbf_s") is not None else ""
        c = f"C {costs['cost_s'] * 1e3:.0f} ms" if costs.get("cost_s") is not None else "C not measured yet"
        parts.append(f"interval {costs['interval_steps']} step(s) (auto: {c}{m})")
    if budget.get("budget_s"):
        parts.append(f"stop budget {budget['budget_s']:g} s" + (f": TOO SHORT, {budget['problem']}"
                                                                  if budget.get("problem") else ""))
    return f"{'saving:':<16} " + ", ".join(parts) if parts else ""


def watcher_summary(ws: Any) -> str:
    """One line for a watcher's status: its own summary, why it is unavailable, or its fields."""
    if not isinstance(ws, dict):
        return json.dumps(ws)
    if ws.get("available") is False:
        return f"unavailable: {ws.get('reason') or 'unknown reason'}"
    if ws.get("summary"):
        blocking = f" (waiting: {ws['blocking']})" if ws.get("blocking") else ""
        return f"{ws['summary']}{blocking}"
    if "lock_held" in ws:  # logind
        held = "inhibitor held" if ws["lock_held"] else f"inhibitor not held ({ws.get('lock_error') or 'released'})"
        pending = f", waiting for a checkpoint before {ws['pending']}" if ws.get("pending") else ""
        return f"{held}, delay budget {ws.get('budget_s')} s{pending}"
    return json.dumps(ws, sort_keys=True)


def format_batch(batch: dict[str, Any], launch_env: dict[str, Any]) -> str:
    """`batch: micro-batch 2 x 4 accumulation x 1 rank(s) = 8 samples/step (OOM back-off)`."""
    micro, accum, world = batch.get("micro_batch"), batch.get("grad_accum") or 1, batch.get("world_size") or 1
    text = f"batch:           micro-batch {micro} x {accum} accumulation x {world} rank(s)"
    if all(isinstance(v, int) for v in (micro, accum, world)):
        text += f" = {micro * accum * world} samples/step"
    if "TRAINSUP_MICRO_BATCH" in launch_env:
        text += " (OOM back-off)"
    return text


def _gib(n: Any) -> str:
    return f"{n / 2**30:.2f}" if isinstance(n, (int, float)) else "?"


def format_gpu_status(ws: dict[str, Any]) -> list[str]:
    """The [gpu] watcher's part of supervisor.json, one line per GPU."""
    if "error" in ws:
        return [f"gpu:             status failed: {ws['error']}"]
    if not ws.get("available"):
        return [f"gpu:             GPU unmonitored: {ws.get('reason') or 'unknown reason'}"]
    gpus = ws.get("gpus") or []
    head = (f"gpu:             {len(gpus)} GPU(s) via {ws.get('backend')}, every {_fmt_num(ws.get('poll_interval_s'), 'g')} s, "
            f"thermal {ws.get('thermal')}")
    age = ws.get("reading_age_s")
    if isinstance(age, (int, float)) and age > 2 * (ws.get("poll_interval_s") or 0) + 1:
        head += f" (reading {age:.0f} s old)"
    lines = [head]
    if ws.get("blocking"):
        lines.append(f"  waiting: {ws['blocking']}")
    for g in gpus:
        frac = g.get("vram_fraction")
        vram = (f"VRAM {_gib(g.get('vram_used_bytes'))}/{_gib(g.get('vram_total_bytes'))} GiB"
                + (f" ({frac:.0%})" if isinstance(frac, (int, float)) else ""))
        temp = f"{_fmt_num(g.get('temp_c'), 'g')} C"
        power = f"{_fmt_num(g.get('power_w'), '.0f')}/{_fmt_num(g.get('power_limit_w'), '.0f')} W"
        throttle = ", ".join(g.get("throttle") or []) or "none"
        name = f" {g['name']}" if g.get("name") else ""
        lines.append(f"  GPU {g.get('index')}{name}: {vram}  {temp}  {power}  throttle: {throttle}")
    return lines


# --------------------------------------------------------------------------- --watch


def watch_snapshot(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    """What --watch shows, from the small files only (supervisor.json, status.json, one
    manifest and the tail of metrics.jsonl): cheap enough for every second."""
    from train_core.runfiles import paths_here, read_json

    paths = paths_here(run_dir)
    now = time.time() if now is None else now
    sup = read_json(paths.supervisor) or {}
    hb = read_json(paths.status) or {}
    running = supervisor_running(sup)
    state = sup.get("state") if running or sup.get("state") in ("exited", "fatal") else (
        "not running" if sup else "never run")
    ck = hb.get("last_checkpoint") if isinstance(hb.get("last_checkpoint"), dict) else sup.get("last_checkpoint")
    ck = ck if isinstance(ck, dict) else None
    ck_age = None
    if ck and isinstance(ck.get("path"), str) and re.fullmatch(r"step-\d+", Path(ck["path"]).name):
        from supervisor.accounting import iso_ts

        made = iso_ts((read_json(paths.checkpoints / Path(ck["path"]).name / "manifest.json") or {}).get("created_at"))
        ck_age = max(0.0, now - made) if made is not None else None
    step = hb.get("step") if isinstance(hb.get("step"), int) else sup.get("step")
    return {
        "state": state, "rank_state": hb.get("state") if running else None,
        "attempt": sup.get("attempt"), "restarts": sup.get("restarts"),
        "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
        "max_steps": hb.get("max_steps") if isinstance(hb.get("max_steps"), int) else sup.get("max_steps"),
        "loss": hb.get("loss"), "tokens_per_s": hb.get("tokens_per_s"),
        "last_checkpoint": ck, "checkpoint_age_s": ck_age,
        "steps_per_s": recent_step_rate(paths.run_dir / "metrics.jsonl") if running else None,
        "exit_code": sup.get("exit_code"),
    }


def recent_step_rate(path: Path, tail_bytes: int = 32768) -> float | None:
    """Optimizer steps per second over the last step records of metrics.jsonl (its tail only)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            data = f.read(tail_bytes)
    except OSError:
        return None
    recs = []
    for raw in data.splitlines()[1:] if size > tail_bytes else data.splitlines():
        r = parse_line(raw)
        if r is not None and r["kind"] == "step":
            if recs and (r["step"] <= recs[-1]["step"] or r.get("attempt") != recs[-1].get("attempt")):
                recs = []  # a new attempt: its own rate
            recs.append(r)
    if len(recs) < 2 or recs[-1]["ts"] <= recs[0]["ts"]:
        return None
    return (recs[-1]["step"] - recs[0]["step"]) / (recs[-1]["ts"] - recs[0]["ts"])


def _eta(snap: dict[str, Any]) -> str:
    step, total, rate = snap.get("step"), snap.get("max_steps"), snap.get("steps_per_s")
    if not (isinstance(step, int) and isinstance(total, int) and total > 0):
        return "-"
    if step >= total:
        return "done"
    if not rate or rate <= 0:
        return "-"
    return fmt_duration((total - step) / rate)


def _state_text(snap: dict[str, Any]) -> str:
    state = str(snap.get("state"))
    if snap.get("rank_state") and snap.get("state") == "running":
        state += f"/{snap['rank_state']}"
    if snap.get("exit_code") is not None and snap.get("state") in ("exited", "fatal"):
        state += f" (exit {snap['exit_code']})"
    return state


def _ckpt_text(snap: dict[str, Any]) -> str:
    ck = snap.get("last_checkpoint")
    if not ck:
        return "none"
    age = f", {fmt_duration(snap['checkpoint_age_s'])} ago" if snap.get("checkpoint_age_s") is not None else ""
    return f"step {ck.get('step', '?')} ({ck.get('reason') or '?'}{age})"


def watch_line(snap: dict[str, Any]) -> str:
    """One plain line (stdout not a terminal)."""
    step, total = snap.get("step"), snap.get("max_steps")
    step_txt = "-" if step is None else (f"{step}/{total}" if total else str(step))
    return " | ".join([
        f"{_state_text(snap)} attempt {snap.get('attempt') or '-'}",
        f"step {step_txt}",
        f"loss {_fmt_num(snap.get('loss'), '.4f')}",
        f"tok/s {_fmt_num(snap.get('tokens_per_s'), ',.0f')}",
        f"ETA {_eta(snap)}",
        f"ckpt {(snap.get('last_checkpoint') or {}).get('step', '-')}",
    ])


def watch_frame(run_dir: Path, snap: dict[str, Any], width: int) -> list[str]:
    """The lines redrawn in place on a terminal."""
    step, total = snap.get("step"), snap.get("max_steps")
    bar_w = max(10, min(40, width - 60))
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        frac = min(1.0, max(0.0, step / total))
        done = int(frac * bar_w)
        bar = "[" + "=" * done + (">" if done < bar_w else "") + " " * (bar_w - done - 1) + "]"
        progress = f"{bar} {step}/{total} {frac:4.0%}"
    else:
        progress = f"step {'-' if step is None else step}"
    restarts = snap.get("restarts") or 0
    lines = [
        f"{run_dir}: {_state_text(snap)}, attempt {snap.get('attempt') or '-'} ({restarts} restart(s))",
        f"{progress}  loss {_fmt_num(snap.get('loss'), '.4f')}  tok/s {_fmt_num(snap.get('tokens_per_s'), ',.0f')}"
        f"  ETA {_eta(snap)}",
        f"last checkpoint: {_ckpt_text(snap)}   (Ctrl-C: stop watching; the run goes on)",
    ]
    return [line[: max(1, width - 1)] for line in lines]


def watch_status(run_dir: Path, *, count: int | None = None, interval: float = 1.0) -> None:
    """`status --watch`: until Ctrl-C (or `count` refreshes). On a terminal the frame is redrawn
    in place; otherwise a plain line is printed whenever it differs from the one before."""
    out = sys.stdout
    try:
        tty = out.isatty()
    except (OSError, ValueError):
        tty = False
    drawn, last, n = 0, None, 0
    try:
        while True:
            snap = watch_snapshot(run_dir)
            if tty:
                width = shutil.get_terminal_size((100, 24)).columns
                lines = watch_frame(run_dir, snap, width)
                up = f"\x1b[{drawn}F" if drawn else ""
                out.write(up + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J")
                out.flush()
                drawn = len(lines)
            else:
                line = watch_line(snap)
                if line != last:
                    out.write(f"{time.strftime('%H:%M:%S')} {line}\n")
                    out.flush()
                    last = line
            n += 1
            if count is not None and n >= count:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return  # Ctrl-C: the way out, exit 0
    except BrokenPipeError:  # `| head`: the reader is gone
        from supervisor.cli.console import _silence

        _silence(out)
