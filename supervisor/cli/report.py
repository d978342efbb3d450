"""`trainsup report`: the picture of a run (supervisor.report), as report.html and report.png."""

from __future__ import annotations

from pathlib import Path

import click

from supervisor.cli.common import resolve_run_dir
from supervisor.errors import UserError


@click.command("report")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the HTML (the PNG goes beside it, .png). Default: RUN_DIR/report.html.")
def report_cmd(target: Path, output: Path | None) -> None:
    """Draw a run: loss over steps and wall time, every stop by cause, checkpoints, and where
    the wall clock went (training, saving, restarting, recomputing, paused, waiting), with the
    goodput. Writes a self-contained report.html and report.png; needs matplotlib
    (pip install 'trainsup[plot]').

    \b
    Example:
      trainsup report runs/gpt-tiny
      trainsup report examples/gpt/job.toml -o /tmp/gpt-tiny.html
    """
    run_dir = resolve_run_dir(str(target))
    if output is not None and not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such directory; create it or pass another --output")
    if output is not None and output.suffix.lower() != ".html":
        raise UserError(f"{output}: --output names the HTML file (the PNG is written beside it); "
                        f"use e.g. {output.with_suffix('.html')}")
    from supervisor import report

    try:
        html_path, png_path = report.write(run_dir, output)
    except report.MatplotlibMissing as e:
        raise UserError(str(e)) from None
    except PermissionError as e:
        raise UserError(f"{e.filename}: permission denied; run as the run dir's owner or pass --output") from None
    click.echo(html_path)
    click.echo(png_path)
