"""`trainsup checkpoints list|verify|prune`: exact output, exit codes, --json, bad input."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from pathlib import Path

import blake3
import pytest
from click.testing import CliRunner
from torchfile import torch_like

import supervisor.cli.checkpoints as cli_checkpoints
from supervisor.cli import main
from supervisor.cli.common import resolve_run_dir
from supervisor.errors import UserError
from train_core.store import FORMAT_VERSION, CheckpointStore

ROOT = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
NOW = T0 + dt.timedelta(hours=12)

# step -> (epoch, batch_in_epoch, reason, metrics, payload bytes); created at T0 + step minutes
LAYOUT = {
    100: (0, 99, "interval", {"val_loss": 3.0}, 1000),
    200: (0, 199, "best", {"val_loss": 2.0, "acc": 0.51234}, 2000),
    300: (1, 49, "interval", {"val_loss": 2.5}, 3000),
    400: (1, 149, "interval", {"val_loss": 1.0}, 4000),  # made invalid below: the best loss, but broken
    500: (1, 249, "preempt", {}, 5000),
}


def make_run(run_dir: Path, layout=LAYOUT) -> CheckpointStore:
    store = CheckpointStore(run_dir / "checkpoints")
    for step, (epoch, batch, reason, metrics, size) in layout.items():
        tmp = store.begin(step)
        (tmp / "model.safetensors").write_bytes(b"m" * (size // 3))
        (tmp / "optimizer.bin").write_bytes(torch_like(max(size - size // 3, 400)))  # an archive needs ~260 B
        c = store.commit(tmp, step, epoch=epoch, batch_in_epoch=batch, reason=reason, metrics=metrics)
        m = json.loads((c.path / "manifest.json").read_text())
        m["created_at"] = (T0 + dt.timedelta(minutes=step)).isoformat(timespec="milliseconds")
        (c.path / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True))
    return store


def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` with a hash of its bytes (symlinks by target): 'nothing changed' checks."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture(autouse=True)
def frozen_now(monkeypatch):
    monkeypatch.setattr(cli_checkpoints, "_now", lambda: NOW.timestamp())


@pytest.fixture
def run(tmp_path) -> Path:
    run_dir = tmp_path / "run"
    make_run(run_dir)
    (run_dir / "checkpoints" / "step-00000400" / "optimizer.bin").unlink()
    return run_dir


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# --------------------------------------------------------------------------- list


def test_list_table(run):
    r = invoke("checkpoints", "list", str(run))
    assert r.exit_code == 0, r.output
    assert r.output == textwrap.dedent("""\
        STEP  EPOCH  BATCH  REASON    METRICS                   SIZE     AGE  STATUS
         100      0     99  interval  val_loss=3             1.5 KiB  10h20m  ok
         200      0    199  best      acc=0.5123 val_loss=2  2.4 KiB   8h40m  ok
         300      1     49  interval  val_loss=2.5           3.4 KiB   7h00m  ok
         400      1    149  interval  val_loss=1             4.4 KiB   5h20m  INVALID: missing file: optimizer.bin
         500      1    249  preempt   -                      5.3 KiB   3h40m  ok
        5 checkpoints: 4 valid, 1 invalid; resume from step 500 (quick check; `verify` compares every file's hash)
        """)


def test_list_json_schema(run):
    r = invoke("checkpoints", "list", str(run), "--json")
    assert r.exit_code == 0
    doc = json.loads(r.output)
    assert set(doc) == {"run_dir", "checkpoints_dir", "full_check", "count", "valid", "invalid",
                        "newest_valid_step", "uncommitted", "quarantined", "checkpoints"}
    assert doc["run_dir"] == str(run) and doc["checkpoints_dir"] == str(run / "checkpoints")
    assert (doc["full_check"], doc["count"], doc["valid"], doc["invalid"], doc["newest_valid_step"]) == \
        (False, 5, 4, 1, 500)
    assert doc["uncommitted"] == []
    types = {"step": int, "name": str, "path": str, "valid": bool, "problem": (str, type(None)),
             "problem_code": (str, type(None)), "hashes_checked": bool, "epoch": int, "batch_in_epoch": int,
             "reason": str, "metrics": dict, "size_bytes": int, "created_at": str, "age_s": float, "strays": list}
    for c in doc["checkpoints"]:
        assert set(c) == set(types)
        for k, t in types.items():
            assert isinstance(c[k], t), (k, c[k])
    c400 = doc["checkpoints"][3]
    assert (c400["step"], c400["valid"], c400["problem"], c400["problem_code"]) == \
        (400, False, "missing file: optimizer.bin", "missing_file")
    c200 = doc["checkpoints"][1]
    assert c200["metrics"] == {"acc": 0.51234, "val_loss": 2.0}
    assert c200["created_at"] == "2026-01-01T03:20:00+00:00" and c200["age_s"] == 8 * 3600 + 40 * 60
    assert c200["name"] == "step-00000200" and c200["path"] == str(run / "checkpoints" / "step-00000200")


def test_list_mentions_uncommitted_saves(run):
    (run / "checkpoints" / ".tmp-step-00000600-999999").mkdir()
    r = invoke("checkpoints", "list", str(run))
    assert r.exit_code == 0
    assert r.output.splitlines()[-1] == ("1 uncommitted save(s) (.tmp-step-00000600-999999): in progress, "
                                         "or left by a crash and removed on the next start")
    assert "600" not in "".join(r.output.splitlines()[1:-2])


# --------------------------------------------------------------------------- verify


def test_verify_all_valid_exits_0(tmp_path):
    make_run(tmp_path / "run", {1: (0, 1, "interval", {"val_loss": 2.0}, 900), 2: (0, 2, "final", {}, 900)})  # an archive needs ~260 B
    r = invoke("checkpoints", "verify", str(tmp_path / "run"))
    assert r.exit_code == 0
    assert r.output == textwrap.dedent("""\
        STEP  EPOCH  BATCH  REASON    METRICS        SIZE     AGE  STATUS
           1      0      1  interval  val_loss=2  1.3 KiB  11h59m  ok (blake3)
           2      0      2  final     -           1.3 KiB  11h58m  ok (blake3)
        2 checkpoints: 2 valid, 0 invalid; resume from step 2
        """)


def test_verify_finds_hash_damage_that_list_does_not_and_exits_1(run):
    p = run / "checkpoints" / "step-00000500" / "model.safetensors"
    p.write_bytes(b"X" + p.read_bytes()[1:])
    before = snapshot(run)
    assert invoke("checkpoints", "list", str(run)).output.splitlines()[5].endswith("  ok")
    r = invoke("checkpoints", "verify", str(run))
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert lines[1].endswith("ok (blake3)")
    assert lines[4].endswith("INVALID: missing file: optimizer.bin")
    assert lines[5] == (" 500      1    249  preempt   -                      5.3 KiB   3h40m  "
                        "INVALID: hash mismatch: model.safetensors (blake3 " + blake3.blake3(p.read_bytes())
                        .hexdigest()[:12] + "…, manifest " + _manifest_sha(p)[:12] + "…)")
    assert lines[6] == "5 checkpoints: 3 valid, 2 invalid; resume from step 300"
    assert snapshot(run) == before  # verify changes nothing
    rj = invoke("checkpoints", "verify", str(run), "--json")
    assert rj.exit_code == 1
    doc = json.loads(rj.output)
    assert doc["full_check"] is True and doc["newest_valid_step"] == 300
    assert [c["problem_code"] for c in doc["checkpoints"]] == [None, None, None, "missing_file", "hash_mismatch"]
    assert [c["hashes_checked"] for c in doc["checkpoints"]] == [True, True, True, False, False]


def _manifest_sha(p: Path) -> str:
    m = json.loads((p.parent / "manifest.json").read_text())
    return next(f["blake3"] for f in m["files"] if f["path"] == p.name)


# --------------------------------------------------------------------------- prune

PRUNE_PLAN = """\
ACTION        CHECKPOINT     WHY
{rm:<12}  step-00000100  not kept by any rule
kept          step-00000200  best val_loss=2
kept          step-00000300  keep_last=2
kept          step-00000400  invalid (missing file: optimizer.bin): pass --invalid to remove it
kept          step-00000500  keep_last=2, newest valid
"""


def test_prune_dry_run_deletes_nothing(run):
    before = snapshot(run)
    r = invoke("checkpoints", "prune", str(run), "--keep-last", "2", "--dry-run")
    assert r.exit_code == 0
    assert r.output == (
        "Policy: keep_last=2, keep_best=1 by val_loss (min), keep_every=off, keep_final=on\n"
        + PRUNE_PLAN.format(rm="would remove")
        + "Dry run: would remove 1 checkpoint (1.5 KiB), keep 4; nothing was deleted.\n"
    )
    assert snapshot(run) == before
    assert not (run / "job.lock").exists()  # a dry run writes nothing, not even the lock file


def test_prune_deletes_exactly_the_plan(run):
    r = invoke("checkpoints", "prune", str(run), "--keep-last", "2")
    assert r.exit_code == 0
    assert r.output == (
        "Policy: keep_last=2, keep_best=1 by val_loss (min), keep_every=off, keep_final=on\n"
        + PRUNE_PLAN.format(rm="removed").replace("ACTION        ", "ACTION   ").replace("kept          ", "kept     ")
        .replace("removed       ", "removed  ")
        + "Removed 1 checkpoint (1.5 KiB); kept 4.\n"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["step-00000200", "step-00000300", "step-00000400", "step-00000500"]


def test_prune_invalid_and_json(run):
    r = invoke("checkpoints", "prune", str(run), "--keep-last", "1", "--keep-best", "0", "--keep-every", "300",
               "--invalid", "--json")
    assert r.exit_code == 0
    doc = json.loads(r.output)
    assert doc["dry_run"] is False and doc["remove_invalid"] is True
    assert doc["policy"] == {"keep_last": 1, "keep_best": 0, "best_metric": "val_loss", "best_mode": "min",
                             "keep_every": 300, "keep_final": True}
    assert [(d["step"], d["valid"], d["why"]) for d in doc["removed"]] == [
        (100, True, "not kept by any rule"),
        (200, True, "not kept by any rule"),
        (400, False, "invalid (missing file: optimizer.bin), --invalid given"),
    ]
    assert [(k["step"], k["why"]) for k in doc["kept"]] == [(300, ["keep_every=300"]),
                                                          (500, ["keep_last=1", "newest valid"])]
    assert doc["removed_bytes"] == sum(d["size_bytes"] for d in doc["removed"]) > 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000300", "step-00000500"]


def test_prune_never_removes_the_newest_valid_even_when_newer_ones_are_invalid(tmp_path):
    store = make_run(tmp_path / "run", {1: (0, 1, "interval", {}, 10), 2: (0, 2, "interval", {}, 10),
                                        3: (0, 3, "interval", {}, 10)})
    (store.root / "step-00000003" / "manifest.json").unlink()
    (store.root / "step-3").mkdir()  # a duplicate of step 3 too
    r = invoke("checkpoints", "prune", str(tmp_path / "run"), "--keep-last", "1", "--keep-best", "0", "--invalid")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in store.root.iterdir()) == ["step-00000002"]


def test_prune_policy_from_job_file_with_flag_override(tmp_path):
    make_run(tmp_path / "runs" / "job")
    job = tmp_path / "job.toml"
    job.write_text('run_dir = "runs/job"\n[train]\nscript = "train.py"\n'
                   '[retention]\nkeep_last = 1\nkeep_best = 0\nkeep_every = 200\n')
    r = invoke("checkpoints", "prune", str(job), "--dry-run")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "Policy: keep_last=1, keep_best=off, keep_every=200, keep_final=on"
    assert [l.split()[2] for l in r.output.splitlines() if l.startswith("would remove")] == \
        ["step-00000100", "step-00000300"]
    r = invoke("checkpoints", "prune", str(job), "--keep-best", "1", "--keep-every", "0")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "Policy: keep_last=1, keep_best=1 by val_loss (min), keep_every=off, " \
                                       "keep_final=on"
    # step 400 has the best loss: valid here (nothing was broken in this run)
    assert sorted(p.name for p in (tmp_path / "runs" / "job" / "checkpoints").iterdir()) == \
        ["step-00000400", "step-00000500"]


@pytest.mark.parametrize("held", ["job.lock", "nodes/node-1/job.lock"])  # one node of a run on several machines
def test_prune_refuses_while_a_supervisor_holds_the_lock(run, held):
    (run / held).parent.mkdir(parents=True, exist_ok=True)
    (run / "nodes" / "node-0").mkdir(parents=True, exist_ok=True)
    (run / "nodes" / "node-0" / "job.lock").touch()  # a node whose supervisor is gone: free
    holder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, sys, time; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
                               "print('locked', flush=True); time.sleep(60)", str(run / held)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        r = invoke("checkpoints", "prune", str(run), "--keep-last", "1")
        assert r.exit_code == 4
        assert r.output == (f"Error: {run} is in use by a running supervisor ({held} is held); it prunes after "
                            "each commit itself: stop it first, or look with --dry-run\n")
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_bad_flag_values_are_usage_errors(run):
    r = invoke("checkpoints", "prune", str(run), "--keep-last", "0")
    assert r.exit_code == 2 and "Invalid value for '--keep-last': 0 is not in the range x>=1." in r.output
    r = invoke("checkpoints", "prune", str(run), "--best-mode", "lowest")
    assert r.exit_code == 2 and "'lowest' is not one of 'min', 'max'" in r.output


# --------------------------------------------------------------------------- bad input: one line, exit 2


def _bad_missing(tmp):
    return tmp / "nope", f"Error: {tmp / 'nope'}: no such directory; pass an existing RUN_DIR or JOB.toml"


def _bad_no_checkpoints_dir(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty", (f"Error: {tmp / 'empty'} holds no checkpoints (no checkpoints/ directory); "
                           "pass the run dir of a run that has saved one")


def _bad_empty_checkpoints(tmp):
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    (tmp / "run" / "checkpoints" / ".tmp-step-00000001-999999").mkdir()
    return tmp / "run", (f"Error: {tmp / 'run' / 'checkpoints'} holds no checkpoints (no step-N directories yet); "
                         "wait for the run's first save or pass another RUN_DIR")


def _bad_checkpoints_dir_passed(tmp):
    make_run(tmp / "run", {1: (0, 1, "interval", {}, 10)})
    return tmp / "run" / "checkpoints", (
        f"Error: {tmp / 'run' / 'checkpoints'} holds no checkpoints/ directory (it looks like the checkpoints dir "
        f"itself); pass its parent {tmp / 'run'}")


def _bad_file(tmp):
    (tmp / "notes.txt").write_text("x")
    return tmp / "notes.txt", (f"Error: {tmp / 'notes.txt'} is a file, not a directory; pass RUN_DIR (the directory "
                               "holding checkpoints/) or a JOB.toml")


def _bad_checkpoints_is_file(tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "checkpoints").write_text("x")
    return tmp / "run", (f"Error: {tmp / 'run' / 'checkpoints'} is a file, not a directory; move it away and pass "
                         "the RUN_DIR of a real run")


def _bad_newer_format(tmp):
    store = make_run(tmp / "run", {1: (0, 1, "interval", {}, 10), 2: (0, 2, "interval", {}, 10)})
    mpath = store.root / "step-00000002" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["format"] = FORMAT_VERSION + 1
    mpath.write_text(json.dumps(m))
    return tmp / "run", (f"Error: {mpath} was written by a newer trainsup (format {FORMAT_VERSION + 1}, this one reads "
                         f"{FORMAT_VERSION}); upgrade: pip install -U trainsup")


def _bad_symlinked_checkpoints(tmp):
    make_run(tmp / "elsewhere", {1: (0, 1, "interval", {}, 10), 2: (0, 2, "interval", {}, 10)})
    (tmp / "run").mkdir()
    (tmp / "run" / "checkpoints").symlink_to(tmp / "elsewhere" / "checkpoints")
    return tmp / "run", (f"Error: {tmp / 'run' / 'checkpoints'} is a symlink; trainsup never follows symlinks in a "
                         "run dir: replace it with the real directory (mv) or pass the run dir it points into")


def _bad_job_without_run(tmp):
    (tmp / "job.toml").write_text('run_dir = "runs/x"\n[train]\nscript = "train.py"\n')
    return tmp / "job.toml", (f"Error: {tmp / 'runs' / 'x'} (run_dir of {tmp / 'job.toml'}) does not exist: the job "
                              f"has not run yet; start it with `trainsup run {tmp / 'job.toml'}`")


def _bad_missing_job(tmp):
    return tmp / "job.toml", f"Error: {tmp / 'job.toml'}: no such job file; pass an existing JOB.toml or a RUN_DIR"


BAD_INPUTS = {
    "run dir does not exist": _bad_missing,
    "run dir holds no checkpoints/": _bad_no_checkpoints_dir,
    "checkpoints/ holds no step-N": _bad_empty_checkpoints,
    "the checkpoints dir passed as RUN_DIR": _bad_checkpoints_dir_passed,
    "a file where a dir is expected": _bad_file,
    "checkpoints is a file": _bad_checkpoints_is_file,
    "manifest of a newer format": _bad_newer_format,
    "checkpoints dir is a symlink": _bad_symlinked_checkpoints,
    "job file whose run dir does not exist": _bad_job_without_run,
    "job file does not exist": _bad_missing_job,
}


@pytest.mark.parametrize("command", [["list"], ["list", "--json"], ["verify"], ["prune", "--keep-last", "1"],
                                     ["prune", "--invalid", "--keep-last", "1"]], ids=" ".join)
@pytest.mark.parametrize("make", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_exit_2_nothing_deleted(tmp_path, command, make):
    work = tmp_path / "w"
    work.mkdir()
    target, message = make(work)
    before = snapshot(tmp_path)
    r = CliRunner().invoke(main, ["checkpoints", command[0], str(target), *command[1:]], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    assert r.output == message + "\n"
    assert r.stdout == ""
    assert snapshot(tmp_path) == before


def test_resolve_run_dir_accepts_a_job_file(tmp_path):
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "job.toml").write_text('run_dir = "runs/x"\n[train]\nscript = "missing_script_is_fine.py"\n')
    assert resolve_run_dir(str(tmp_path / "job.toml")) == tmp_path / "runs" / "x"
    assert resolve_run_dir(str(tmp_path / "runs" / "x")) == tmp_path / "runs" / "x"
    (tmp_path / "bad.toml").write_text("[retention]\nkeep_last = 0\n[train]\nscript = 'a.py'\n")
    with pytest.raises(UserError, match=r"bad.toml: \[retention\] keep_last must be"):
        resolve_run_dir(str(tmp_path / "bad.toml"))


# --------------------------------------------------------------------------- permission denied (as root too)

NOBODY = 65534


def test_permission_denied_is_one_line_exit_2_nothing_deleted():
    """Root reads everything, so the CLI runs in a child that drops to `nobody` after importing."""
    if os.geteuid() != 0 and os.geteuid() == NOBODY:
        pytest.skip("already running as nobody")
    top = Path(tempfile.mkdtemp(prefix="trainsup-perm-"))
    try:
        os.chmod(top, 0o755)
        make_run(top / "run", {1: (0, 1, "interval", {}, 10), 2: (0, 2, "interval", {}, 10)})
        make_run(top / "ro", {1: (0, 1, "interval", {}, 10), 2: (0, 2, "interval", {}, 10)})
        for p in [top / "run", top / "ro", *(top / "ro").rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(top / "run", 0o700)  # owned by root: nobody cannot enter it
        before = snapshot(top)
        script = textwrap.dedent("""
            import os, sys
            from click.testing import CliRunner
            from supervisor.cli import main
            if os.geteuid() == 0:
                os.setgroups([]); os.setgid(65534); os.setuid(65534)
            r = CliRunner().invoke(main, sys.argv[1:])
            sys.stdout.write(r.output)
            sys.exit(r.exit_code)
        """)
        results = {}
        for name, args in {"unreadable run dir": ["list", str(top / "run")],
                           "unreadable run dir (prune)": ["prune", str(top / "run"), "--keep-last", "1"],
                           "read-only checkpoints (prune)": ["prune", str(top / "ro"), "--keep-last", "1"]}.items():
            p = subprocess.run([sys.executable, "-c", script, "checkpoints", *args], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd="/")
            if os.geteuid() == 0 and "Operation not permitted" in p.stderr:
                pytest.skip("cannot drop privileges to nobody here (setuid not permitted)")
            results[name] = (p.returncode, p.stdout, p.stderr)
        assert results["unreadable run dir"] == (
            2, f"Error: {top / 'run'}: permission denied; run as its owner or fix it with `chmod u+rx {top / 'run'}`\n",
            "")
        assert results["unreadable run dir (prune)"] == results["unreadable run dir"]
        ckpts = top / "ro" / "checkpoints"
        assert results["read-only checkpoints (prune)"] == (
            2, f"Error: {ckpts}: permission denied (not writable); run as its owner or fix it with `chmod u+w "
               f"{ckpts}`; nothing was deleted\n", "")
        assert snapshot(top) == before
    finally:
        shutil.rmtree(top)
