"""`[launch] mixed_precision = "auto"`: the precision this machine computes natively, or the one
the run dir already trains in (torch-free: CPU flags and NVML, never torch).

By hardware (a new run):
- on a CPU (a `cpu = true` launch, or no CUDA GPU visible to the job): bf16 when every CPU
  has `avx512_bf16` or `amx_bf16` in /proc/cpuinfo, else fp32 ("no"). Without those
  instructions bf16 autocast is emulated: the demo trained ~20x slower than in fp32 on a
  2-core AMD EPYC (docs/platform.md, "CPU precision");
- on CUDA (compute capability read through NVML, the lowest of the GPUs the job sees):
  bf16 from 8.0 (Ampere on), fp16 on 7.x (Volta, Turing: tensor cores, no bf16), fp32 below
  (no tensor cores; consumer Pascal runs fp16 arithmetic at a fraction of fp32's rate) and
  when the capability cannot be read.

A run dir whose checkpoint to resume from records a precision (its manifest's
`mixed_precision`, written by train_core) keeps it: a script that fingerprints its config
(the demo) would otherwise refuse the resume, and a run goes on in the precision it trained in.

An explicit value is passed on unchanged; "bf16" where the ranks run on a CPU without native
bf16 gets one warning with the cost and the fix. Everything the probes read is injectable
(`Probe`): tests give a fake /proc/cpuinfo and a fake GPU backend (supervisor.watch.fake_gpu).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from train_core.checkpoint import MIXED_PRECISIONS, Checkpoint

if TYPE_CHECKING:
    from supervisor.config import JobConfig
    from supervisor.watch.nvml import GpuBackend

AUTO = "auto"
CPUINFO = Path("/proc/cpuinfo")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_MIN_CC = (8, 0)  # Ampere: bf16 tensor cores
FP16_MIN_CC = (7, 0)  # Volta: fp16 tensor cores
MAX_CPUINFO_BYTES = 64 << 20  # a machine with thousands of CPUs has a few MB
# What the explicit-bf16 warning says it costs (docs/platform.md, "CPU precision": measured)
EMULATED_BF16_COST = ("about 20x slower than fp32 (the demo on a 2-core AMD EPYC without them: ~0.5k "
                      "tokens/s in bf16, ~10.5k in fp32)")


@dataclass(frozen=True)
class Probe:
    """Where the hardware is read. `gpu`: makes the GPU backend (None: the job's [gpu] fake_script
    when it has one, as the GPU watch does, else NVML); `env`: CUDA_VISIBLE_DEVICES is looked up
    in the job's [train] env, then here (None: the supervisor's environment)."""

    cpuinfo: Path = CPUINFO
    gpu: Callable[[], "GpuBackend"] | None = None
    env: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Choice:
    value: str  # "no" | "fp16" | "bf16"
    why: str  # e.g. "this CPU has no native bf16: avx512_bf16/amx_bf16 absent"


@dataclass(frozen=True)
class Resolution:
    """What a run starts with: `value` replaces the job's mixed_precision (None: unchanged),
    `line` is said at start (info), `warning` once at start."""

    value: str | None = None
    line: str | None = None
    warning: str | None = None
    source: str | None = None  # "hardware" | "checkpoint" (under auto)


# --------------------------------------------------------------------------- probes


def cpu_native_bf16(cpuinfo: os.PathLike[str] | str = CPUINFO) -> tuple[bool | None, str]:
    """(whether every CPU has native bf16, why) from the `flags` lines of /proc/cpuinfo; None
    when it cannot tell (unreadable, or no x86 flags: another architecture)."""
    path = Path(cpuinfo)
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CPUINFO_BYTES).decode("utf-8", errors="replace")
    except OSError as e:
        return None, f"cannot read {path} ({e.strerror or e}): native bf16 unknown"
    flag_sets = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flag_sets.append(set(value.split()))
    if not flag_sets:
        return None, f"no x86 CPU flags in {path}: native bf16 unknown"
    present = [f for f in CPU_BF16_FLAGS if all(f in s for s in flag_sets)]
    if present:
        return True, f"this CPU has native bf16: {'/'.join(present)}"
    return False, f"this CPU has no native bf16: {'/'.join(CPU_BF16_FLAGS)} absent"


@dataclass(frozen=True)
class _Gpus:
    capabilities: tuple[tuple[int, int] | None, ...]  # () = no GPU visible to the job
    why: str


def cuda_gpus(backend: "GpuBackend", cuda_visible_devices: str | None) -> _Gpus:
    """The compute capabilities of the GPUs the job sees (None where unreadable); () with the
    reason when there is none (no driver, no GPU, CUDA_VISIBLE_DEVICES hides them)."""
    from supervisor.watch.gpu import visible_nvml_indices
    from supervisor.watch.nvml import GpuUnavailable

    try:
        backend.open()
    except GpuUnavailable as e:
        return _Gpus((), f"no CUDA GPU ({e})")
    # Past open(), anything NVML does wrong only makes the precision unknown (fp32): a probe
    # never stops a run from starting.
    try:
        count = backend.device_count()
        indices, _ = visible_nvml_indices(cuda_visible_devices, count, backend.device_uuid)
        if not indices:
            hidden = f" visible (CUDA_VISIBLE_DEVICES={cuda_visible_devices!r})" if count else ""
            return _Gpus((), f"no CUDA GPU{hidden}")
        read = getattr(backend, "compute_capability", None)
        caps = []
        for i in indices:
            try:
                caps.append(read(i) if read is not None else None)
            except Exception:  # noqa: BLE001 - GpuUnavailable, or a pynvml without the call
                caps.append(None)
        return _Gpus(tuple(caps), f"{len(indices)} CUDA GPU(s)")
    except Exception as e:  # noqa: BLE001
        return _Gpus((None,), f"a CUDA GPU whose NVML read failed: {e}")
    finally:
        try:
            backend.close()
        except Exception:  # noqa: BLE001
            pass


def _cc(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def _gpu_backend(job: "JobConfig", probe: Probe) -> "GpuBackend":
    if probe.gpu is not None:
        return probe.gpu()
    from supervisor.watch.gpu import gpu_backend
    from supervisor.watch.nvml import NvmlBackend
    from supervisor.watch.registry import job_dir

    cfg = job.sections.get("gpu")  # the GPU watch's backend: a job's fake GPU script counts here too
    return gpu_backend(cfg, job_dir(job)) if cfg is not None else NvmlBackend()


def _cuda_visible(job: "JobConfig", probe: Probe) -> str | None:
    if "CUDA_VISIBLE_DEVICES" in job.train.env:
        return job.train.env["CUDA_VISIBLE_DEVICES"]
    return (os.environ if probe.env is None else probe.env).get("CUDA_VISIBLE_DEVICES")


def _on_cpu(job: "JobConfig", probe: Probe) -> tuple[bool, _Gpus | None]:
    """(whether the ranks run on the CPU, the GPUs found when they were looked for)."""
    if job.launch.cpu:
        return True, None
    gpus = cuda_gpus(_gpu_backend(job, probe), _cuda_visible(job, probe))
    return not gpus.capabilities, gpus


def by_hardware(job: "JobConfig", probe: Probe = Probe()) -> Choice:
    """What "auto" chooses on this machine for a new run of `job` (module docstring)."""
    return _by_hardware(probe, *_on_cpu(job, probe))


def _by_hardware(probe: Probe, on_cpu: bool, gpus: _Gpus | None) -> Choice:
    if on_cpu:
        native, why = cpu_native_bf16(probe.cpuinfo)
        where = f"{gpus.why}; " if gpus is not None else ""
        return Choice("bf16" if native is True else "no", where + why)
    assert gpus is not None
    if any(cc is None for cc in gpus.capabilities):
        return Choice("no", "a CUDA GPU whose compute capability NVML does not tell: fp32 to be safe")
    cc = min(c for c in gpus.capabilities if c is not None)
    lowest = f"CUDA compute capability {_cc(cc)}" + (" (the lowest of the job's GPUs)"
                                                     if len(set(gpus.capabilities)) > 1 else "")
    if cc >= BF16_MIN_CC:
        return Choice("bf16", f"{lowest}: native bf16")
    if cc >= FP16_MIN_CC:
        return Choice("fp16", f"{lowest}: fp16 tensor cores, no native bf16")
    return Choice("no", f"{lowest}: no tensor cores")


# --------------------------------------------------------------------------- the run dir


def recorded_precision(ckpt: Checkpoint) -> tuple[str | None, str]:
    """(the precision `ckpt` was trained in, where that was read) or (None, why not).

    The manifest's `mixed_precision` (train_core writes it); for a checkpoint written before
    that, the script's own config key `mixed_precision` (the demo records it there). Both are
    untrusted: only one of MIXED_PRECISIONS counts.
    """
    manifest = ckpt.manifest if isinstance(ckpt.manifest, Mapping) else {}
    if "mixed_precision" in manifest:
        value = ckpt.mixed_precision
        if value is None:
            return None, f"its manifest's mixed_precision {_short(manifest['mixed_precision'])} is not one of " \
                         f"{', '.join(MIXED_PRECISIONS)}: ignored"
        return value, "its manifest"
    config = manifest.get("config")
    if isinstance(config, Mapping) and config.get("mixed_precision") in MIXED_PRECISIONS:
        return str(config["mixed_precision"]), "its config"
    return None, "it records no mixed_precision"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------- resolving a job


def resolve(job: "JobConfig", resume: Checkpoint | None, probe: Probe = Probe()) -> Resolution:
    """What the run of `job` starts with, given the checkpoint it resumes from (None: fresh)."""
    mp = job.launch.mixed_precision
    if mp == AUTO:
        return _resolve_auto(job, resume, probe)
    if mp == "bf16":
        return Resolution(warning=emulated_bf16_warning(job, probe))
    return Resolution()


def _resolve_auto(job: "JobConfig", resume: Checkpoint | None, probe: Probe) -> Resolution:
    on_cpu, gpus = _on_cpu(job, probe)
    hardware = _by_hardware(probe, on_cpu, gpus)
    if resume is not None:
        kept, where = recorded_precision(resume)
        if kept is not None:
            new_run = ("the hardware agrees" if kept == hardware.value
                       else f"a new run here would choose {hardware.value}")
            warning = None
            if kept == "bf16" and on_cpu and cpu_native_bf16(probe.cpuinfo)[0] is False:
                warning = (f"this run keeps bf16 from {resume.path.name}, but this CPU has no native bf16: bf16 "
                           f"autocast is emulated, {EMULATED_BF16_COST}; to train in fp32, start a new run dir "
                           f'(--run-dir), or set mixed_precision = "no" where the script accepts the change '
                           f"(the demo: --allow-change mixed_precision)")
            return Resolution(kept, f"mixed precision auto -> {kept} (kept from {resume.path.name}, the checkpoint "
                                    f"this run resumes from: {where} says {kept}; {new_run}: {hardware.why})",
                              warning=warning, source="checkpoint")
        return Resolution(hardware.value, f"mixed precision auto -> {hardware.value} ({hardware.why}; "
                                          f"{resume.path.name} does not say which it was trained in: {where})",
                          source="hardware")
    return Resolution(hardware.value, f"mixed precision auto -> {hardware.value} ({hardware.why})",
                      source="hardware")


def emulated_bf16_warning(job: "JobConfig", probe: Probe = Probe()) -> str | None:
    """The one warning for an explicit bf16 where the ranks run on a CPU without native bf16."""
    on_cpu, _ = _on_cpu(job, probe)
    if not on_cpu:
        return None
    native, _ = cpu_native_bf16(probe.cpuinfo)
    if native is not False:  # native, or cannot tell (another architecture): nothing to warn about
        return None
    return (f'[launch] mixed_precision = "bf16", but this CPU has no native bf16 ({"/".join(CPU_BF16_FLAGS)} '
            f'absent in {probe.cpuinfo}): bf16 autocast is emulated, {EMULATED_BF16_COST}; set '
            f'mixed_precision = "auto" (picks "no" here) or "no"')


def describe(job: "JobConfig", probe: Probe = Probe()) -> str:
    """`trainsup validate`'s words for the job's precision (by hardware: the run dir is not read)."""
    mp = job.launch.mixed_precision
    if mp == AUTO:
        hw = by_hardware(job, probe)
        return f"auto -> {hw.value} ({hw.why}; a run dir with checkpoints keeps theirs)"
    if mp == "bf16" and emulated_bf16_warning(job, probe):
        return "bf16 (emulated on this CPU: about 20x slower than \"no\"; \"auto\" picks \"no\" here)"
    return mp or ("from config_file" if job.launch.config_file else "no")
