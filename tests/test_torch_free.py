"""The supervisor never imports torch (nor accelerate, numpy, pynvml at import): every module
under supervisor/, found by walking the package (a module added later is covered), and the
train_core modules the supervisor uses, imported together in a clean interpreter."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import supervisor

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "accelerate", "numpy", "pynvml")
# train_core's torch-free half: what the supervisor and `trainsup checkpoints` import.
TRAIN_CORE_TORCH_FREE = ("train_core", "train_core.contract", "train_core.runfiles", "train_core.store",
                         "train_core.retention", "train_core.safeload", "train_core.heartbeat", "train_core.signals")


def supervisor_modules() -> list[str]:
    walked = pkgutil.walk_packages(supervisor.__path__, "supervisor.")
    return sorted(m.name for m in walked if m.name != "supervisor.__main__")  # that one runs the CLI


def test_no_module_of_the_supervisor_imports_torch():
    modules = supervisor_modules() + list(TRAIN_CORE_TORCH_FREE)
    assert "supervisor.runner.loop" in modules and "supervisor.runner.procs" in modules  # the walk works
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, f"importing the supervisor imported {p.stdout.strip()} {p.stderr[-800:]}"


def test_the_check_can_fail():
    """The same check sees torch when a module does import it (train_core.session)."""
    code = "import sys, train_core.session; sys.exit(0 if 'torch' in sys.modules else 1)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT),
                                                                       "PATH": "/usr/bin:/bin"}).returncode == 0
