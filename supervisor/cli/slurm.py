"""`trainsup slurm script`: an sbatch script for a job (supervisor/slurm.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from supervisor.cli.run import SET_HELP


@click.group("slurm")
def slurm() -> None:
    """SLURM: submit a job that saves on the time-limit warning and requeues itself."""


@slurm.command("script")
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True, help="Nodes (one supervisor each).")
@click.option("--time", "time_min", type=click.IntRange(min=1), default=60, show_default=True,
              help="Time limit in minutes (sbatch --time).")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory on a filesystem every node shares; overrides run_dir in the job file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
def script_cmd(job_file: Path, nodes: int, time_min: int, run_dir: Path | None, overrides: tuple[str, ...]) -> None:
    """Print an sbatch script that runs JOB_FILE under trainsup on N nodes.

    Slurm's warning signal (USR1) comes a lead before the time limit: Slurm's 60-s
    resolution plus what a stop costs, from the save time recorded in the run dir
    (costs.json) when it has one, else 30 s. The job saves on it, requeues itself, and
    resumes from that checkpoint when Slurm starts it again.

    \b
    Example:
      trainsup slurm script examples/gpt/job.toml --nodes 2 --time 120 > gpt.sbatch
      sbatch gpt.sbatch
    """
    from supervisor import slurm as sl
    from supervisor.config import load_job
    from train_core import costs as costing

    job = load_job(job_file, overrides, run_dir=run_dir)
    costs = costing.load(job.paths.costs)
    lead = sl.signal_lead_s(costs)
    if lead >= time_min * 60:
        raise click.UsageError(f"--time {time_min} min is not longer than the warning's lead ({lead} s): "
                               f"ask for at least {lead // 60 + 2} minutes")
    where = (f"from the save time in {job.paths.costs}" if costs.save_s is not None
             else "default: no save time recorded yet")
    click.echo(sl.script(job_file, job=job, nodes=nodes, time_min=time_min, run_dir=run_dir, overrides=overrides,
                         lead_s=lead, lead_from=where, trainsup=shutil.which("trainsup") or "trainsup"), nl=False)
