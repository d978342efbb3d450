"""The toy script (tests/scripts/toy_train.py) run inside the test process: a run costs a
fraction of a second. Signals sent to this process are real and go through the real handler."""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from train_core.runfiles import read_json
from train_core.store import CheckpointStore

TOY = Path(__file__).parent / "scripts" / "toy_train.py"
_spec = importlib.util.spec_from_file_location("toy_train", TOY)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """Autouse in every test module that imports it: no TRAINSUP_* env from outside; signal
    handlers and accelerate state restored after."""
    for key in list(os.environ):
        if key.startswith("TRAINSUP_"):
            monkeypatch.delenv(key)
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run(run_dir: Path, *args: str, on_micro=None):
    """Run the toy in-process; (exit code or exception, ranks/exit-0.json)."""
    try:
        result = toy.main(["--run-dir", str(run_dir), *args], on_micro=on_micro)
    except SystemExit as e:
        result = e.code
    except BaseException as e:  # noqa: BLE001 - the test inspects it
        result = e
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return result, read_json(run_dir / "ranks" / "exit-0.json")


def steps(run_dir: Path) -> list[int]:
    return [c.step for c in CheckpointStore(run_dir / "checkpoints").scan() if c.valid]
