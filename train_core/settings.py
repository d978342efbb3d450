"""What a TrainSession is set up with: its arguments and the TRAINSUP_* environment the
supervisor passes (torch-free)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from train_core.errors import SessionError
from train_core.runfiles import (ENV_ATTEMPT, ENV_AUTO_INTERVAL, ENV_CHECKPOINT_DIR, ENV_CHECKPOINT_INTERVAL_STEPS,
                                 ENV_GRAD_ACCUM, ENV_GROUP_SHARED, ENV_MICRO_BATCH, ENV_RUN_DIR, ENV_SUPERVISOR_PID,
                                 RunPaths)
from train_core.store import CheckpointStore


def default_run_dir() -> Path:
    """TRAINSUP_RUN_DIR, else ./runs/<script name> (relative to the working directory)."""
    env = os.environ.get(ENV_RUN_DIR)
    if env:
        return Path(env)
    stem = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] not in ("", "-c") else "run"
    return Path.cwd() / "runs" / (stem or "run")


def attempt() -> int:
    return int(os.environ.get(ENV_ATTEMPT) or 0)


def supervisor_pid() -> int | None:
    """The supervisor's pid when the run is under `trainsup run`, else None."""
    sup = os.environ.get(ENV_SUPERVISOR_PID)
    return int(sup) if sup and sup.isdigit() else None


def checkpoint_store(paths: RunPaths, *, trust_pickle: bool) -> CheckpointStore:
    """TRAINSUP_CHECKPOINT_DIR, else RUN_DIR/checkpoints; group-readable for a group_shared run dir."""
    ckpt_env = os.environ.get(ENV_CHECKPOINT_DIR)
    return CheckpointStore(Path(ckpt_env) if ckpt_env else paths.checkpoints, trust_pickle=trust_pickle,
                           group_shared=os.environ.get(ENV_GROUP_SHARED) == "1")


def env_int(name: str) -> int | None:
    """A positive integer from the environment, None when unset; SessionError otherwise."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SessionError(f"{name}={raw!r} must be a positive integer (or unset)")
    return value


def env_bool(name: str, default: bool | None) -> bool:
    """"1"/"0" from the environment wins (the job file's choice); else `default`, where None is True."""
    raw = os.environ.get(name, "")
    if raw not in ("", "0", "1"):
        raise SessionError(f"{name}={raw!r} must be 1 or 0 (or unset)")
    return raw == "1" if raw else default is not False


def env_float(name: str) -> float | None:
    """A positive finite number from the environment, else None."""
    try:
        value = float(os.environ.get(name) or "nan")
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


@dataclass(frozen=True)
class AutoInterval:
    """save_every_steps "auto" (train_core/interval.py): its prior, floor and ceiling, and the
    failure history of the run before this attempt (the supervisor's RUN_DIR/failures.json)."""

    expected_mtbf_s: float = 3600.0
    min_steps: int = 1
    max_s: float = 1800.0
    failures: int = 0
    uptime_s: float = 0.0


def save_interval(script_value: int | str) -> tuple[int, AutoInterval | None]:
    """(a fixed interval in steps, 0: none), or (0, the "auto" settings): the job file's
    $TRAINSUP_CHECKPOINT_INTERVAL_STEPS wins over the script's `save_every_steps`."""
    raw = os.environ.get(ENV_CHECKPOINT_INTERVAL_STEPS, "")
    if raw != "auto" and (raw or script_value != "auto"):
        return env_int(ENV_CHECKPOINT_INTERVAL_STEPS) or int(script_value), None
    try:
        given = json.loads(os.environ.get(ENV_AUTO_INTERVAL) or "{}")
        auto = AutoInterval(**{k: type(getattr(AutoInterval, k))(v) for k, v in given.items()
                               if k in AutoInterval.__dataclass_fields__})
    except (ValueError, TypeError) as e:
        raise SessionError(f"{ENV_AUTO_INTERVAL} is not what trainsup writes ({e}); unset it") from None
    bad = [k for k, v in asdict(auto).items()
           if not math.isfinite(v) or v < 0 or (k in ("expected_mtbf_s", "min_steps") and v <= 0)]
    if bad:
        raise SessionError(f"{ENV_AUTO_INTERVAL}: {', '.join(bad)} out of range ({asdict(auto)}); unset it or give "
                           "expected_mtbf_s > 0, min_steps >= 1 and the others >= 0")
    return 0, auto


def check_args(accelerator: Any, *, micro_batch: Any, grad_accum: Any, max_steps: Any, max_epochs: Any,
               save_every_steps: Any, eval_every_steps: Any, best_mode: Any) -> None:
    """SessionError naming the fix for an argument TrainSession cannot work with."""
    for name, value, low, optional in (
        ("micro_batch", micro_batch, 1, True),
        ("grad_accum", grad_accum, 1, True),
        ("max_steps", max_steps, 0, True),
        ("max_epochs", max_epochs, 1, True),
        ("save_every_steps", save_every_steps, 0, False),
        ("eval_every_steps", eval_every_steps, 0, False),
    ):
        if value is None and optional or (name == "save_every_steps" and value == "auto"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            also = ' or "auto"' if name == "save_every_steps" else ""
            raise SessionError(f"TrainSession({name}=...) must be an integer >= {low}{also}, got {value!r}")
    if best_mode not in ("min", "max"):
        raise SessionError(f'TrainSession(best_mode=...) must be "min" or "max", got {best_mode!r}')
    if max_steps is None and max_epochs is None:
        raise SessionError("TrainSession needs max_steps=N or max_epochs=N (when should training end?)")
    if not getattr(getattr(accelerator, "dataloader_config", None), "use_seedable_sampler", False):
        raise SessionError(
            "exact resume needs a seedable sampler: build the Accelerator with "
            "dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)"
        )


def batch_shape(micro_batch: int | None, grad_accum: int | None, accelerator_accum: int) -> tuple[int | None, int]:
    """(micro_batch, grad_accum) for this attempt. OOM recovery: the supervisor may shrink the
    micro-batch and grow the accumulation (TRAINSUP_MICRO_BATCH, TRAINSUP_GRAD_ACCUM)."""
    env_micro, env_accum = env_int(ENV_MICRO_BATCH), env_int(ENV_GRAD_ACCUM)
    if env_micro is not None and micro_batch is None:
        raise SessionError(
            f"{ENV_MICRO_BATCH} is set but the script gives no micro_batch: pass "
            "TrainSession(micro_batch=...) and build the DataLoader with session.micro_batch"
        )
    return env_micro or micro_batch, env_accum or grad_accum or accelerator_accum
