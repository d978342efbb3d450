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


# Submodules are bound as modules (supervisor.cli.checkpoints is the module, not its group).
from supervisor.cli import checkpoints as _checkpoints  # noqa: E402
from supervisor.cli import report as _report  # noqa: E402
from supervisor.cli import run as _run  # noqa: E402
from supervisor.cli import slurm as _slurm  # noqa: E402
from supervisor.cli import status as _status  # noqa: E402
from supervisor.systemd import service as _service  # noqa: E402

for _cmd in (_run.run_cmd, _run.validate_cmd, _status.status_cmd, _report.report_cmd, _checkpoints.checkpoints,
             _slurm.slurm, _service.service):
    main.add_command(_cmd)
