"""[launch] mixed_precision = "auto" (supervisor/precision.py): bf16 only where the hardware has it
natively, read from a fake /proc/cpuinfo and a fake GPU backend; a run dir keeps the precision of
the checkpoint it resumes from; an explicit bf16 on a CPU without native bf16 warns once."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from fake_procs import FakeClock, FakeProcesses, Rank, job_file
from supervisor import precision as P
from supervisor.cli import main
from supervisor.config import JobConfig, JobConfigError, load_job
from supervisor.events import read_events
from supervisor.runner import Runner, launch
from supervisor.runner.checkpoints import RunCheckpoints
from supervisor.watch.fake_gpu import FakeGpuBackend, FakeScript
from train_core import runfiles
from train_core.store import CheckpointStore

AMD_EPYC_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx avx avx2 fma bmi1 bmi2"
SAPPHIRE_RAPIDS = AMD_EPYC_FLAGS + " avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8"


def cpuinfo(tmp_path: Path, *flag_lines: str, name: str = "cpuinfo") -> Path:
    """A /proc/cpuinfo with one processor block per flags line."""
    blocks = [f"processor\t: {i}\nvendor_id\t: AuthenticAMD\nmodel name\t: Fake CPU\nflags\t\t: {flags}\n"
              for i, flags in enumerate(flag_lines)]
    path = tmp_path / name
    path.write_text("\n".join(blocks))
    return path


def job(tmp_path: Path, **launch_keys) -> JobConfig:
    (tmp_path / "train.py").write_text("")
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in launch_keys.items())
    (tmp_path / "job.toml").write_text(f'[train]\nscript = "train.py"\n[launch]\n{body}\n')
    return load_job(tmp_path / "job.toml")


def fake_gpus(compute_capability, device_count: int = 1):
    script = FakeScript.from_obj({"points": [{"t_s": 0, "temp_c": 50}], "device_count": device_count,
                                  **({"compute_capability": compute_capability} if compute_capability else {})})
    return lambda: FakeGpuBackend(script, start_s=0.0)


# --------------------------------------------------------------------------- by hardware


@pytest.mark.parametrize("flags, chosen", [
    ([AMD_EPYC_FLAGS, AMD_EPYC_FLAGS], "no"),  # AVX2 only: bf16 would be emulated
    ([AMD_EPYC_FLAGS + " avx512_bf16"] * 2, "bf16"),
    ([AMD_EPYC_FLAGS + " amx_bf16"], "bf16"),
    ([SAPPHIRE_RAPIDS, AMD_EPYC_FLAGS], "no"),  # every CPU must have it
])
def test_auto_on_a_cpu_picks_bf16_only_with_native_bf16(tmp_path, flags, chosen):
    probe = P.Probe(cpuinfo=cpuinfo(tmp_path, *flags), gpu=lambda: pytest.fail("a CPU launch reads no GPU"))
    choice = P.by_hardware(job(tmp_path, cpu=True, mixed_precision="auto"), probe)
    assert choice.value == chosen
    if chosen == "no":
        assert choice.why == "this CPU has no native bf16: avx512_bf16/amx_bf16 absent"
    r = P.resolve(job(tmp_path, cpu=True, mixed_precision="auto"), None, probe)
    assert r.value == chosen and r.line == f"mixed precision auto -> {chosen} ({choice.why})" and r.warning is None


def test_auto_without_readable_cpu_flags_is_fp32(tmp_path):
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    for path in (tmp_path / "missing", arm):
        choice = P.by_hardware(job(tmp_path, cpu=True, mixed_precision="auto"), P.Probe(cpuinfo=path))
        assert choice.value == "no" and "native bf16 unknown" in choice.why


@pytest.mark.parametrize("cc, chosen", [("8.0", "bf16"), ("9.0", "bf16"), ("7.5", "fp16"), ("7.0", "fp16"),
                                        ("6.1", "no"), (None, "no")])
def test_auto_on_cuda_goes_by_compute_capability(tmp_path, cc, chosen):
    probe = P.Probe(cpuinfo=cpuinfo(tmp_path, SAPPHIRE_RAPIDS), gpu=fake_gpus(cc), env={})
    choice = P.by_hardware(job(tmp_path, mixed_precision="auto"), probe)
    assert choice.value == chosen, choice
    if cc:
        assert f"CUDA compute capability {cc}" in choice.why


def test_auto_on_cuda_takes_the_lowest_visible_gpu_and_no_gpu_means_the_cpu(tmp_path):
    cpu = cpuinfo(tmp_path, AMD_EPYC_FLAGS)
    mixed = fake_gpus(["8.6", "7.5"], device_count=2)
    j = job(tmp_path, mixed_precision="auto", num_processes=2)
    assert P.by_hardware(j, P.Probe(cpuinfo=cpu, gpu=mixed, env={})).value == "fp16"
    assert P.by_hardware(j, P.Probe(cpuinfo=cpu, gpu=mixed, env={"CUDA_VISIBLE_DEVICES": "0"})).value == "bf16"
    hidden = P.by_hardware(j, P.Probe(cpuinfo=cpu, gpu=mixed, env={"CUDA_VISIBLE_DEVICES": ""}))
    assert hidden.value == "no" and "no CUDA GPU visible" in hidden.why and "avx512_bf16/amx_bf16 absent" in hidden.why
    # the job's own [train] env wins over the supervisor's, as for the GPU watch
    with_env = dataclasses.replace(j, train=dataclasses.replace(j.train, env={"CUDA_VISIBLE_DEVICES": "0"}))
    assert P.by_hardware(with_env, P.Probe(cpuinfo=cpu, gpu=mixed, env={"CUDA_VISIBLE_DEVICES": "1"})).value == "bf16"


def test_auto_reads_the_jobs_fake_gpu_script(tmp_path):
    """[gpu] fake_script stands in for NVML here as it does for the GPU watch."""
    (tmp_path / "gpu.json").write_text(json.dumps({"points": [{"t_s": 0}], "compute_capability": "7.5"}))
    (tmp_path / "train.py").write_text("")
    (tmp_path / "job.toml").write_text('[train]\nscript = "train.py"\n[launch]\nmixed_precision = "auto"\n'
                                       '[gpu]\nfake_script = "gpu.json"\n')
    j = load_job(tmp_path / "job.toml")
    assert P.by_hardware(j, P.Probe(env={})).value == "fp16"


def test_a_bad_compute_capability_in_a_fake_script_names_the_fix():
    with pytest.raises(JobConfigError, match=r'compute_capability must be "8.6" \(every GPU\) or a list of 2'):
        FakeScript.from_obj({"points": [{"t_s": 0}], "device_count": 2, "compute_capability": ["8.6"]})


# --------------------------------------------------------------------------- the run dir


def commit(store: CheckpointStore, step: int, **extra) -> Path:
    tmp = store.begin(step)
    (tmp / "model.safetensors").write_bytes(b"weights" * step)
    return store.commit(tmp, step, epoch=0, batch_in_epoch=step, reason="interval", extra=extra).path


def resume_choice(run_dir: Path):
    ckpts = RunCheckpoints(CheckpointStore(runfiles.RunPaths(run_dir).checkpoints))
    ckpts.refresh(force=True)
    return ckpts.choose_resume()[0]


def test_auto_keeps_the_precision_of_the_newest_valid_checkpoint(tmp_path):
    j = job(tmp_path, cpu=True, mixed_precision="auto")
    store = CheckpointStore(runfiles.RunPaths(j.run_dir).checkpoints)
    commit(store, 10, mixed_precision="fp16")
    commit(store, 20, mixed_precision="bf16")
    broken = commit(store, 30, mixed_precision="fp16")
    (broken / "model.safetensors").write_bytes(b"torn")  # size mismatch: invalid, never resumed from
    probe = P.Probe(cpuinfo=cpuinfo(tmp_path, AMD_EPYC_FLAGS))
    resume = resume_choice(j.run_dir)
    assert resume.step == 20 and resume.mixed_precision == "bf16"
    r = P.resolve(j, resume, probe)
    assert (r.value, r.source) == ("bf16", "checkpoint")
    assert r.line == ("mixed precision auto -> bf16 (kept from step-00000020, the checkpoint this run resumes from: "
                      "its manifest says bf16; a new run here would choose no: this CPU has no native bf16: "
                      "avx512_bf16/amx_bf16 absent)")
    # kept, but emulated here: the cost and the way out
    assert r.warning.startswith("this run keeps bf16 from step-00000020, but this CPU has no native bf16: bf16 "
                                "autocast is emulated, about 20x slower than fp32")
    assert "start a new run dir" in r.warning
    native = P.resolve(j, resume, P.Probe(cpuinfo=cpuinfo(tmp_path, SAPPHIRE_RAPIDS, name="spr")))
    assert native.value == "bf16" and "the hardware agrees" in native.line and native.warning is None
    # a new run dir chooses by hardware
    assert P.resolve(j, None, probe).value == "no"


def test_an_old_or_bad_manifest_precision(tmp_path):
    """Before the field: the script's config key (the demo's); a value that is not a precision is
    ignored (the manifest is untrusted) without making the checkpoint invalid."""
    j = job(tmp_path, cpu=True, mixed_precision="auto")
    store = CheckpointStore(runfiles.RunPaths(j.run_dir).checkpoints)
    probe = P.Probe(cpuinfo=cpuinfo(tmp_path, AMD_EPYC_FLAGS))
    cases = [({"config": {"mixed_precision": "bf16"}}, "bf16", "its config"),
             ({"config": {"mixed_precision": "fp99"}}, "no", "it records no mixed_precision"),
             ({}, "no", "it records no mixed_precision"),
             ({"mixed_precision": 16}, "no", "its manifest's mixed_precision 16 is not one of no, fp16, bf16, fp8"),
             ({"mixed_precision": "bf16; rm -rf /", "config": {"mixed_precision": "bf16"}}, "no", "is not one of")]
    for step, (extra, chosen, said) in enumerate(cases, start=1):
        commit(store, step, **extra)
        resume = resume_choice(j.run_dir)
        assert resume.step == step and resume.valid
        r = P.resolve(j, resume, probe)
        assert r.value == chosen and said in r.line, (extra, r)


def test_explicit_values_are_passed_on_unchanged(tmp_path):
    j = job(tmp_path, cpu=True, mixed_precision="fp16")
    store = CheckpointStore(runfiles.RunPaths(j.run_dir).checkpoints)
    commit(store, 5, mixed_precision="bf16")
    assert P.resolve(j, resume_choice(j.run_dir), P.Probe(cpuinfo=cpuinfo(tmp_path, AMD_EPYC_FLAGS))) == P.Resolution()


# --------------------------------------------------------------------------- the runner


T0 = 1000.0


def run_fake(tmp_path: Path, probe: P.Probe, ranks, caplog, **launch_keys):
    j = load_job(job_file(tmp_path, launch={"cpu": True, **launch_keys}), check_script=False)
    clock = FakeClock(T0)
    procs = FakeProcesses(clock, j.run_dir, ranks)
    runner = Runner(j, procs=procs, clock=clock, wall_clock=clock, sleep=clock.sleep, rand=lambda: 0.5,
                    install_signals=False, probe=probe)
    with caplog.at_level(logging.INFO, logger="supervisor.runner.loop"):
        code = runner.run()
    return j, code, procs


def test_the_runner_launches_what_auto_chose_and_says_so(tmp_path, caplog):
    pre = CheckpointStore(runfiles.RunPaths(tmp_path / "run").checkpoints)
    commit(pre, 10, mixed_precision="bf16")
    probe = P.Probe(cpuinfo=cpuinfo(tmp_path, AMD_EPYC_FLAGS))
    j, code, procs = run_fake(tmp_path, probe, lambda n: Rank(finish_at_step=30), caplog, mixed_precision="auto")
    assert code == 0
    assert [e["ACCELERATE_MIXED_PRECISION"] for e in procs.spawned] == ["bf16"]  # direct start: accelerate's env
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mixed precision auto")]
    assert len(said) == 1 and said[0].startswith("mixed precision auto -> bf16 (kept from step-00000010")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "bf16" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("this run keeps bf16 from step-00000010")
    events = [e for e in read_events(runfiles.RunPaths(j.run_dir).events) if e["event"] == "mixed_precision"]
    assert [(e["chosen"], e["source"], e["checkpoint"]) for e in events] == [("bf16", "checkpoint", "step-00000010")]


def test_a_fresh_run_under_auto_launches_the_hardwares_choice(tmp_path, caplog):
    probe = P.Probe(cpuinfo=cpuinfo(tmp_path, AMD_EPYC_FLAGS))
    _, code, procs = run_fake(tmp_path, probe, lambda n: Rank(finish_at_step=30), caplog, mixed_precision="auto",
                              direct=False)
    assert code == 0
    starting = [e for e in read_events(runfiles.RunPaths(tmp_path / "run").events) if e.get("to") == "starting"]
    argv = starting[0]["argv"]  # through `accelerate launch`: the flag
    assert argv[argv.index("--mixed_precision") + 1] == "no"
    assert "mixed precision auto -> no (this CPU has no native bf16: avx512_bf16/amx_bf16 absent)" in caplog.text


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns_once(tmp_path, caplog):
    probe = P.Probe(cpuinfo=cpuinfo(tmp_path, AMD_EPYC_FLAGS))
    crash_then_finish = lambda n: Rank(beat_after=None, exit_at=0.5) if n == 1 else Rank(finish_at_step=30)  # noqa: E731
    _, code, procs = run_fake(tmp_path, probe, crash_then_finish, caplog, mixed_precision="bf16")
    assert code == 0 and len(procs.spawned) == 2  # two attempts, one warning
    assert all(e["ACCELERATE_MIXED_PRECISION"] == "bf16" for e in procs.spawned)  # explicit still wins
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "bf16" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith('[launch] mixed_precision = "bf16", but this CPU has no native bf16 '
                                  '(avx512_bf16/amx_bf16 absent in ')
    assert "about 20x slower than fp32" in warnings[0] and 'set mixed_precision = "auto" (picks "no" here) or "no"' \
        in warnings[0]


@pytest.mark.parametrize("flags, launch_keys", [(SAPPHIRE_RAPIDS, {"mixed_precision": "bf16"}),
                                                (AMD_EPYC_FLAGS, {"mixed_precision": "auto"}),
                                                (AMD_EPYC_FLAGS, {"mixed_precision": "no"})])
def test_no_precision_warning_where_nothing_is_emulated(tmp_path, caplog, flags, launch_keys):
    probe = P.Probe(cpuinfo=cpuinfo(tmp_path, flags))
    _, code, _ = run_fake(tmp_path, probe, lambda n: Rank(finish_at_step=30), caplog, **launch_keys)
    assert code == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and "bf16" in r.getMessage()]


# --------------------------------------------------------------------------- config, launch, validate


def test_auto_is_a_valid_value_and_bad_ones_still_name_the_choices(tmp_path):
    assert job(tmp_path, mixed_precision="auto").launch.mixed_precision == "auto"
    (tmp_path / "job.toml").write_text('[train]\nscript = "train.py"\n')
    assert load_job(tmp_path / "job.toml", ["launch.mixed_precision=auto"]).launch.mixed_precision == "auto"
    with pytest.raises(JobConfigError, match=r'mixed_precision must be one of "no", "fp16", "bf16", "fp8", "auto" '
                                             r'\("auto": bf16 only where the hardware has it natively\), got '
                                             r"'Auto' \(did you mean 'auto'\?\)"):
        load_job(tmp_path / "job.toml", ["launch.mixed_precision=Auto"])
    with pytest.raises(JobConfigError, match=r"mixed_precision must be one of .* got a boolean True"):
        load_job(tmp_path / "job.toml", ["launch.mixed_precision=true"])


def test_an_unresolved_auto_never_reaches_the_launcher(tmp_path):
    with pytest.raises(ValueError, match="must be resolved first"):
        launch.build_launch(job(tmp_path, mixed_precision="auto"), attempt=1, resume_from=None, supervisor_pid=1,
                            base_env={})


def test_validate_says_what_auto_picks(tmp_path):
    from click.testing import CliRunner

    job(tmp_path, cpu=True, mixed_precision="auto")
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "job.toml")])
    assert r.exit_code == 0, r.output
    assert "mixed precision auto -> " in r.output
