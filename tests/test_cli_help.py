"""Every `trainsup` command (including ones added later) has help text; -h works; no torch on import (test_torch_free.py)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from supervisor import __version__
from supervisor.cli import main

ROOT = Path(__file__).resolve().parents[1]


def walk(cmd: click.Command, path: tuple[str, ...] = ()):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from walk(sub, (*path, name))


COMMANDS = list(walk(main))


def test_the_tree_has_the_checkpoint_commands():
    paths = {" ".join(p) for p, _ in COMMANDS}
    assert {"checkpoints", "checkpoints list", "checkpoints verify", "checkpoints prune"} <= paths


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) or "trainsup" for p, _ in COMMANDS])
def test_every_command_has_help_with_h_and_help(path, cmd):
    assert (cmd.help or "").strip(), f"`trainsup {' '.join(path)}` has no help text (write its docstring)"
    assert (cmd.get_short_help_str() or "").strip()
    for param in cmd.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert (param.help or "").strip(), f"`trainsup {' '.join(path)} {param.opts[0]}` has no help text"
    outputs = []
    for flag in ("-h", "--help"):
        r = CliRunner().invoke(main, [*path, flag], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert r.output.startswith("Usage: ")
        outputs.append(r.output)
    assert outputs[0] == outputs[1]
    first_line = " ".join(cmd.help.strip().splitlines()[0].split())
    assert first_line in " ".join(outputs[0].split())  # click re-wraps long lines


def test_group_help_lists_every_subcommand_with_a_summary():
    for path, cmd in COMMANDS:
        if isinstance(cmd, click.Group):
            out = CliRunner().invoke(main, [*path, "-h"]).output
            for name in cmd.commands:
                assert f"  {name}  " in out or f"  {name}\n" in out, (path, name, out)


def test_version():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and r.output == f"trainsup, version {__version__}\n"
