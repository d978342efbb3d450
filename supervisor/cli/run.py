"""`trainsup run` and `trainsup validate`."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click

from supervisor.cli.console import supervisor_output
from supervisor.config import JobConfig, load_job
from train_core.contract import outlast_stop_s

SET_HELP = "Override a job.toml value, e.g. --set restart.max_restarts=5 (repeatable; the value is TOML)."


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

    from supervisor import slurm

    job = slurm.apply(load_job(job_file, overrides, run_dir=run_dir), os.environ)  # inside an allocation
    # Before anything is written into it: private, or refused (exit 2) when others could write it.
    notes = secure_run_dir(job.run_dir, group_shared=job.group_shared)
    with supervisor_output(job.paths.logs, notes) as console:
        # Under systemd (Type=notify): READY/STATUS/WATCHDOG/STOPPING from the loop; the ranks
        # must not inherit the socket, so the variables leave this process's environment.
        notifier = SdNotifier()
        for name in SD_ENV_VARS:
            os.environ.pop(name, None)
        reporter = SdNotifyReporter(console, notifier,
                                    stop_timeout_s=outlast_stop_s(job.stop.grace_s, job.stop.kill_after_s))
        runner = Runner(job, watchers=build_watchers(job), reporter=reporter, subreaper=procs.set_child_subreaper())
        reporter.stop_requested = lambda: runner.user_stop is not None
        # inside an allocation: the warning, sent to itself, should Slurm's not come
        time_limit = slurm.time_limit_watch(job, os.environ, stopping=reporter.stop_requested)
        try:
            code = runner.run()
        finally:
            if time_limit is not None:
                time_limit.cancel()
        reporter.finished(code, runner.exit_reason)
        if slurm.should_requeue(job, os.environ, exit_code=code, stop_signal=runner.user_stop):
            slurm.requeue_and_record(job, os.environ)
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
    from supervisor.precision import describe as describe_precision

    lc = job.launch
    n = lc.num_processes if lc.num_processes is not None else ("from config_file" if lc.config_file else 1)
    where = "cpu" if lc.cpu else "accelerator"
    r, st, w = job.restart, job.stop, job.watch
    lines = [
        f"  script:     {job.train.script} {' '.join(job.train.args)}".rstrip(),
        f"  launch:     {lc.launcher}, {n} process(es) on {where}, mixed precision "
        f"{describe_precision(job)}",
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


