"""Checkpoint files that can hold pickles: checked without torch, loaded without running code.

A pickle is a program: its GLOBAL/STACK_GLOBAL opcodes import any callable and REDUCE calls
it, so `torch.load(weights_only=False)` of a planted `random_states_0.pkl` runs the planter's
code as the user. Two defences share one allow-list (ALLOWED_GLOBALS):

- `scan_file` (torch-free, used by `trainsup checkpoints list/verify`, by the supervisor when it
  picks a checkpoint and by the rank before it loads one) runs every pickle inside a torch
  zip archive through Python's C unpickler with each import checked against the list and
  resolved to an inert stand-in (nothing of torch's, numpy's or the file's runs), and names
  the first import that is not on the list. A file in another format that torch would
  unpickle (the pre-1.6 legacy format, a bare pickle) is refused: it cannot be checked so.
- `load_torch_file` (in the rank) is `torch.load(weights_only=True)` with only the numpy
  names of the list added to torch's own safe set.

The list is what `accelerator.save_state` and trainsup write: tensors and their storages,
OrderedDict, numpy arrays and dtypes (the RNG states), plain containers and numbers.
`TRAINSUP_TRUST_PICKLE=1` (documented opt-in for checkpoints the user made and trusts, e.g.
with objects from their own classes) skips the scan and loads registered objects with
weights_only=False.
"""

from __future__ import annotations

import _compat_pickle
import io
import json
import os
import pickle
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ENV_TRUST_PICKLE = "TRAINSUP_TRUST_PICKLE"

# Files something may unpickle: torch.load's usual names, and torch.distributed.checkpoint's
# .metadata (FSDP sharded state, read with plain pickle.load). .safetensors, .json: data only.
PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth", ".ckpt", ".metadata")
MAX_PICKLE_BYTES = 16 << 20  # one data.pkl member: tensors live in other members, this is metadata
_ZIP_MAGIC = b"PK\x03\x04"

_TORCH_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                 "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128", "float8_e4m3fn",
                 "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
             "ComplexFloat", "ComplexDouble")
# numpy names torch does not allow by itself (the rank adds exactly these to its safe globals)
NUMPY_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *(("numpy.dtypes", f"{k}DType") for k in ("Bool", "Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32",
                                             "Int64", "UInt64", "Float16", "Float32", "Float64")),
})
ALLOWED_GLOBALS = frozenset({
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"), ("torch", "device"), ("torch.storage", "UntypedStorage"),
    *(("torch", name) for name in _TORCH_DTYPES),
    *(("torch", f"{s}Storage") for s in _STORAGES),
    *NUMPY_GLOBALS,
})

class UnsafePickle(Exception):
    """The file needs more than the allow-list to load; the message names what and where."""


def trust_pickle_from_env(env: Any = None) -> bool:
    value = (env if env is not None else os.environ).get(ENV_TRUST_PICKLE, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def needs_scan(rel_path: str) -> bool:
    return rel_path.lower().endswith(PICKLE_SUFFIXES)


class _Inert:
    """What every allowed import resolves to while checking: calling, building or filling it
    does nothing, so no code of the file's choosing (nor torch's, nor numpy's) ever runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _CheckingUnpickler(pickle.Unpickler):
    """The C unpickler with every import checked against ALLOWED_GLOBALS and resolved to _Inert.

    Its opcodes are the real unpickler's, so the names an import resolves to (GLOBAL,
    STACK_GLOBAL through the memo, INST, the copyreg extension registry) are exactly the
    ones torch.load would import, found at C speed (a pure-Python opcode walk of a
    random_states file takes ~1 ms; this takes ~0.05 ms)."""

    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        _check_global(module, name, self.where)
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        return None  # a torch storage reference: the tensor data lives in other zip members


def scan_pickle(data: bytes, where: str = "pickle") -> None:
    """Raise UnsafePickle when the pickle `data` imports anything outside ALLOWED_GLOBALS,
    or is not a readable pickle."""
    try:
        _CheckingUnpickler(data, where).load()
    except UnsafePickle:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed pickle is refused, whatever went wrong
        raise UnsafePickle(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from None


def _check_global(module: str, attr: str, where: str) -> None:
    if (module, attr) in _compat_pickle.NAME_MAPPING:  # protocol 0-2 spell builtins the Python 2 way,
        module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]  # as the real unpickler maps them
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if (module, attr) not in ALLOWED_GLOBALS:
        raise UnsafePickle(f"{where} would import {printable(f'{module}.{attr}')} (not a tensor, array or plain "
                           "value: loading it could run code)")


def scan_file(path: str | os.PathLike, rel: str | None = None) -> None:
    """Raise UnsafePickle unless `path` is a torch zip archive whose pickles pass `scan_pickle`
    (OSError when it cannot be read). Opened without following symlinks or blocking (a FIFO is
    refused, not waited on). Only what torch writes is accepted: stored (not compressed, not
    encrypted) members. In-process, a crafted pickle can still cost memory and time: the store
    checks files through `check_files`, which runs this in a capped child process."""
    rel = rel or Path(path).name
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise UnsafePickle(f"{rel} is not a regular file")
        if f.read(4) != _ZIP_MAGIC:
            raise UnsafePickle(f"{rel} is not a torch zip archive (a legacy torch.save file or a bare pickle "
                               "cannot be checked before it runs)")
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as z:
                members = [i for i in z.infolist() if i.filename.endswith(".pkl")]
                if not members:
                    raise UnsafePickle(f"{rel}: a zip archive without torch's data.pkl")
                for info in members:
                    name = printable(info.filename)
                    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
                        raise UnsafePickle(f"{rel}: {name} is compressed or encrypted (torch never writes that)")
                    if info.file_size > MAX_PICKLE_BYTES:
                        raise UnsafePickle(f"{rel}: {name} is {info.file_size} bytes "
                                           f"(more than {MAX_PICKLE_BYTES >> 20} MiB of pickle)")
                    with z.open(info) as m:
                        data = m.read(MAX_PICKLE_BYTES + 1)
                    scan_pickle(data, f"{rel} ({name})")
        except (UnsafePickle, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - zipfile raises many kinds for a crafted archive
            raise UnsafePickle(f"{rel}: not a readable zip archive ({type(e).__name__}: {printable(str(e))})") from None


# A crafted pickle can make any unpickler allocate far more than its size (a memo index of
# 2**32, millions of one-byte opcodes that each build an object) or spin: files are checked
# in a child process with its address space capped, under a time limit.
CHECK_MEMORY_BYTES = 1 << 30
CHECK_TIMEOUT_S = 60.0
UNSAFE, UNREADABLE = "unsafe", "unreadable"
_ROOT = str(Path(__file__).resolve().parents[1])


def check_files(files: list[tuple[str, str]]) -> list[tuple[str, str] | None]:
    """For each (path, name): None when it passes `scan_file`, else (UNSAFE | UNREADABLE, problem).

    One capped child process checks them all; when it fails as a whole (killed, timed out),
    each file is checked again in a child of its own, so the file that did it is named."""
    if not files:
        return []
    verdicts = _run_checker(files)
    if verdicts is None:
        verdicts = []
        for one in files:
            got = _run_checker([one])
            verdicts.append(got[0] if got else (UNSAFE, f"{one[1]}: checking it did not finish within "
                                                         f"{CHECK_TIMEOUT_S:g} s or {CHECK_MEMORY_BYTES >> 20} MiB"))
    return verdicts


def _run_checker(files: list[tuple[str, str]]) -> list[tuple[str, str] | None] | None:
    """Verdicts from capped child processes (one per core for a long list); None if one failed."""
    code = f"import sys; sys.path.insert(0, {_ROOT!r}); from train_core.safeload import _checker; _checker()"
    n = max(1, min(os.cpu_count() or 1, 4, len(files) // 200))
    chunks = [files[i::n] for i in range(n)]
    procs = []
    try:
        for chunk in chunks:  # the list goes in as a file: every child starts at once
            with tempfile.TemporaryFile("w+") as listing:
                json.dump(chunk, listing)
                listing.seek(0)
                procs.append(subprocess.Popen([sys.executable, "-I", "-S", "-c", code], stdin=listing,
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        deadline = time.monotonic() + CHECK_TIMEOUT_S
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            outs.append(json.loads(out) if p.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(not isinstance(o, list) or len(o) != len(c) for o, c in zip(outs, chunks)):
        return None
    verdicts: list[tuple[str, str] | None] = [None] * len(files)
    for i, out in enumerate(outs):
        verdicts[i::n] = [tuple(v) if v else None for v in out]
    return verdicts


def _checker() -> None:
    """The child of check_files: JSON [[path, name], ...] on stdin, verdicts on stdout."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CHECK_MEMORY_BYTES, CHECK_MEMORY_BYTES))
    out: list[Any] = []
    for path, rel in json.load(sys.stdin):
        try:
            scan_file(path, rel)
            out.append(None)
        except UnsafePickle as e:
            out.append([UNSAFE, str(e)])
        except OSError as e:
            out.append([UNREADABLE, f"unreadable file {printable(rel)}: {e.strerror or e}"])
        except MemoryError:
            out.append([UNSAFE, f"{rel}: checking it needs more than {CHECK_MEMORY_BYTES >> 20} MiB "
                                "(a pickle built to exhaust memory)"])
    json.dump(out, sys.stdout)


def printable(text: str, limit: int = 80) -> str:
    """A name from the file, for a message: printable, and short."""
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_torch_file(path: str | os.PathLike, *, map_location: Any = "cpu", trust: bool = False) -> Any:
    """torch.load with weights_only=True and the numpy names of ALLOWED_GLOBALS (in the rank).

    `trust` (TRAINSUP_TRUST_PICKLE) loads with weights_only=False: only for files you made."""
    import importlib

    import torch

    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    extra = []
    for module, attr in sorted(NUMPY_GLOBALS):
        try:
            extra.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue  # numpy 1.x has numpy.core, 2.x numpy._core: the other one is missing
    with torch.serialization.safe_globals(extra):
        return torch.load(path, map_location=map_location, weights_only=True)
