"""systemd units: `systemd-analyze verify` finds nothing; `trainsup service` writes a working instance."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from supervisor.systemd import service as svc
from supervisor_helpers import prerequisite

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted((REPO / "systemd").glob("*.service")) + sorted((REPO / "systemd").glob("*.timer"))
needs_analyze = prerequisite(shutil.which("systemd-analyze") is not None, "systemd-analyze not installed")


def verify(tmp_path: Path, unit: Path, user: bool) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)  # `--user` wants a private XDG_RUNTIME_DIR
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}
    cmd = ["systemd-analyze", *(["--user"] if user else []), "verify", str(unit)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def test_there_are_units() -> None:
    assert [u.name for u in UNITS] == ["trainsup@.service"]


@needs_analyze
@pytest.mark.parametrize("user", [True, False], ids=["user", "system"])
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify_is_silent(tmp_path: Path, unit: Path, user: bool) -> None:
    # verify exits 0 on warnings such as a misspelt key (docs/platform.md, "systemd"): any output fails.
    proc = verify(tmp_path, unit, user)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@needs_analyze
def test_verify_does_catch_a_typo(tmp_path: Path) -> None:
    # Guards the test above: the check must be able to fail.
    bad = tmp_path / "trainsup@.service"
    bad.write_text(svc.TEMPLATE.replace("KillMode=mixed", "KilMode=mixed"))
    out = verify(tmp_path, bad, user=True)
    assert "Unknown key 'KilMode'" in out.stdout + out.stderr


def test_shipped_template_matches_repository_file() -> None:
    assert svc.TEMPLATE == (REPO / "systemd" / "trainsup@.service").read_text(), (
        "systemd/trainsup@.service and supervisor/service.py TEMPLATE differ: copy one onto the other")


@pytest.mark.parametrize("line", [
    "Type=notify", "NotifyAccess=main", "KillMode=mixed", "TimeoutStopSec=90s", "Restart=on-failure",
    "SuccessExitStatus=75", "RestartPreventExitStatus=2 3 4", "StartLimitBurst=5", "OOMPolicy=continue",
    "NoNewPrivileges=yes", "ExecStart=/usr/bin/env trainsup run ${TRAINSUP_JOB}", "UMask=0077",
])
def test_template_has(line: str) -> None:
    assert line in svc.TEMPLATE.splitlines()


def test_umask_is_in_the_service_section() -> None:
    lines = svc.TEMPLATE.splitlines()
    service, install = lines.index("[Service]"), lines.index("[Install]")
    assert service < lines.index("UMask=0077") < install
    assert "UMask=0077" in (REPO / "systemd" / "trainsup@.service").read_text().splitlines()


def test_template_keeps_gpu_reachable() -> None:
    settings = [ln for ln in svc.TEMPLATE.splitlines() if ln and not ln.startswith("#")]
    for forbidden in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "MemoryDenyWriteExecute",
                      "ProtectSystem", "PrivateUsers"):
        assert not any(ln.startswith(forbidden + "=") for ln in settings), forbidden


# --------------------------------------------------------------------------- service command


@pytest.fixture
def job(tmp_path: Path) -> Path:
    d = tmp_path / "my jobs" / "gpt"
    d.mkdir(parents=True)
    (d / "train.py").write_text("print('hi')\n")
    job = d / "job.toml"
    job.write_text('[train]\nscript = "train.py"\n[stop]\ngrace_s = 120\n')
    return job


@pytest.fixture
def fake_trainsup(tmp_path: Path) -> Path:
    exe = tmp_path / "venv 100%" / "bin" / "trainsup"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return exe


def test_install_without_systemd_writes_units_and_says_what_to_run(tmp_path, job, fake_trainsup) -> None:
    units = tmp_path / "units"
    res = CliRunner().invoke(svc.service, ["install", str(job), "--unit-dir", str(units),
                                           "--trainsup", str(fake_trainsup), "--env", "HF_HOME=/data/hf"])
    assert res.exit_code == 0, res.output
    unit = "trainsup@gpt.service"
    dropin = units / f"{unit}.d" / "job.conf"
    assert res.output == "\n".join([
        f"wrote {units / 'trainsup@.service'}",
        f"wrote {dropin}",
        "systemd is not running here, so nothing was enabled; on the machine that runs it:",
        "  systemctl --user daemon-reload",
        f"  systemctl --user enable {unit}",
        f"unit {unit} runs: trainsup run {job}",
        f"  start:   systemctl --user start {unit}",
        f"  logs:    journalctl --user -u {unit} -f",
        f"  status:  systemctl --user status {unit}",
        f"  stop:    systemctl --user stop {unit}   (saves a checkpoint first)",
        f"  keep it running after logout and start it at boot: loginctl enable-linger {getpass.getuser()}",
    ]) + "\n"
    assert (units / "trainsup@.service").read_text() == svc.TEMPLATE
    text = dropin.read_text()
    bindir = str(fake_trainsup.parent).replace("%", "%%")
    assert f'Environment="TRAINSUP_JOB={job}"' in text  # quoted: the path has a space
    assert f'Environment="PATH={bindir}:/usr/local/sbin:' in text
    assert 'Environment="HF_HOME=/data/hf"' in text
    assert "TimeoutStopSec=150s" in text  # grace_s 120 + kill_after_s 10 + 20
    assert f"WorkingDirectory={job.parent}" in text

    # Same again: nothing to write.
    res = CliRunner().invoke(svc.service, ["install", str(job), "--unit-dir", str(units),
                                           "--trainsup", str(fake_trainsup), "--env", "HF_HOME=/data/hf"])
    assert res.exit_code == 0 and "wrote" not in res.output


@needs_analyze
def test_installed_instance_verifies_clean(tmp_path, job, fake_trainsup) -> None:
    units = tmp_path / "units"
    svc.install_service(job, unit_dir=units, trainsup_exe=fake_trainsup, systemd_running=False)
    # systemd reads the drop-in next to the template: quoting, %% and env all parse.
    proc = verify(tmp_path, units / "trainsup@gpt.service", user=True)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@needs_analyze
def test_odd_executable_name_overrides_execstart_and_verifies(tmp_path, job) -> None:
    exe = tmp_path / "bin" / "trainsup-dev"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    units = tmp_path / "units"
    r = svc.install_service(job, name="dev.1", unit_dir=units, trainsup_exe=exe, systemd_running=False)
    assert r.unit == "trainsup@dev.1.service"
    assert f'ExecStart="{exe}" run ${{TRAINSUP_JOB}}' in r.dropin_text.splitlines()
    proc = verify(tmp_path, units / r.unit, user=True)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_install_runs_systemctl_when_systemd_runs(tmp_path, job, fake_trainsup) -> None:
    calls = []

    def run(cmd):
        calls.append(tuple(cmd))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    r = svc.install_service(job, unit_dir=tmp_path / "u", trainsup_exe=fake_trainsup, start_now=True,
                            systemd_running=True, run=run)
    assert calls == [("systemctl", "--user", "daemon-reload"),
                     ("systemctl", "--user", "enable", "--now", "trainsup@gpt.service")]
    assert r.ran == tuple(calls) and r.to_run == () and r.started
    assert "start:" not in r.report() and "ran: systemctl --user enable --now trainsup@gpt.service" in r.report()


def test_systemctl_failure_is_reported(tmp_path, job, fake_trainsup) -> None:
    def run(cmd):
        return subprocess.CompletedProcess(cmd, 1, "", "Failed to connect to bus: No medium found\n")

    with pytest.raises(click.ClickException, match="systemctl --user daemon-reload exited 1: Failed to connect"):
        svc.install_service(job, unit_dir=tmp_path / "u", trainsup_exe=fake_trainsup, systemd_running=True, run=run)


def test_name_clash_needs_force(tmp_path, job, fake_trainsup) -> None:
    units = tmp_path / "u"
    svc.install_service(job, unit_dir=units, trainsup_exe=fake_trainsup, systemd_running=False)
    other_dir = tmp_path / "elsewhere" / "gpt"
    other_dir.mkdir(parents=True)
    (other_dir / "train.py").write_text("")
    other = other_dir / "job.toml"
    other.write_text('[train]\nscript = "train.py"\n')
    args = ["install", str(other), "--unit-dir", str(units), "--trainsup", str(fake_trainsup)]
    res = CliRunner().invoke(svc.service, args)
    assert res.exit_code == 2
    assert res.output == (f"Error: trainsup@gpt.service already runs {job}; pick another name with --name, "
                          f"or pass --force to point it at {other}\n")
    res = CliRunner().invoke(svc.service, args + ["--force"])
    assert res.exit_code == 0, res.output
    assert f"TRAINSUP_JOB={other}" in (units / "trainsup@gpt.service.d" / "job.conf").read_text()


@pytest.mark.parametrize("args,message", [
    (["install", "{tmp}/missing.toml"], "Error: {tmp}/missing.toml: no such job file"),
    (["install", "{job}", "--name", "a b"], "Error: --name 'a b': use letters, digits"),
    (["install", "{job}", "--trainsup", "{tmp}/nope"], "Error: --trainsup {tmp}/nope: not an executable file"),
    (["install", "{job}", "--env", "1X=2"], "Error: --env '1X=2': expected KEY=VALUE"),
    (["install", "{job}", "--env", "HF_HOME=/data\nExecStartPre=/bin/rm -rf ~"],
     "Error: --env 'HF_HOME=/data\\nExecStartPre=/bin/rm -rf ~': the value contains the control character '\\n'"),
    (["install", "{job}", "--env", "A=x\ty"], "Error: --env 'A=x\\ty': the value contains the control character '\\t'"),
    (["install", "{job}", "--env", "A=x\x7f"], "Error: --env 'A=x\\x7f': the value contains the control character"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, job, fake_trainsup, args, message) -> None:
    fmt = {"tmp": tmp_path, "job": job}
    argv = [a.format(**fmt) for a in args] + ["--unit-dir", str(tmp_path / "u")]
    if "--trainsup" not in argv:
        argv += ["--trainsup", str(fake_trainsup)]
    res = CliRunner().invoke(svc.service, argv)
    assert res.exit_code == 2
    assert res.output.startswith(message.format(**fmt)) and res.output.count("\n") == 1
    assert not (tmp_path / "u").exists()


def _newline_job(tmp_path: Path) -> Path:
    d = tmp_path / "jobs\nExecStartPre=evil" / "gpt"
    d.mkdir(parents=True)
    (d / "train.py").write_text("")
    job = d / "job.toml"
    job.write_text('[train]\nscript = "train.py"\n')
    return job


def test_newline_in_job_path_is_refused_and_nothing_written(tmp_path, fake_trainsup) -> None:
    job = _newline_job(tmp_path)
    units = tmp_path / "u"
    res = CliRunner().invoke(svc.service, ["install", str(job), "--unit-dir", str(units),
                                           "--trainsup", str(fake_trainsup)])
    assert res.exit_code == 2, res.output
    assert res.output == (f"Error: job file {str(job)!r} contains the control character '\\n', which would split "
                          "a unit file setting (a newline starts a new directive); "
                          "move the job to a path without control characters\n")
    assert not units.exists()


def test_newline_in_trainsup_path_is_refused_and_nothing_written(tmp_path, job) -> None:
    exe = tmp_path / "venv\n[Service]" / "bin" / "trainsup"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    units = tmp_path / "u"
    with pytest.raises(click.ClickException) as e:
        svc.install_service(job, unit_dir=units, trainsup_exe=exe, systemd_running=False)
    assert e.value.exit_code == 2
    assert e.value.message.startswith(f"trainsup executable {str(exe)!r} contains the control character '\\n'")
    assert not units.exists()


@pytest.mark.parametrize("env", [{"A": "1\nExecStartPre=/bin/false"}, {"A\nB": "1"}, {"A": "\x00"}])
def test_control_characters_in_env_are_refused_by_the_library_too(tmp_path, job, fake_trainsup, env) -> None:
    units = tmp_path / "u"
    with pytest.raises(click.ClickException) as e:
        svc.install_service(job, unit_dir=units, trainsup_exe=fake_trainsup, env=env, systemd_running=False)
    assert e.value.exit_code == 2 and "contains the control character" in e.value.message
    assert "\n" not in e.value.message
    assert not units.exists()


def test_control_characters_in_run_dir_are_refused(tmp_path, job, fake_trainsup) -> None:
    job.write_text('run_dir = "out\\nExecStartPre=/bin/false"\n[train]\nscript = "train.py"\n')
    with pytest.raises(click.ClickException, match=r"^run_dir '.*out\\nExecStartPre=/bin/false' contains the "
                                                   r"control character '\\n'"):
        svc.plan_service(job, unit_dir=tmp_path / "u", trainsup_exe=fake_trainsup)


def test_print_writes_nothing(tmp_path, job, fake_trainsup, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    res = CliRunner().invoke(svc.service, ["print", str(job), "--trainsup", str(fake_trainsup)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"# {tmp_path / 'cfg' / 'systemd' / 'user' / 'trainsup@.service'}\n")
    assert "[Service]\nEnvironment=\"TRAINSUP_JOB=" in res.output
    assert not (tmp_path / "cfg").exists()


def test_instance_names() -> None:
    assert svc.instance_name_for(Path("/x/gpt.toml")) == "gpt"
    assert svc.instance_name_for(Path("/x/gpt-tiny/job.toml")) == "gpt-tiny"
    assert svc.instance_name_for(Path("/x/my run (2).toml")) == "my-run-2"


def test_every_command_has_help_with_an_example() -> None:
    cmds = [svc.service, *svc.service.commands.values()]
    for cmd in cmds:
        assert cmd.help and "Example:" in cmd.help, cmd.name
    res = CliRunner().invoke(svc.service, ["install", "--help"])
    assert res.exit_code == 0 and "Write trainsup@NAME.service for JOB.toml" in res.output
