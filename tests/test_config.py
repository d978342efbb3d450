"""job.toml parsing: every bad input is one line naming the key path and the fix."""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest

from supervisor import config as cfg
from supervisor.config import JobConfigError, load_job, parse_override
from train_core.retention import RetentionPolicy

REPO = Path(__file__).resolve().parents[1]


def write_job(tmp_path: Path, body: str, script: str = "train.py") -> Path:
    (tmp_path / script).write_text("print('hi')\n")
    job = tmp_path / "job.toml"
    job.write_text(textwrap.dedent(body))
    return job


MINIMAL = """
[train]
script = "train.py"
"""


def test_minimal_defaults(tmp_path):
    job = load_job(write_job(tmp_path, MINIMAL))
    assert job.train.script == tmp_path / "train.py"
    assert job.run_dir == tmp_path / "runs" / "job"
    assert job.retention == RetentionPolicy()
    assert job.restart.max_restarts == 10
    assert job.launch.launcher == "accelerate" and job.launch.num_processes is None
    assert job.stop.grace_s == 60.0


def test_full_example_validates():
    job = load_job(REPO / "examples" / "job.example.toml")
    assert job.run_dir == REPO / "examples" / "runs" / "example"
    assert job.launch.cpu is True and job.launch.num_processes == 1
    assert job.train.args == ("--steps", "50")
    assert job.train.env["OMP_NUM_THREADS"] == "2"


def test_relative_paths_resolve_against_job_dir(tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    sub.mkdir()
    job = write_job(sub, 'run_dir = "out"\n[train]\nscript = "train.py"\n')
    monkeypatch.chdir(tmp_path)
    loaded = load_job(Path("sub/job.toml"))
    assert loaded.run_dir == sub / "out"
    assert loaded.train.script == sub / "train.py"
    assert load_job(job, run_dir=tmp_path / "elsewhere").run_dir == tmp_path / "elsewhere"


def test_retention_section(tmp_path):
    job = load_job(write_job(tmp_path, MINIMAL + "[retention]\nkeep_last = 5\nbest_mode = \"max\"\nkeep_every = 100\n"))
    assert job.retention == RetentionPolicy(keep_last=5, best_mode="max", keep_every=100)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("[restart]\nmax_restart = 3\n", "job.toml: [restart] unknown key 'max_restart' (did you mean 'max_restarts'?)"),
        ("[restart]\nmax_restarts = -1\n", "job.toml: [restart] max_restarts must be >= 0 (0: never restart), got -1"),
        ("[restart]\nmax_restarts = \"5\"\n", "job.toml: [restart] max_restarts must be an integer (0: never restart), got a string '5'"),
        ("[restart]\njitter = 1.5\n", "job.toml: [restart] jitter must be <= 1.0 (a fraction of the delay), got 1.5"),
        ("[restart]\nbackoff_initial_s = 10\nbackoff_max_s = 5\n", "job.toml: [restart] backoff_max_s must be >= backoff_initial_s (10.0), got 5.0"),
        ("[stop]\ngrace_s = 0\n", "job.toml: [stop] grace_s must be > 0.0 (time for ranks to save), got 0"),
        ("[watch]\nhang_timeout_s = true\n", "job.toml: [watch] hang_timeout_s must be a number, got a boolean True"),
        ("[launch]\nmixed_precision = \"bf61\"\n", "job.toml: [launch] mixed_precision must be one of \"no\", \"fp16\", \"bf16\", \"fp8\", \"auto\" (\"auto\": bf16 only where the hardware has it natively), got 'bf61' (did you mean 'bf16'?)"),
        ("[launch]\nnum_processes = 0\n", "job.toml: [launch] num_processes must be >= 1 (ranks of all machines together), got 0"),
        ("[launch]\nconfig_file = \"nope.yaml\"\n", "[launch] config_file: file not found:"),
        ("[launch]\nlauncher = \"python\"\nnum_processes = 2\n", "job.toml: [launch] launcher = \"python\" runs one process"),
        ("[launch]\nnum_machines = 2\nnum_processes = 2\nmain_process_ip = \"10.0.0.1\"\n",
         "job.toml: [launch] main_process_port is required when num_machines > 1: every node must meet machine rank 0"),
        ("[launch]\nnum_machines = 2\nnum_processes = 3\nmain_process_ip = \"h\"\nmain_process_port = 29500\n",
         "job.toml: [launch] num_processes = 3 is the ranks of all machines together (accelerate's meaning): it must be "
         "a multiple of num_machines = 2"),
        ("[launch]\nnum_machines = 2\nmachine_rank = 2\n", "job.toml: [launch] machine_rank must be < num_machines (2), got 2"),
        ("[retention]\nkeep_last = 0\n", "job.toml: [retention] keep_last must be >= 1 (the newest checkpoint is always kept), got 0"),
        ("[retension]\nkeep_last = 2\n", "job.toml: unknown section [retension] (did you mean 'retention'?)"),
        ("rundir = \"x\"\n", "job.toml: unknown key 'rundir' (did you mean 'run_dir'?)"),
        ("[checkpoint]\ninterval_steps = 1.5\n", "job.toml: [checkpoint] interval_steps must be an integer (0: the script "
         'decides; "auto": chosen from the save cost and the failure history), got a number 1.5'),
        ("[checkpoint]\ninterval_steps = \"often\"\n", "job.toml: [checkpoint] interval_steps must be an integer"),
        ("[stop]\nbudget_s = -1\n", "job.toml: [stop] budget_s"),
        ("[checkpoint]\nbackground = 1\n", "job.toml: [checkpoint] background must be true or false"),
    ],
)
def test_bad_values_name_the_key(tmp_path, extra, message):
    # top-level keys must come before the first table header in TOML
    body = extra + MINIMAL if not extra.startswith("[") else MINIMAL + extra
    with pytest.raises(JobConfigError) as e:
        load_job(write_job(tmp_path, body))
    assert message in e.value.message
    assert "\n" not in e.value.message
    assert e.value.exit_code == 2


@pytest.mark.parametrize(
    "body, message",
    [
        ("[launch]\ncpu = true\n", "job.toml: missing section [train]"),
        ("[train]\nargs = []\n", "job.toml: [train] script is required"),
        ("[train]\nscirpt = \"train.py\"\n", "job.toml: [train] unknown key 'scirpt' (did you mean 'script'?)"),
        ("[trian]\nscript = \"train.py\"\n", "job.toml: unknown section [trian] (did you mean 'train'?)"),
        ("script = \"train.py\"\n[launch]\ncpu = true\n",
         "job.toml: missing section [train]: script is at the top level; put it under a [train] header"),
        ("[train]\nscript = \"missing.py\"\n", "job.toml: [train] script file not found:"),
        ("[train]\nscript = \"train.py\"\nargs = \"--lr 3\"\n", "[train] args must be an array of strings such as"),
        ("[train]\nscript = \"train.py\"\nenv = { A = [1] }\n", "job.toml: [train] env.A must be a string, got an array [1]"),
        ("[train\n", "job.toml: invalid TOML:"),
    ],
)
def test_train_section_errors(tmp_path, body, message):
    with pytest.raises(JobConfigError) as e:
        load_job(write_job(tmp_path, body))
    assert message in e.value.message


def test_misspelt_required_key_is_not_reported_as_missing(tmp_path):
    with pytest.raises(JobConfigError) as e:
        load_job(write_job(tmp_path, "[train]\nscirpt = \"train.py\"\n"))
    assert e.value.message == ("job.toml: [train] unknown key 'scirpt' (did you mean 'script'?); "
                               "known keys: args, env, script")
    assert "required" not in e.value.message and e.value.exit_code == 2


SIGNAL_CHOICES = '"SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT", "SIGTERM"'


@pytest.mark.parametrize(
    "value, message",
    [
        ('"SIGFOO"', f"job.toml: [train] env.TRAINSUP_SAVE_SIGNAL must be one of {SIGNAL_CHOICES}, "
                     "got 'SIGFOO': not a signal name"),
        ('"USR3"', "got 'USR3': not a signal name (did you mean 'SIGUSR2'?)"),
        ('"SIGKILL"', "got 'SIGKILL': SIGKILL cannot be caught, so a rank could not save on it"),
        ('"9"', "got '9' (SIGKILL): SIGKILL cannot be caught"),
        ('"STOP"', "got 'STOP' (SIGSTOP): SIGSTOP cannot be caught"),
        ('"SIGCHLD"', "got 'SIGCHLD': SIGCHLD is also sent by the kernel, a terminal or a library"),
        ('""', "got '': not a signal name"),
    ],
)
def test_bad_save_signal_is_refused(tmp_path, value, message):
    body = MINIMAL + f"env = {{ TRAINSUP_SAVE_SIGNAL = {value} }}\n"
    with pytest.raises(JobConfigError) as e:
        load_job(write_job(tmp_path, body))
    assert message in e.value.message
    assert "[train] env.TRAINSUP_SAVE_SIGNAL" in e.value.message
    assert "\n" not in e.value.message and e.value.exit_code == 2


@pytest.mark.parametrize("value, name, number", [
    ('"USR2"', "SIGUSR2", signal.SIGUSR2), ('"sigusr2"', "SIGUSR2", signal.SIGUSR2),
    ("12", "SIGUSR2", signal.SIGUSR2), ('"SIGTERM"', "SIGTERM", signal.SIGTERM), ('" HUP "', "SIGHUP", signal.SIGHUP),
])
def test_save_signal_is_normalised(tmp_path, monkeypatch, value, name, number):
    monkeypatch.setenv("TRAINSUP_SAVE_SIGNAL", "SIGFOO")  # [train] env wins over the environment
    job = load_job(write_job(tmp_path, MINIMAL + f"env = {{ TRAINSUP_SAVE_SIGNAL = {value}, A = \"1\" }}\n"))
    assert dict(job.train.env) == {"TRAINSUP_SAVE_SIGNAL": name, "A": "1"}
    assert cfg.save_signal_of(job) == number
    # --set reaches the same check
    job = load_job(write_job(tmp_path, MINIMAL), [f"train.env.TRAINSUP_SAVE_SIGNAL={value}"])
    assert job.train.env["TRAINSUP_SAVE_SIGNAL"] == name
    with pytest.raises(JobConfigError, match="TRAINSUP_SAVE_SIGNAL must be one of"):
        load_job(write_job(tmp_path, MINIMAL), ["train.env.TRAINSUP_SAVE_SIGNAL=KILL"])


def test_save_signal_of_falls_back_to_the_environment(tmp_path, monkeypatch):
    job = load_job(write_job(tmp_path, MINIMAL))
    monkeypatch.delenv("TRAINSUP_SAVE_SIGNAL", raising=False)
    assert cfg.save_signal_of(job) == signal.SIGUSR1
    monkeypatch.setenv("TRAINSUP_SAVE_SIGNAL", "")  # empty = unset, as in the ranks
    assert cfg.save_signal_of(job) == signal.SIGUSR1
    monkeypatch.setenv("TRAINSUP_SAVE_SIGNAL", "usr2")
    assert cfg.save_signal_of(job) == signal.SIGUSR2
    monkeypatch.setenv("TRAINSUP_SAVE_SIGNAL", "SIGUSR9")
    with pytest.raises(JobConfigError) as e:
        cfg.save_signal_of(job)
    assert e.value.message.startswith("TRAINSUP_SAVE_SIGNAL in the environment must be one of")
    assert "got 'SIGUSR9': not a signal name" in e.value.message and e.value.exit_code == 2
    monkeypatch.setenv("TRAINSUP_SAVE_SIGNAL", "SIGKILL")
    with pytest.raises(JobConfigError, match="SIGKILL cannot be caught"):
        cfg.save_signal_of(job)


RUN_DIR_FIX = "use a dedicated directory such as runs/NAME"


def test_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    job = write_job(tmp_path, 'run_dir = "afile"\n' + MINIMAL)
    with pytest.raises(JobConfigError) as e:
        load_job(job)
    assert e.value.message == f"job.toml: run_dir {tmp_path / 'afile'} is a file, not a directory; {RUN_DIR_FIX}"
    assert e.value.exit_code == 2
    with pytest.raises(JobConfigError, match=f"run_dir {tmp_path / 'afile' / 'x'} is inside {tmp_path / 'afile'}, "
                                             "which is a file"):
        load_job(job, ["run_dir='afile/x'"])
    with pytest.raises(JobConfigError) as e:
        load_job(write_job(tmp_path, MINIMAL), run_dir=tmp_path / "afile")
    assert e.value.message == f"job.toml: --run-dir {tmp_path / 'afile'} is a file, not a directory; {RUN_DIR_FIX}"
    with pytest.raises(JobConfigError, match=f"--run-dir /dev/null is not a directory; {RUN_DIR_FIX}"):
        load_job(write_job(tmp_path, MINIMAL), run_dir="/dev/null")


@pytest.mark.parametrize("where", ["job", "--run-dir"])
def test_root_and_home_run_dirs_are_refused(tmp_path, monkeypatch, where):
    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    key = "run_dir" if where == "job" else "--run-dir"

    def load(value):
        if where == "job":
            return load_job(write_job(tmp_path, f"run_dir = {str(value)!r}\n" + MINIMAL))
        return load_job(write_job(tmp_path, MINIMAL), run_dir=value)

    for value in ("/", "/.."):
        with pytest.raises(JobConfigError) as e:
            load(value)
        assert e.value.message == (f"job.toml: {key} / is the root directory; a run dir is made private "
                                   f"(mode 0700) and pruned: {RUN_DIR_FIX}")
    for value in (str(home), "~", str(home) + "/"):
        with pytest.raises(JobConfigError) as e:
            load(value)
        assert e.value.message == (f"job.toml: {key} {home} is your home directory; a run dir is made private "
                                   f"(mode 0700) and pruned: {RUN_DIR_FIX}")
    with pytest.raises(JobConfigError, match=f"{key} {tmp_path / 'home'} contains your home directory {home}"):
        load(tmp_path / "home")
    assert load(home / "runs" / "gpt").run_dir == home / "runs" / "gpt"  # below home is fine
    assert load("~/runs/gpt").run_dir == home / "runs" / "gpt"


def test_missing_job_file(tmp_path):
    with pytest.raises(JobConfigError, match="no such job file"):
        load_job(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "text, parts, value",
    [
        ("restart.max_restarts=5", ("restart", "max_restarts"), 5),
        ("stop.grace_s=2.5", ("stop", "grace_s"), 2.5),
        ("launch.cpu=true", ("launch", "cpu"), True),
        ('train.args=["--lr", "3e-4"]', ("train", "args"), ["--lr", "3e-4"]),
        ("train.script=other.py", ("train", "script"), "other.py"),
        ("train.env.FOO=bar baz", ("train", "env", "FOO"), "bar baz"),
        ('run_dir="/tmp/x"', ("run_dir",), "/tmp/x"),
    ],
)
def test_parse_override(text, parts, value):
    assert parse_override(text) == (parts, value)


def test_overrides_apply_and_are_validated(tmp_path):
    job = write_job(tmp_path, MINIMAL + "[restart]\nmax_restarts = 1\n")
    loaded = load_job(job, ["restart.max_restarts=7", "stop.grace_s=3", "train.env.X=1"])
    assert loaded.restart.max_restarts == 7 and loaded.stop.grace_s == 3.0 and loaded.train.env["X"] == "1"
    with pytest.raises(JobConfigError, match=r"\[stop\] unknown key 'grace' \(did you mean 'grace_s'\?\)"):
        load_job(job, ["stop.grace=3"])
    with pytest.raises(JobConfigError, match="expected section.key=value"):
        load_job(job, ["stop.grace_s"])
    with pytest.raises(JobConfigError, match="restart.max_restarts is a value, not a section"):
        load_job(job, ["restart.max_restarts.x=1"])


def test_section_parsers_registry(tmp_path, monkeypatch):
    def parse_gpu(d):  # a section parser reads its table through config.Section, like the built-in ones
        s = cfg.Section("[gpu]", d)
        s.int("max_temp_c", 80, high=100)
        s.done()
        return ("gpu", dict(d))

    monkeypatch.setitem(cfg.SECTION_PARSERS, "gpu", parse_gpu)
    job = write_job(tmp_path, MINIMAL + "[gpu]\nmax_temp_c = 85\n")
    assert load_job(job).sections["gpu"] == ("gpu", {"max_temp_c": 85})
    assert load_job(write_job(tmp_path, MINIMAL)).sections["gpu"] == ("gpu", {})
    with pytest.raises(JobConfigError, match=r"job.toml: \[gpu\] max_temp_c must be <= 100, got 120"):
        load_job(job, ["gpu.max_temp_c=120"])
    with pytest.raises(JobConfigError, match=r"unknown section \[gpus\] \(did you mean 'gpu'\?\)"):
        load_job(write_job(tmp_path, MINIMAL + "[gpus]\nx = 1\n"))


def test_config_is_frozen(tmp_path):
    job = load_job(write_job(tmp_path, MINIMAL))
    with pytest.raises(Exception):
        job.run_dir = tmp_path  # type: ignore[misc]
    with pytest.raises(TypeError):
        job.train.env["X"] = "1"  # type: ignore[index]
