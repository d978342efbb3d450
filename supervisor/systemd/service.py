"""`trainsup service install JOB.toml`: run a job as a systemd user service.

What it writes (unit dir: ~/.config/systemd/user, or $XDG_CONFIG_HOME/systemd/user):
- `trainsup@.service`: the template (same text as systemd/trainsup@.service in the
  repository; TEMPLATE below is the copy that ships inside the package);
- `trainsup@NAME.service.d/job.conf`: the instance's job file, the PATH on which
  /usr/bin/env finds this trainsup, and TimeoutStopSec from the job's [stop] timings.

NAME is the job file's stem, or its directory's name for a file called job.toml
(examples/gpt/job.toml -> trainsup@gpt.service); `--name` overrides it.

It runs `systemctl --user daemon-reload` and `enable` only when a systemd user
manager is actually running; otherwise it says what to run. Library functions
return an `InstallResult`; only the click commands print.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import click

from supervisor.errors import UserError
from train_core.contract import STOP_MARGIN_S, outlast_stop_s

TEMPLATE_NAME = "trainsup@.service"
DROPIN_NAME = "job.conf"
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A unit file is one setting per line: a newline in a value would start a directive of its own.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

TEMPLATE = """# trainsup@.service: one trainsup training job as a systemd USER service.
#
# The instance is a job NAME (trainsup@gpt.service), not an escaped path: names
# stay short and typeable in `journalctl --user -u trainsup@gpt`. The job file
# and the trainsup executable come from a per-instance drop-in written by
# `trainsup service install JOB.toml`:
#   ~/.config/systemd/user/trainsup@NAME.service.d/job.conf
#     Environment="TRAINSUP_JOB=/abs/path/job.toml"
#     Environment="PATH=/abs/venv/bin:/usr/local/bin:/usr/bin:/bin"
# /usr/bin/env finds trainsup on that PATH, so one template serves jobs from
# different virtualenvs. Change settings with `systemctl --user edit trainsup@NAME`.
#
# Keep training across logout and reboot: `loginctl enable-linger $USER`.

[Unit]
Description=trainsup training job %i
# systemd restarts only the supervisor itself (it restarts the ranks on its own):
# at most 5 starts in 30 min, then the unit stays failed.
StartLimitIntervalSec=30min
StartLimitBurst=5

[Service]
Type=notify
# Only the supervisor may send READY/STATUS/WATCHDOG, never a rank.
NotifyAccess=main
ExecStart=/usr/bin/env trainsup run ${TRAINSUP_JOB}
Environment=PYTHONUNBUFFERED=1
# What trainsup creates (run dir, checkpoints, logs) is private to the user.
UMask=0077

# Stop: SIGTERM to the supervisor ONLY. It asks every rank to save at the next
# step and waits [stop] grace_s (60 s) plus kill_after_s (10 s) before it kills
# them; systemd SIGKILLs whatever is left after TimeoutStopSec, so keep it above
# grace_s + kill_after_s (install writes a drop-in when the job says otherwise).
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=90s
# A rank killed by the kernel OOM killer is the supervisor's business (it
# restarts with backoff); the default OOMPolicy=stop would stop the whole unit.
OOMPolicy=continue

# Exit codes (docs/contract.md): 75 = stopped on request with a checkpoint saved: a
# clean stop, never restarted. 2 = bad job/config, 3 = gave up (restart budget
# or no progress), 4 = run dir locked by another supervisor: restarting cannot
# help. Anything else (1 = internal error, a crash, a signal, the watchdog):
# restart after 30 s.
SuccessExitStatus=75
Restart=on-failure
RestartSec=30s
RestartPreventExitStatus=2 3 4

# Ping the watchdog from the supervisor's main loop (it sends WATCHDOG=1 every
# WatchdogSec/2); a hung supervisor is then killed and restarted.
#WatchdogSec=2min

# Hardening that keeps the GPU usable. Deliberately NOT set:
#  PrivateDevices=, DevicePolicy=closed, DeviceAllow=: would hide /dev/nvidia*,
#    /dev/dri and /dev/kfd.
#  MemoryDenyWriteExecute=: breaks JIT compilers (Triton, torch.compile, CUDA PTX JIT).
#  ProtectSystem=strict, ProtectHome=, PrivateTmp=: in a USER unit these need an
#    unprivileged user namespace (systemd turns on PrivateUsers=), which Ubuntu
#    23.10+ blocks by default (the unit would not start), and training writes
#    outside the run dir (HF/Triton/inductor caches). To opt in, in a drop-in:
#      ProtectSystem=strict
#      ReadWritePaths=/path/to/run_dir %h/.cache %t /tmp /dev/shm
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native

[Install]
WantedBy=default.target
"""


class ServiceError(click.ClickException):
    """systemctl itself failed (exit 1); bad input raises supervisor.errors.UserError (exit 2)."""


Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run(cmd: Sequence[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)


def default_unit_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "systemd" / "user"


def systemd_user_manager_running(env: Mapping[str, str] | None = None) -> bool:
    """sd_booted() plus a reachable user manager ($XDG_RUNTIME_DIR/systemd/private)."""
    env = os.environ if env is None else env
    if not os.path.isdir("/run/systemd/system"):
        return False
    runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return os.path.exists(os.path.join(runtime, "systemd", "private"))


def instance_name_for(job_path: Path) -> str:
    """gpt.toml -> "gpt"; examples/gpt/job.toml -> "gpt"; odd characters become "-"."""
    stem = job_path.stem
    if stem == "job" and job_path.resolve().parent.name:
        stem = job_path.resolve().parent.name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "job"
    return name if name[0].isalnum() else "job" + name


def _unit_quote(value: str) -> str:
    """One double-quoted word for a unit file: escape \\ and ", double % (specifiers)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def _cmd(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def find_trainsup() -> Path | None:
    found = shutil.which("trainsup")
    if found:
        return Path(found).absolute()
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "trainsup" and argv0.exists():
        return argv0.absolute()
    return None


def _refuse_control(what: str, value: str, fix: str) -> None:
    """UserError (exit 2) when `value` holds a control character, which would break the unit file."""
    m = _CONTROL_RE.search(value)
    if m:
        raise UserError(f"{what} {value!r} contains the control character {m.group()!r}, which would split "
                        f"a unit file setting (a newline starts a new directive); {fix}")


def render_dropin(job_path: Path, trainsup_exe: Path, *, stop_timeout_s: float,
                  env: Mapping[str, str] = {}, grace_note: str = "", run_dir: Path | None = None) -> str:
    """The per-instance drop-in: which job, which trainsup, how long a stop may take.

    Raises UserError for a value with a control character (it could inject unit directives).
    """
    _refuse_control("job file", str(job_path), "move the job to a path without control characters")
    _refuse_control("trainsup executable", str(trainsup_exe),
                    "install trainsup at a path without control characters, or pass --trainsup PATH")
    path_dirs = [str(trainsup_exe.parent)] + [d for d in SYSTEM_PATH if d != str(trainsup_exe.parent)]
    for d in path_dirs:
        _refuse_control("PATH entry", d, "install trainsup in a directory without control characters")
    for key, value in env.items():
        _refuse_control("--env key", key, "use a KEY of letters, digits and '_'")
        _refuse_control(f"--env {key} value", value, "pass a one-line value without control characters")
    if run_dir is not None:
        _refuse_control("run_dir", str(run_dir), "use a dedicated directory such as runs/NAME")
    lines = [
        "# Written by `trainsup service install`; edit with `systemctl --user edit <unit>`.",
        "[Service]",
        "Environment=" + _unit_quote(f"TRAINSUP_JOB={job_path}"),
        "Environment=" + _unit_quote("PATH=" + ":".join(path_dirs)),
    ]
    for key, value in env.items():
        lines.append("Environment=" + _unit_quote(f"{key}={value}"))
    if trainsup_exe.name != "trainsup":
        # /usr/bin/env only finds a program called "trainsup": name this one explicitly.
        lines += ["ExecStart=", "ExecStart=" + _unit_quote(str(trainsup_exe)) + " run ${TRAINSUP_JOB}"]
    # Path settings take the rest of the line as is (no quotes); only % needs escaping.
    lines.append("WorkingDirectory=" + str(job_path.parent).replace("%", "%%"))
    if grace_note:
        lines.append(f"# {grace_note}")  # systemd allows no comment after a value
    lines.append(f"TimeoutStopSec={stop_timeout_s:g}s")
    if run_dir is not None:
        lines.append(f"# Run dir (for ReadWritePaths= if you opt in to ProtectSystem=strict): {run_dir}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class InstallResult:
    unit: str  # trainsup@NAME.service
    job_path: Path
    template_path: Path
    dropin_path: Path
    dropin_text: str
    written: tuple[Path, ...] = ()
    ran: tuple[tuple[str, ...], ...] = ()  # systemctl commands run
    to_run: tuple[tuple[str, ...], ...] = ()  # systemctl commands the user should run
    started: bool = False
    user: str = field(default_factory=getpass.getuser)

    def report(self) -> str:
        """What was done and what to do next (printed by the CLI)."""
        out = [f"wrote {p}" for p in self.written]
        out += [f"ran: {_cmd(c)}" for c in self.ran]
        if self.to_run:
            out.append("systemd is not running here, so nothing was enabled; on the machine that runs it:")
            out += [f"  {_cmd(c)}" for c in self.to_run]
        u = self.unit
        out += [
            f"unit {u} runs: trainsup run {self.job_path}",
            *([] if self.started else [f"  start:   systemctl --user start {u}"]),
            f"  logs:    journalctl --user -u {u} -f",
            f"  status:  systemctl --user status {u}",
            f"  stop:    systemctl --user stop {u}   (saves a checkpoint first)",
            f"  keep it running after logout and start it at boot: loginctl enable-linger {self.user}",
        ]
        return "\n".join(out)


def plan_service(job_path: str | os.PathLike, *, name: str | None = None, unit_dir: str | os.PathLike | None = None,
                 trainsup_exe: str | os.PathLike | None = None, env: Mapping[str, str] | None = None
                 ) -> InstallResult:
    """Validate the job and render the files, writing nothing."""
    from supervisor.config import load_job  # imported here: `trainsup --help` stays fast

    job = Path(job_path)
    cfg = load_job(job)  # raises JobConfigError (exit 2) naming the problem
    job = job.resolve()
    if name is None:
        name = instance_name_for(job)
    elif not _NAME_RE.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '_', '.' or '-' "
                        f"(starting with a letter or digit), e.g. --name {instance_name_for(Path(name or 'job'))}")
    if trainsup_exe is None:
        exe = find_trainsup()
        if exe is None:
            raise UserError("cannot find the trainsup executable on PATH; install trainsup "
                            "(pip install -e .) or pass --trainsup /path/to/trainsup")
    else:
        exe = Path(trainsup_exe).absolute()
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise UserError(f"--trainsup {exe}: not an executable file; pass the path of the trainsup command")
    stop = cfg.stop
    timeout_s = outlast_stop_s(stop.grace_s, stop.kill_after_s)
    note = (f"[stop] grace_s {stop.grace_s:g} + kill_after_s {stop.kill_after_s:g} "
            f"+ {STOP_MARGIN_S:g} s margin")
    dropin_text = render_dropin(job, exe, stop_timeout_s=timeout_s, env=dict(env or {}), grace_note=note,
                                run_dir=cfg.run_dir)
    udir = Path(unit_dir) if unit_dir is not None else default_unit_dir()
    unit = f"trainsup@{name}.service"
    return InstallResult(unit=unit, job_path=job, template_path=udir / TEMPLATE_NAME,
                         dropin_path=udir / f"{unit}.d" / DROPIN_NAME, dropin_text=dropin_text)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def install_service(job_path: str | os.PathLike, *, name: str | None = None,
                    unit_dir: str | os.PathLike | None = None, trainsup_exe: str | os.PathLike | None = None,
                    env: Mapping[str, str] | None = None, start_now: bool = False, force: bool = False,
                    systemd_running: bool | None = None, run: Runner = _run) -> InstallResult:
    """Write the template and the instance drop-in; enable (and start) it when systemd runs."""
    plan = plan_service(job_path, name=name, unit_dir=unit_dir, trainsup_exe=trainsup_exe, env=env)
    if plan.dropin_path.exists() and not force:
        old = plan.dropin_path.read_text(encoding="utf-8", errors="replace")
        m = re.search(r'^Environment="TRAINSUP_JOB=(.*)"$', old, re.MULTILINE)
        old_job = m.group(1).replace("%%", "%") if m else None
        if old_job is not None and old_job != str(plan.job_path):
            raise UserError(f"{plan.unit} already runs {old_job}; pick another name with --name, "
                            f"or pass --force to point it at {plan.job_path}")
    written = []
    for path, text in ((plan.template_path, TEMPLATE), (plan.dropin_path, plan.dropin_text)):
        if not path.exists() or path.read_text(encoding="utf-8", errors="replace") != text:
            _write_atomic(path, text)
            written.append(path)
    enable = ("systemctl", "--user", "enable", *(("--now",) if start_now else ()), plan.unit)
    commands = (("systemctl", "--user", "daemon-reload"), enable)
    if systemd_running is None:
        systemd_running = systemd_user_manager_running()
    ran: list[tuple[str, ...]] = []
    if systemd_running:
        for cmd in commands:
            try:
                proc = run(cmd)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise ServiceError(f"{_cmd(cmd)} failed: {e}") from None
            if proc.returncode != 0:
                msg = (proc.stderr or proc.stdout or "").strip().splitlines()
                raise ServiceError(f"{_cmd(cmd)} exited {proc.returncode}: {msg[-1] if msg else 'no output'}")
            ran.append(cmd)
    return InstallResult(unit=plan.unit, job_path=plan.job_path, template_path=plan.template_path,
                         dropin_path=plan.dropin_path, dropin_text=plan.dropin_text, written=tuple(written),
                         ran=tuple(ran), to_run=() if systemd_running else commands,
                         started=bool(systemd_running and start_now))


# --------------------------------------------------------------------------- CLI


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise UserError(f"--env {pair!r}: expected KEY=VALUE, e.g. --env HF_HOME=/data/hf")
        m = _CONTROL_RE.search(value)
        if m:
            raise UserError(f"--env {pair!r}: the value contains the control character {m.group()!r}, which "
                            "would split a unit file setting (a newline starts a new directive); "
                            "pass a one-line value")
        env[key] = value
    return env


_job_arg = click.argument("job", metavar="JOB.toml")
_name_opt = click.option("--name", help="Instance name (default: the job file's name, or its directory's for job.toml).")
_exe_opt = click.option("--trainsup", "trainsup_exe", metavar="PATH",
                        help="The trainsup executable the service runs (default: the one on PATH).")
_env_opt = click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE",
                        help="Extra environment for the job (repeatable), e.g. --env HF_HOME=/data/hf.")


@click.group("service", context_settings={"help_option_names": ["-h", "--help"]})
def service() -> None:
    """Run a job as a systemd user service that survives logout, sleep and reboot.

    \b
    Example:
      trainsup service install examples/gpt/job.toml
      journalctl --user -u trainsup@gpt.service -f
    """


@service.command("install")
@_job_arg
@_name_opt
@_exe_opt
@_env_opt
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the units (default: ~/.config/systemd/user).")
@click.option("--now", "start_now", is_flag=True, help="Also start the service now.")
@click.option("--force", is_flag=True, help="Re-point an existing instance of the same name at this job.")
def install_cmd(job: str, name: str | None, trainsup_exe: str | None, env_pairs: tuple[str, ...],
                unit_dir: Path | None, start_now: bool, force: bool) -> None:
    """Write trainsup@NAME.service for JOB.toml and enable it (when systemd runs).

    \b
    Example:
      trainsup service install examples/gpt/job.toml --now
      loginctl enable-linger $USER
    """
    result = install_service(job, name=name, unit_dir=unit_dir, trainsup_exe=trainsup_exe,
                             env=_parse_env(env_pairs), start_now=start_now, force=force)
    click.echo(result.report())


@service.command("print")
@_job_arg
@_name_opt
@_exe_opt
@_env_opt
def print_cmd(job: str, name: str | None, trainsup_exe: str | None, env_pairs: tuple[str, ...]) -> None:
    """Print the unit files install would write, writing nothing.

    \b
    Example:
      trainsup service print examples/gpt/job.toml
    """
    plan = plan_service(job, name=name, trainsup_exe=trainsup_exe, env=_parse_env(env_pairs))
    click.echo(f"# {plan.template_path}\n{TEMPLATE}\n# {plan.dropin_path}\n{plan.dropin_text}", nl=False)
