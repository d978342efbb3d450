"""job.toml -> frozen dataclasses. The ONE module of trainsup that reads TOML.

Every problem is one line that names the key path and the fix, e.g.
`job.toml: [restart] max_restarts must be >= 0 (0: never restart), got -1`, raised as
`JobConfigError` (a click exception: exit 2 from any command). Every table is read by `Section`.

Relative paths (script, run_dir, config_file) resolve against the job file's directory,
so a job runs the same from any working directory.

`--set section.key=value` overrides: the value is parsed as a TOML value
(`--set restart.max_restarts=5`, `--set 'train.args=["--lr", "3e-4"]'`); when it does not
parse as TOML it is taken as a plain string (`--set train.script=other.py`).

Sections other than the ones below are parsed by `SECTION_PARSERS` (name -> callable taking
the section's dict and returning a frozen config; it reads the dict through `Section`, so its
errors are JobConfigErrors like the rest). supervisor.watch.registry registers [gpu], [power],
[logind]; their results are in `JobConfig.sections[name]` (the parser gets {} for an absent section).
"""

from __future__ import annotations

import difflib
import math
import os
import signal
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NoReturn

from supervisor.watch import registry as extensions
from supervisor import rundir
from supervisor.errors import UserError
from train_core.checkpoint import MIXED_PRECISIONS
from train_core.retention import RetentionError, RetentionPolicy
from train_core.runfiles import ENV_SAVE_SIGNAL, RunPaths
from train_core.signals import DEFAULT_SAVE_SIGNAL, parse_signal


class JobConfigError(UserError):
    """A bad job.toml or --set override: one line naming the key path and the fix (exit 2)."""


SECTION_PARSERS: dict[str, Callable[[Mapping[str, Any]], Any]] = dict(extensions.SECTIONS)

# "auto": bf16 where the hardware has it natively, fp16 on older CUDA GPUs, else "no"; a run dir
# with checkpoints keeps theirs (supervisor/precision.py, resolved when `trainsup run` starts)
MIXED_PRECISION = (*MIXED_PRECISIONS, "auto")
LAUNCHERS = ("accelerate", "python")

# The signals TRAINSUP_SAVE_SIGNAL may name: ones nothing but a person or the supervisor sends.
# SIGTERM and SIGINT are allowed: ranks already take them as stop requests
# (train_core.signals.stop_signals), so naming one only merges "save" into "stop", and a rank
# that handles them never dies of the save request. Everything else is refused: SIGKILL and
# SIGSTOP cannot be caught; the others are also sent by the kernel, a terminal or a library
# (SIGCHLD when a DataLoader worker exits, SIGSEGV on a crash, SIGALRM for timers, ...).
SAVE_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT", "SIGTERM")


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class TrainConfig:
    script: Path  # absolute
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class LaunchConfig:
    # "accelerate": `python -m accelerate.commands.launch ... script` (the product);
    # "python": run the script directly as a single process (debugging, fast tests).
    launcher: str = "accelerate"
    num_processes: int | None = None  # None: 1, or what config_file says
    mixed_precision: str | None = None  # None: "no", or what config_file says; "auto": supervisor/precision.py
    cpu: bool = False
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None  # None: a free port per attempt (single machine)
    config_file: Path | None = None  # an `accelerate config` YAML, absolute
    extra_args: tuple[str, ...] = ()  # passed to accelerate launch before the script
    direct: bool = True  # one rank, no config_file/extra_args: start it without the launcher (runner/launch.py)
    join_timeout_s: float = 300.0  # several machines: how long a node waits at start for the others (runner/nodes.py)


@dataclass(frozen=True)
class CheckpointConfig:
    interval_steps: int | str = 0  # passed to ranks as TRAINSUP_CHECKPOINT_INTERVAL_STEPS; 0 = script decides;
    # "auto": chosen by the ranks from the save cost and the failure history (train_core/interval.py)
    expected_mtbf_s: float = 3600.0  # "auto"'s prior: one unannounced failure (crash, OOM, hang, kill) this often
    min_interval_steps: int = 1  # "auto"'s floor
    max_interval_s: float = 1800.0  # "auto"'s ceiling: never more than this much work at risk
    interval_s: float = 0.0  # the supervisor asks for a save (control.json save_seq) this often; 0 = off
    background: bool | None = None  # periodic saves written in the background; None: the script decides (yes)


@dataclass(frozen=True)
class RestartConfig:
    max_restarts: int = 10  # restarts allowed within window_s
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    backoff_multiplier: float = 2.0
    jitter: float = 0.1  # fraction: each delay is scaled by a random factor in [1-jitter, 1+jitter]
    window_s: float = 0.0  # restarts older than this are forgotten; 0 = count over the whole run
    no_progress_limit: int = 3  # give up after this many consecutive attempts without progress; 0 = off
    standby: bool = True  # a restart inside the run reuses a rank that imported torch meanwhile (runner/procs.py)


@dataclass(frozen=True)
class StopConfig:
    grace_s: float = 60.0  # from the save request until ranks are SIGTERMed
    kill_after_s: float = 10.0  # from SIGTERM to the rank groups until SIGKILL
    # what a stop really has when the platform gives less than grace_s (Slurm's --signal lead, a
    # spot VM's notice); 0: grace_s. No stop starts a save that cannot finish within it.
    budget_s: float = 0.0


@dataclass(frozen=True)
class SlurmConfig:
    # after a stop on Slurm's warning signal (SIGUSR1) saved a checkpoint, `scontrol requeue`
    # the job: it resumes when Slurm starts it again (supervisor/slurm.py)
    requeue: bool = False


@dataclass(frozen=True)
class WatchConfig:
    hang_timeout_s: float = 300.0  # no heartbeat (status.json) this long while running = hung
    startup_timeout_s: float = 600.0  # from launch until the first heartbeat of an attempt
    poll_interval_s: float = 0.5  # main-loop tick


@dataclass(frozen=True)
class JobConfig:
    job_file: Path | None
    run_dir: Path
    train: TrainConfig
    launch: LaunchConfig = LaunchConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    retention: RetentionPolicy = RetentionPolicy()
    restart: RestartConfig = RestartConfig()
    stop: StopConfig = StopConfig()
    watch: WatchConfig = WatchConfig()
    slurm: SlurmConfig = SlurmConfig()
    sections: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # A run dir deliberately shared with the group (a cluster project dir): group members may
    # write it and own files in it. Off: anything writable by others is refused (exit 2).
    group_shared: bool = False

    @property
    def node(self) -> int | None:
        """This node's machine rank when the job runs on several machines (its files: RunPaths.node)."""
        return self.launch.machine_rank if self.launch.num_machines > 1 else None

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.run_dir, node=self.node)


def save_signal_of(job: JobConfig) -> int:
    """The signal the supervisor sends a job's ranks to ask for a save (TRAINSUP_SAVE_SIGNAL).

    [train] env first (load_job checked and normalised it), else the supervisor's own
    environment (what build_launch passes on), else SIGUSR1. A bad name in the environment
    raises JobConfigError (exit 2) rather than falling back to SIGUSR1, which would kill a rank
    that handles another signal.
    """
    name = job.train.env.get(ENV_SAVE_SIGNAL)
    if name is not None:
        return int(check_save_signal(name, f"[train] env.{ENV_SAVE_SIGNAL}"))
    name = os.environ.get(ENV_SAVE_SIGNAL) or DEFAULT_SAVE_SIGNAL  # empty = unset, as in the ranks
    return int(check_save_signal(name, f"{ENV_SAVE_SIGNAL} in the environment"))


def check_save_signal(value: str, where: str) -> signal.Signals:
    """'USR2', 'sigusr2' or '12' -> signal.SIGUSR2; JobConfigError naming `where` otherwise."""
    opts = ", ".join(f'"{c}"' for c in SAVE_SIGNALS)
    try:
        sig = parse_signal(value)
    except ValueError:
        sig = None
    if sig is None:
        guess = value.strip().upper()
        guess = guess if guess.startswith("SIG") else "SIG" + guess
        raise JobConfigError(f"{where} must be one of {opts}, got {value!r}: not a signal name"
                             f"{_did_you_mean(guess, SAVE_SIGNALS)}")
    if sig.name not in SAVE_SIGNALS:
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            why = f"{sig.name} cannot be caught, so a rank could not save on it"
        else:
            why = f"{sig.name} is also sent by the kernel, a terminal or a library, so ranks would save unasked"
        got = repr(value) if value.strip() == sig.name else f"{value!r} ({sig.name})"
        raise JobConfigError(f"{where} must be one of {opts}, got {got}: {why}")
    return sig


def _check_run_dir(run_dir: Path, where: str) -> None:
    problem = rundir.run_dir_path_problem(run_dir)
    if problem:
        raise JobConfigError(f"{where} {problem}")


# --------------------------------------------------------------------------- reading tables

_MISSING = object()


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


class Section:
    """Typed reads of one job.toml table, with range checks; `done()` rejects the keys nobody
    asked for. Every section is read through it, the watchers' [gpu], [power], [logind] too:
    every problem is a JobConfigError `[section] key` + what was wrong + the fix."""

    def __init__(self, where: str, data: Any, base_dir: Path | None = None) -> None:
        self.where = where  # "[restart]", or "" for the top level
        if not isinstance(data, Mapping):
            self.fail(f"must be a table ([{where.strip('[]')}] header), got {_type_name(data)}", key=None)
        self.data = data
        self.base_dir = base_dir  # where a relative path() starts (None: the working directory)
        self.seen: set[str] = set()

    def fail(self, msg: str, key: str | None) -> NoReturn:
        path = " ".join(p for p in (self.where, key) if p)
        raise JobConfigError(f"{path} {msg}" if path else msg)

    def _get(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key, _MISSING)

    def int(self, key: str, default: Any, *, low: int | None = None, high: int | None = None, hint: str = "") -> Any:
        v = self._get(key)
        if v is _MISSING:
            return default
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(f"must be an integer{hint}, got {_type_name(v)} {v!r}", key)
        self._range(key, v, low, high, hint)
        return v

    def float(self, key: str, default: Any, *, low: float | None = None, high: float | None = None,
              hint: str = "", low_open: bool = False) -> Any:
        v = self._get(key)
        if v is _MISSING:
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            self.fail(f"must be a number{hint}, got {_type_name(v)} {v!r}", key)
        if not math.isfinite(v):
            self.fail(f"must be a finite number{hint}, got {v!r}", key)
        if low_open and low is not None and v <= low:
            self.fail(f"must be > {low}{hint}, got {v!r}", key)
        self._range(key, v, None if low_open else low, high, hint)
        return float(v)

    def _range(self, key: str, v: Any, low: Any, high: Any, hint: str) -> None:
        if low is not None and v < low:
            self.fail(f"must be >= {low}{hint}, got {v!r}", key)
        if high is not None and v > high:
            self.fail(f"must be <= {high}{hint}, got {v!r}", key)

    def bool(self, key: str, default: Any) -> Any:
        v = self._get(key)
        if v is _MISSING:
            return default
        if not isinstance(v, bool):
            self.fail(f"must be true or false, got {_type_name(v)} {v!r}", key)
        return v

    def str(self, key: str, default: Any, *, choices: tuple[str, ...] | None = None, nonempty: bool = False,
            hint: str = "") -> Any:
        v = self._get(key)
        if v is _MISSING:
            return default
        opts = ", ".join(f'"{c}"' for c in choices or ())
        if not isinstance(v, str):
            self.fail(f"must be {f'one of {opts}' if choices else 'a string'}{hint}, got {_type_name(v)} {v!r}", key)
        if nonempty and not v:
            self.fail(f"must not be empty{hint}", key)
        if choices is not None and v not in choices:
            self.fail(f"must be one of {opts}{hint}, got {v!r}{_did_you_mean(v, choices)}", key)
        return v

    def str_list(self, key: str, default: tuple[str, ...] = (), *, choices: Iterable[str] | None = None,
                 example: str = '["--lr", "3e-4"]') -> tuple[str, ...]:
        v = self._get(key)
        if v is _MISSING:
            return default
        if isinstance(v, str):
            self.fail(f"must be an array of strings such as {example}, got the string {v!r}", key)
        if not isinstance(v, list):
            self.fail(f"must be an array of strings, got {_type_name(v)} {v!r}", key)
        known = sorted(choices) if choices is not None else None
        for i, item in enumerate(v):
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                self.fail(f"[{i}] must be a string (or number), got {_type_name(item)} {item!r}", key)
            if known is not None and str(item) not in known:
                self.fail(f"has unknown entry {item!r}{_did_you_mean(str(item), known)}; known: {', '.join(known)}",
                          key)
        return tuple(str(item) for item in v)

    def path(self, key: str, default: Any) -> Any:
        v = self.str(key, _MISSING, nonempty=True)
        if v is _MISSING:
            return default
        p = Path(os.path.expanduser(v))
        return Path(os.path.normpath(p if p.is_absolute() else (self.base_dir or Path.cwd()) / p))

    def table(self, key: str) -> dict[str, Any]:
        v = self._get(key)
        if v is _MISSING:
            return {}
        if not isinstance(v, dict):
            self.fail(f"must be a table such as {{ KEY = \"value\" }}, got {_type_name(v)} {v!r}", key)
        return v

    def section(self, name: str) -> "Section":
        """The table `name` of this one (a job file's [name] section), read the same way."""
        return Section(f"[{name}]", self.table(name), self.base_dir)

    def done(self) -> None:
        for key in self.data:
            if key not in self.seen:
                self.fail(f"unknown key {key!r}{_did_you_mean(key, self.seen)}; "
                          f"known keys: {', '.join(sorted(self.seen))}", key=None)


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`section.key=value` -> (("section", "key"), value); value parsed as TOML when it can be."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise JobConfigError(f"--set {text!r}: expected section.key=value, e.g. --set restart.max_restarts=5")
    parts = tuple(p.strip() for p in key.split("."))
    if any(not p for p in parts):
        raise JobConfigError(f"--set {text!r}: empty name in key path {key!r}; write it as section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: take it as a string (--set train.script=other.py)
    return parts, value


def apply_overrides(doc: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = doc
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise JobConfigError(f"--set {text!r}: {where} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return doc


# --------------------------------------------------------------------------- loading


def load_job(path: str | os.PathLike, overrides: Iterable[str] = (), *, run_dir: str | os.PathLike | None = None,
             check_script: bool = True) -> JobConfig:
    """Read and validate a job file; raises JobConfigError (exit 2) naming the key path."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise JobConfigError(f"{path}: no such job file; pass the path to a job.toml "
                             "(see examples/job.example.toml)") from None
    except IsADirectoryError:
        raise JobConfigError(f"{path} is a directory; pass the path to a job.toml file") from None
    except OSError as e:
        raise JobConfigError(f"{path}: cannot read the job file: {e.strerror or e}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise JobConfigError(f"{path}: not UTF-8 text; save the job file as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise JobConfigError(f"{path}: invalid TOML: {e}") from None
    doc = apply_overrides(doc, overrides)
    try:
        return parse_job(doc, base_dir=path.resolve().parent, job_file=path.resolve(),
                         run_dir=run_dir, check_script=check_script)
    except JobConfigError as e:
        raise JobConfigError(f"{path.name}: {e.message}") from None


def parse_job(doc: Mapping[str, Any], *, base_dir: Path, job_file: Path | None = None,
              run_dir: str | os.PathLike | None = None, check_script: bool = True) -> JobConfig:
    top = Section("", dict(doc), base_dir)
    known_sections = ("train", "launch", "checkpoint", "retention", "restart", "stop", "watch", "slurm",
                      *SECTION_PARSERS)
    for key, value in doc.items():
        if isinstance(value, dict) and key not in known_sections:
            raise JobConfigError(f"unknown section [{key}]{_did_you_mean(key, known_sections)}; "
                                 f"known sections: {', '.join(f'[{s}]' for s in known_sections)}")
    resolved_run_dir = _read_run_dir(top, base_dir / "runs" / (job_file.stem if job_file else "job"), run_dir)
    if "train" not in doc:
        if "script" in doc:
            raise JobConfigError("missing section [train]: script is at the top level; "
                                 "put it under a [train] header")
        raise JobConfigError("missing section [train]; add [train] with script = \"train.py\"")
    train = _read_train(top.section("train"), check_script)
    launch = _read_launch(top.section("launch"))
    c = top.section("checkpoint")
    checkpoint = CheckpointConfig(
        interval_steps=_interval_steps(c),
        expected_mtbf_s=c.float("expected_mtbf_s", CheckpointConfig.expected_mtbf_s, low=0.0, low_open=True),
        min_interval_steps=c.int("min_interval_steps", CheckpointConfig.min_interval_steps, low=1),
        max_interval_s=c.float("max_interval_s", CheckpointConfig.max_interval_s, low=0.0, low_open=True),
        interval_s=c.float("interval_s", 0.0, low=0.0, hint=" (0 turns it off)"),
        background=c.bool("background", None),
    )
    c.done()
    retention = _read_retention(top.section("retention"))
    restart = _read_restart(top.section("restart"))
    s = top.section("stop")
    stop = StopConfig(
        grace_s=s.float("grace_s", StopConfig.grace_s, low=0.0, low_open=True, hint=" (time for ranks to save)"),
        kill_after_s=s.float("kill_after_s", StopConfig.kill_after_s, low=0.0),
        budget_s=s.float("budget_s", StopConfig.budget_s, low=0.0, hint=" (0: grace_s)"),
    )
    s.done()
    w = top.section("watch")
    watch = WatchConfig(
        hang_timeout_s=w.float("hang_timeout_s", WatchConfig.hang_timeout_s, low=0.0, low_open=True),
        startup_timeout_s=w.float("startup_timeout_s", WatchConfig.startup_timeout_s, low=0.0, low_open=True),
        poll_interval_s=w.float("poll_interval_s", WatchConfig.poll_interval_s, low=0.01, high=10.0),
    )
    w.done()
    sl = top.section("slurm")
    slurm = SlurmConfig(requeue=sl.bool("requeue", False))
    sl.done()
    sections = {name: parser(top.table(name)) for name, parser in SECTION_PARSERS.items()}
    group_shared = top.bool("group_shared", False)
    top.done()
    return JobConfig(job_file=job_file, run_dir=resolved_run_dir, train=train, launch=launch,
                     checkpoint=checkpoint, retention=retention, restart=restart, stop=stop, watch=watch,
                     slurm=slurm, sections=MappingProxyType(sections), group_shared=group_shared)


def _read_run_dir(top: Section, default: Path, run_dir: str | os.PathLike | None) -> Path:
    """--run-dir, else the job's run_dir, else `default`; checked either way."""
    from_job = Path(top.path("run_dir", default))
    if run_dir is None:
        _check_run_dir(from_job, "run_dir")
        return from_job
    chosen = Path(os.path.normpath(Path(run_dir).expanduser().absolute()))
    _check_run_dir(chosen, "--run-dir")
    return chosen


def _read_train(t: Section, check_script: bool) -> TrainConfig:
    script = t.path("script", None)
    args = t.str_list("args")
    env = t.table("env")
    t.done()  # before "script is required": `scirpt = ...` is reported as a misspelling
    if script is None:
        t.fail('is required: the training script to run, e.g. script = "train.py"', "script")
    if check_script and not script.is_file():
        t.fail(f"file not found: {script} (relative paths start at the job file's directory {t.base_dir})", "script")
    env_str: dict[str, str] = {}
    for k, v in env.items():
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            t.fail(f"must be a string, got {_type_name(v)} {v!r}", f"env.{k}")
        env_str[k] = str(v)
    if ENV_SAVE_SIGNAL in env_str:  # launch passes the canonical name ("USR2" -> "SIGUSR2")
        env_str[ENV_SAVE_SIGNAL] = check_save_signal(env_str[ENV_SAVE_SIGNAL], f"[train] env.{ENV_SAVE_SIGNAL}").name
    return TrainConfig(script=script, args=args, env=MappingProxyType(env_str))


def _read_launch(s: Section) -> LaunchConfig:
    launch = LaunchConfig(
        launcher=s.str("launcher", "accelerate", choices=LAUNCHERS),
        num_processes=s.int("num_processes", None, low=1, hint=" (ranks of all machines together)"),
        mixed_precision=s.str("mixed_precision", None, choices=MIXED_PRECISION,
                              hint=' ("auto": bf16 only where the hardware has it natively)'),
        cpu=s.bool("cpu", False),
        num_machines=s.int("num_machines", 1, low=1),
        machine_rank=s.int("machine_rank", 0, low=0),
        main_process_ip=s.str("main_process_ip", None),
        main_process_port=s.int("main_process_port", None, low=1, high=65535),
        config_file=s.path("config_file", None),
        extra_args=s.str_list("extra_args"),
        direct=s.bool("direct", True),
        join_timeout_s=s.float("join_timeout_s", 300.0, low=1.0),
    )
    s.done()
    if launch.machine_rank >= launch.num_machines:
        s.fail(f"must be < num_machines ({launch.num_machines}), got {launch.machine_rank}", "machine_rank")
    if launch.num_machines > 1:
        if launch.launcher != "accelerate":
            s.fail('must be "accelerate" for num_machines > 1 (its rendezvous joins the machines)', "launcher")
        for key in ("main_process_ip", "main_process_port"):
            if getattr(launch, key) is None:
                s.fail(f"is required when num_machines > 1: every node must meet machine rank 0 at the same "
                       f"address (its IP or host name, and a free TCP port the same on every node)", key)
        if launch.num_processes is not None and launch.num_processes % launch.num_machines:
            s.fail(f"= {launch.num_processes} is the ranks of all machines together (accelerate's meaning): it must "
                   f"be a multiple of num_machines = {launch.num_machines}", "num_processes")
    if launch.config_file is not None and not launch.config_file.is_file():
        raise JobConfigError(f"[launch] config_file: file not found: {launch.config_file} "
                             "(write one with `accelerate config --config_file PATH`)")
    if launch.launcher == "python" and (launch.num_processes or 1) > 1:
        s.fail(f'= "python" runs one process; use launcher = "accelerate" for num_processes = {launch.num_processes}',
               "launcher")
    return launch


def _interval_steps(c: Any) -> int | str:
    if c._get("interval_steps") == "auto":
        return "auto"
    return c.int("interval_steps", 0, low=0, hint=' (0: the script decides; "auto": chosen from the save cost '
                                              'and the failure history)')


def _read_retention(s: Section) -> RetentionPolicy:
    d = RetentionPolicy()
    kwargs = dict(
        keep_last=s.int("keep_last", d.keep_last, low=1, hint=" (the newest checkpoint is always kept)"),
        keep_best=s.int("keep_best", d.keep_best, low=0, hint=" (0 turns it off)"),
        best_metric=s.str("best_metric", d.best_metric),
        best_mode=s.str("best_mode", d.best_mode, choices=("min", "max")),
        keep_every=s.int("keep_every", d.keep_every, low=0, hint=" (0 turns it off)"),
        keep_final=s.bool("keep_final", d.keep_final),
    )
    s.done()
    try:
        return RetentionPolicy(**kwargs)
    except RetentionError as e:
        raise JobConfigError(str(e)) from None


def _read_restart(s: Section) -> RestartConfig:
    d = RestartConfig
    restart = RestartConfig(
        max_restarts=s.int("max_restarts", d.max_restarts, low=0, hint=" (0: never restart)"),
        backoff_initial_s=s.float("backoff_initial_s", d.backoff_initial_s, low=0.0),
        backoff_max_s=s.float("backoff_max_s", d.backoff_max_s, low=0.0),
        backoff_multiplier=s.float("backoff_multiplier", d.backoff_multiplier, low=1.0),
        jitter=s.float("jitter", d.jitter, low=0.0, high=1.0, hint=" (a fraction of the delay)"),
        window_s=s.float("window_s", d.window_s, low=0.0, hint=" (0: the whole run)"),
        no_progress_limit=s.int("no_progress_limit", d.no_progress_limit, low=0, hint=" (0 turns it off)"),
        standby=s.bool("standby", d.standby),
    )
    s.done()
    if restart.backoff_max_s < restart.backoff_initial_s:
        s.fail(f"must be >= backoff_initial_s ({restart.backoff_initial_s}), got {restart.backoff_max_s}",
               "backoff_max_s")
    return restart
