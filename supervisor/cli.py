"""`trainsup`: the command line. Commands live in small modules; this file assembles them.

Nothing imported here may import torch: `trainsup --help` must stay fast.
"""

from __future__ import annotations

import click

from supervisor import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="trainsup")
def main() -> None:
    """Fault-tolerant training supervisor for PyTorch + Accelerate.

    \b
    Example:
      trainsup run examples/gpt/job.toml
      trainsup checkpoints list runs/gpt-tiny
    """


from supervisor.cli_run import run_cmd, status_cmd, validate_cmd  # noqa: E402

main.add_command(run_cmd)
main.add_command(validate_cmd)
main.add_command(status_cmd)

from supervisor.cli_checkpoints import checkpoints  # noqa: E402

main.add_command(checkpoints)

from supervisor.service import service  # noqa: E402

main.add_command(service)
