"""Config fingerprints: refuse to resume a checkpoint made with a different config.

Torch-free and pure. The config is the user's hyperparameter dict (model, optimizer, data
settings): it is stored whole in each checkpoint's manifest, so a mismatch can be reported
key by key ("lr: 0.001 -> 0.002") instead of as two opaque hashes.

Batch geometry (micro_batch, grad_accum, world_size) is NOT part of the config: the session
tracks it separately, because OOM recovery legitimately shrinks the micro-batch while
growing the accumulation (same samples per optimizer step, still an exact resume).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterable, Mapping

_MISSING = object()


class ConfigError(ValueError):
    """A config that cannot be fingerprinted; the message names the key and the fix."""


class ConfigMismatch(ValueError):
    """The checkpoint was made with another config; the message lists the keys."""

    def __init__(self, message: str, keys: tuple[str, ...]):
        super().__init__(message)
        self.keys = keys


def canonical_config(config: Mapping[str, Any] | None, _path: str = "config") -> dict[str, Any]:
    """`config` as plain JSON types (dicts with str keys, lists, str, int, float, bool, None).

    Tuples become lists. Anything else is refused with the key path: a fingerprint must
    not depend on an object's repr (addresses change between runs).
    """
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"{_path} must be a dict of hyperparameters, got {type(config).__name__}")
    return {str(k): _canon(v, f"{_path}.{k}") for k, v in config.items()}


def _canon(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{path} is {value}; a config value must be a finite number (store it as a string)")
        return float(value)
    if isinstance(value, Mapping):
        for k in value:
            if not isinstance(k, str):
                raise ConfigError(f"{path} has a non-string key {k!r}; use string keys")
        return {k: _canon(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(v, f"{path}[{i}]") for i, v in enumerate(value)]
    # numpy / torch scalars: accept what converts losslessly to a Python number.
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _canon(item(), path)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise ConfigError(
        f"{path} is a {type(value).__name__}, which has no stable JSON form; "
        "pass numbers, strings, booleans, lists or dicts (e.g. str(value))"
    )


def fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `config` (key order does not matter)."""
    data = json.dumps(canonical_config(config), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else k, out)
    else:
        out[prefix] = obj


def diff_configs(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every leaf that differs; missing = _MISSING."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(canonical_config(old), "", a)
    _flatten(canonical_config(new), "", b)
    out = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va is _MISSING or vb is _MISSING or type(va) is not type(vb) or va != vb:
            out[key] = (va, vb)
    return out


def _allowed(key: str, allow: Iterable[str]) -> bool:
    # "optim" allows "optim.lr" and "optim.betas"; "optim.lr" allows only that leaf.
    return any(key == a or key.startswith(a + ".") or key.startswith(a + "[") for a in allow)


MISMATCH_KEYS_SHOWN = 3  # a checkpoint of another job differs in dozens of keys: one short line


def _show(v: Any) -> str:
    text = "(absent)" if v is _MISSING else json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check_config_change(
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    *,
    allow_changes: Iterable[str] = (),
    checkpoint: str = "the checkpoint",
) -> dict[str, tuple[Any, Any]]:
    """The allowed differences between `old` (stored) and `new`; raises ConfigMismatch otherwise."""
    if old is None:
        raise ConfigMismatch(
            f"{checkpoint} stores no config, so it cannot be checked against this run's config; "
            "resume it with the script that made it or start a new run dir",
            (),
        )
    allow = tuple(allow_changes)
    changes = diff_configs(old, new)
    refused = {k: v for k, v in changes.items() if not _allowed(k, allow)}
    if refused:
        shown = list(refused.items())[:MISMATCH_KEYS_SHOWN]
        listed = ", ".join(f"{k} ({_show(a)} -> {_show(b)})" for k, (a, b) in shown)
        more = len(refused) - len(shown)
        if more:
            listed += f" and {more} more"
        hint = ", ".join(repr(k) for k, _ in shown) + (", ..." if more else ",")
        raise ConfigMismatch(
            f"{checkpoint} was made by another job or config: {len(refused)} key(s) differ: {listed}. "
            f"Fix: resume with the original values, use another run dir (--run-dir) for a new run, "
            f"allow a deliberate change with allow_changes=({hint}), or remove that checkpoint",
            tuple(refused),
        )
    return changes
