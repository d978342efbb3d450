"""`trainsup run`, `trainsup validate`, `trainsup status`."""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import click

from supervisor.config import JobConfig, load_job
from supervisor.cli.common import resolve_run_dir
from supervisor.errors import UserError
from train_core.contract import outlast_stop_s, pid_alive

SET_HELP = "Override a job.toml value, e.g. --set restart.max_restarts=5 (repeatable; the value is TOML)."


# --------------------------------------------------------------------------- console


class LineFormatter(logging.Formatter):
    """`[trainsup] message`, with `warning: `/`error: ` after the tag for WARNING and up."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno >= logging.WARNING:
            msg = msg.replace("[trainsup] ", f"[trainsup] {record.levelname.lower()}: ", 1)
        return msg


# Writing to a closed pipe (`| head`), to a terminal that hung up, or to a closed stdout: the
# terminal is gone, the run is not.
_GONE_ERRNOS = frozenset({errno.EPIPE, errno.EIO, errno.EBADF})


def _output_gone(e: BaseException, stream: Any) -> bool:
    if isinstance(e, OSError) and not isinstance(e, io.UnsupportedOperation):
        return e.errno in _GONE_ERRNOS
    return isinstance(e, ValueError) and bool(getattr(stream, "closed", False))


def _silence(stream: Any) -> None:
    """Point the broken stream's fd, and stdout/stderr where they are the same file (a terminal
    that hung up is both), at /dev/null: a later write (Python's final flush of what is still
    buffered, a traceback, click's messages) then neither fails nor turns the exit code into 120."""
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return
    fds = {stream.fileno(), 1, 2}
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for fd in sorted(fds):
            try:
                other = os.fstat(fd)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class Console(logging.Handler):
    """Everything `trainsup run` prints: log lines, child output, and the progress line.

    On a terminal the progress line is redrawn in place under the scrolling output; when
    stdout is not a terminal (journald, a file) there is no redrawing: plain lines only,
    with a progress line every `plain_every_s`.

    When the stream goes away (a closed pipe, a terminal that hung up, a closed file) the
    console says so once, as a warning of the `supervisor.console` logger (it reaches
    logs/supervisor.log, not this console), and writes nothing more: the run goes on.
    """

    def __init__(self, stream: TextIO | None, *, tty: bool | None = None, plain_every_s: float = 30.0) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self.gone: str | None = None if stream is not None else "no stdout"
        if tty is None:
            try:
                tty = stream is not None and stream.isatty()
            except (OSError, ValueError):
                tty = False
        self.tty = tty
        self.plain_every_s = plain_every_s
        self._progress = ""
        self._last_plain: float | None = None  # the first running snapshot prints at once
        self._last_draw = 0.0
        self.setFormatter(LineFormatter("[trainsup] %(message)s"))

    def _out(self, text: str) -> None:
        if self.gone is not None:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception as e:
            if not _output_gone(e, self.stream):
                raise
            self._lost(e)

    def _lost(self, e: BaseException) -> None:
        self.gone = f"{type(e).__name__}: {e}"
        _silence(self.stream)
        logging.getLogger("supervisor.console").warning(
            "the terminal is gone (%s): nothing more is printed; the run goes on, its lines "
            "go on in logs/supervisor.log and the ranks' output in logs/attempt-N.log", self.gone)

    def _write_line(self, line: str) -> None:
        if self.tty and self._progress:
            self._out("\r\x1b[K" + line + "\n" + self._progress)
        else:
            self._out(line + "\n")

    def emit(self, record: logging.LogRecord) -> None:
        if self.gone is not None:
            return
        try:
            self._write_line(self.format(record))
        except Exception:  # noqa: BLE001
            self.handleError(record)

    def child_output(self, line: str) -> None:
        self._write_line(line)

    def progress(self, snap: dict[str, Any]) -> None:
        if self.gone is not None:
            return
        now = time.monotonic()
        text = progress_text(snap)
        if self.tty:
            if text != self._progress and now - self._last_draw >= 0.5:
                self._last_draw = now
                self._progress = text
                self._out("\r\x1b[K" + text)
        elif (self._last_plain is None or now - self._last_plain >= self.plain_every_s) and snap.get("state") == "running":
            self._last_plain = now
            self._write_line("[trainsup] " + text)

    def close_line(self) -> None:
        if self.tty and self._progress:
            self._out("\r\x1b[K")
            self._progress = ""


class SupervisorLog(logging.StreamHandler):
    """RUN_DIR/logs/supervisor.log: every line of the `supervisor` logger, with a timestamp,
    appended; the file is created 0600 and never opened through a symlink."""

    NAME = "supervisor.log"

    def __init__(self, logs_dir: Path) -> None:
        path = logs_dir / self.NAME
        try:
            if not logs_dir.is_dir():
                logs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f"{path} is a symlink; trainsup never follows symlinks in a run dir: "
                                "remove it (or use another --run-dir)") from None
            raise UserError(f"{path}: cannot open the supervisor log: {e.strerror or e}; fix its permissions "
                            "or use another --run-dir") from None
        super().__init__(os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace"))
        self.path = path
        self.setLevel(logging.INFO)
        self.setFormatter(LineFormatter("%(asctime)s [trainsup] %(message)s"))

    def close(self) -> None:
        try:
            self.acquire()
            try:
                if not self.stream.closed:
                    self.stream.close()
            finally:
                self.release()
        finally:
            super().close()


def _fmt_num(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def progress_text(s: dict[str, Any]) -> str:
    step = s.get("step")
    max_steps = s.get("max_steps")
    step_txt = "-" if step is None else (f"{step}/{max_steps}" if max_steps else str(step))
    ck = s.get("last_checkpoint") or {}
    parts = [
        f"{s.get('state')} attempt {s.get('attempt')}",
        f"step {step_txt}",
        f"loss {_fmt_num(s.get('loss'), '.4f')}",
        f"tok/s {_fmt_num(s.get('tokens_per_s'), ',.0f')}",
        f"ckpt {ck.get('step', '-')}",
        f"restarts {s.get('restarts', 0)}",
    ]
    return " | ".join(parts)


# --------------------------------------------------------------------------- run


@click.command("run")
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (checkpoints, logs, status); overrides run_dir in the job file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
def run_cmd(job_file: Path, run_dir: Path | None, overrides: tuple[str, ...]) -> None:
    """Run a training job and keep it alive until it finishes.

    Starts `accelerate launch` for the job's script, restarts it from the newest valid
    checkpoint after a crash, hang or OOM (with backoff), and turns SIGTERM, SIGINT,
    SIGHUP and SIGUSR1 into a save at the next step boundary. Ctrl-C twice stops at once
    without saving; any other signal while the save is under way is ignored (a terminal
    that hangs up after a Ctrl-C still gets its save).

    Output trouble never stops the run: when stdout goes away (`| head`, a closed
    terminal) training goes on. The supervisor's lines are also in
    RUN_DIR/logs/supervisor.log, each attempt's output in RUN_DIR/logs/attempt-N.log.

    Exit codes: 0 finished, 2 bad job file, 3 gave up, 4 run dir locked, 75 stopped
    with a checkpoint saved, 128+N stopped by signal N before a checkpoint was saved.

    \b
    Example:
      trainsup run job.toml --set stop.grace_s=120
    """
    from supervisor.runner import procs
    from supervisor.rundir import secure_run_dir
    from supervisor.runner import Runner
    from supervisor.runner.watchers import build_watchers
    from supervisor.systemd.sdnotify import SD_ENV_VARS, SdNotifier, SdNotifyReporter

    from train_core.runfiles import RunPaths

    job = load_job(job_file, overrides, run_dir=run_dir)
    # Before anything is written into it: private, or refused (exit 2) when others could write it.
    notes = secure_run_dir(job.run_dir, group_shared=job.group_shared)
    # The supervisor's lines also go to RUN_DIR/logs/supervisor.log: losing the terminal loses nothing.
    supervisor_log = SupervisorLog(RunPaths(job.run_dir).logs)
    console = Console(sys.stdout)
    root = logging.getLogger("supervisor")
    root.setLevel(logging.INFO)
    root.addHandler(console)
    root.addHandler(supervisor_log)
    root.propagate = False
    for note in notes:
        root.info("%s", note)
    try:
        # Under systemd (Type=notify): READY/STATUS/WATCHDOG/STOPPING from the loop; the ranks
        # must not inherit the socket, so the variables leave this process's environment.
        notifier = SdNotifier()
        for name in SD_ENV_VARS:
            os.environ.pop(name, None)
        reporter = SdNotifyReporter(console, notifier,
                                    stop_timeout_s=outlast_stop_s(job.stop.grace_s, job.stop.kill_after_s))
        watchers = build_watchers(job)
        subreaper = procs.set_child_subreaper()
        runner = Runner(job, watchers=watchers, reporter=reporter, subreaper=subreaper)
        reporter.stop_requested = lambda: runner.user_stop is not None
        code = runner.run()
        reporter.finished(code, runner.exit_reason)
    finally:
        console.close_line()
        root.removeHandler(console)
        root.removeHandler(supervisor_log)
        supervisor_log.close()
    sys.exit(code)


# --------------------------------------------------------------------------- validate


@click.command("validate")
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
def validate_cmd(job_file: Path, overrides: tuple[str, ...]) -> None:
    """Check a job file without running it: every problem names its key (exit 2).

    \b
    Example:
      trainsup validate job.toml
    """
    job = load_job(job_file, overrides)
    click.echo(f"{job_file}: OK")
    click.echo(describe_job(job))


def describe_job(job: JobConfig) -> str:
    lc = job.launch
    n = lc.num_processes if lc.num_processes is not None else ("from config_file" if lc.config_file else 1)
    where = "cpu" if lc.cpu else "accelerator"
    r, st, w = job.restart, job.stop, job.watch
    lines = [
        f"  script:     {job.train.script} {' '.join(job.train.args)}".rstrip(),
        f"  launch:     {lc.launcher}, {n} process(es) on {where}, mixed precision {lc.mixed_precision or 'no'}",
        f"  run dir:    {job.run_dir}",
        f"  restart:    up to {r.max_restarts}, backoff {r.backoff_initial_s:g}-{r.backoff_max_s:g} s, "
        f"give up after {r.no_progress_limit or 'unlimited'} attempt(s) without progress",
        f"  stop:       grace {st.grace_s:g} s, then SIGTERM, SIGKILL after {st.kill_after_s:g} s",
        f"  hang:       no heartbeat for {w.hang_timeout_s:g} s (first heartbeat within {w.startup_timeout_s:g} s)",
        f"  retention:  keep_last={job.retention.keep_last} keep_best={job.retention.keep_best} "
        f"({job.retention.best_mode} {job.retention.best_metric}) keep_every={job.retention.keep_every}",
    ]
    for name, cfg in job.sections.items():
        values = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())
        if name == "gpu" and lc.cpu and not cfg.fake_script:
            values = "not watched: a CPU job"
        lines.append(f"  {name + ':':<11} {values}")
    return "\n".join(lines)


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
