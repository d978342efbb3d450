"""`trainsup status`: a run dir (or job file) as a person wants to see it: the supervisor,
the step, the checkpoints, the watchers."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import click

from supervisor.cli.common import resolve_run_dir
from supervisor.cli.console import _fmt_num
from train_core import costs as costing
from train_core.contract import pid_alive

# --------------------------------------------------------------------------- status


def collect_status(run_dir: Path) -> dict[str, Any]:
    from supervisor.events import read_events
    from train_core.runfiles import RunPaths, read_json
    from train_core.store import CheckpointStore

    paths = RunPaths(run_dir)
    sup = read_json(paths.supervisor) or {}
    hb = read_json(paths.status) or {}
    running = sup.get("state") not in (None, "exited", "fatal") and pid_alive(sup.get("pid"))
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
    }


@click.command("status")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status_cmd(target: Path, as_json: bool) -> None:
    """Show a run: state, attempt, step, loss, tokens/s, last checkpoint, restarts, last event.

    \b
    Example:
      trainsup status runs/gpt-tiny
      trainsup status job.toml --json
    """
    st = collect_status(resolve_run_dir(str(target), not_yet_run_ok=True))
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
        when = dt.datetime.fromtimestamp(ev.get("ts", 0)).strftime("%Y-%m-%d %H:%M:%S")
        rest = {k: v for k, v in ev.items() if k not in ("ts", "time", "event", "argv")}
        detail = " ".join(f"{k}={v}" for k, v in rest.items())
        lines.append(f"last event:      {when} {ev.get('event')} {detail}".rstrip())
    else:
        lines.append("last event:      none")
    for name, ws in (st.get("watchers") or {}).items():
        if name == "gpu" and isinstance(ws, dict):
            lines += format_gpu_status(ws)
        else:
            lines.append(f"{name + ':':<16} {watcher_summary(ws)}")
    return "\n".join(lines)


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
