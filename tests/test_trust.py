"""Issue 12: a checkpoint directory is data. Attacks on it, and on the stop path, with real
files and processes: planted pickles, crafted manifests, shared run dirs, planted rank files,
a SIGKILLed supervisor, transient load errors, another job's checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from supervisor_helpers import (
    QuietWatcher, events, finish, read_json, run_cli, run_processes, start_supervisor, wait_for, write_job,
)
from torchfile import torch_like
from train_core import safeload
from train_core import store as st
from train_core.hashing import digest_bytes
from train_core.manifest import hash_name
from train_core.store import CheckpointStore

TOY = Path(__file__).resolve().parent / "scripts" / "toy_train.py"
PY = sys.executable


def toy(run_dir: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The toy training script run plainly (no supervisor), as a user would."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    e.update(env or {})
    return subprocess.run([PY, str(TOY), "--run-dir", str(run_dir), *args], env=e, capture_output=True,
                          text=True, timeout=timeout)


def rehash(ckpt: Path) -> None:
    """What an attacker who can write the run dir does after swapping a file: fix the manifest."""
    m = json.loads((ckpt / "manifest.json").read_text())
    for f in m["files"]:
        data = (ckpt / f["path"]).read_bytes()
        f["size"], f[hash_name(m)] = len(data), digest_bytes(hash_name(m), data)
    (ckpt / "manifest.json").write_text(json.dumps(m))


def payload(marker: Path) -> bytes:
    """A real torch.save archive whose unpickling runs `touch marker` (not the fake one of
    tests/torchfile.py: this is what torch.load would really execute)."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = marker.with_suffix(".payload")
    torch.save({"state": Payload()}, path)
    return path.read_bytes()


# --------------------------------------------------------------------------- crafted manifests


@pytest.fixture
def one_ckpt(tmp_path):
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    tmp = store.begin(3)
    (tmp / "model.safetensors").write_bytes(b"m" * 100)
    (tmp / "optimizer.bin").write_bytes(torch_like(600))
    return store, store.commit(tmp, 3, epoch=0, batch_in_epoch=3, reason="interval")


def _edit(ckpt: Path, fn) -> None:
    m = json.loads((ckpt / "manifest.json").read_text())
    fn(m)
    (ckpt / "manifest.json").write_text(json.dumps(m))


def _set(key, value):
    return lambda m: m["files"][0].__setitem__(key, value)


CRAFTED = [
    ("NUL in a path", lambda c: _edit(c, _set("path", "model\x00.safetensors")), st.BAD_MANIFEST),
    ("size 1e400", lambda c: (c / "manifest.json").write_text(
        (c / "manifest.json").read_text().replace('"size": 100', '"size": 1e400')), st.BAD_MANIFEST),
    ("negative size", lambda c: _edit(c, _set("size", -1)), st.BAD_MANIFEST),
    ("hash not hex", lambda c: _edit(c, _set("blake3", ["x"])), st.BAD_MANIFEST),
    ("deep nesting", lambda c: (c / "manifest.json").write_text("[" * 100_000 + "]" * 100_000), st.UNREADABLE_MANIFEST),
    ("epoch a string", lambda c: _edit(c, lambda m: m.__setitem__("epoch", "0")), st.BAD_MANIFEST),
    ("unlisted file load_state reads", lambda c: (c / "scheduler.bin").write_bytes(torch_like(300)), st.UNLISTED_FILE),
    ("listed FIFO", lambda c: ((c / "optimizer.bin").unlink(), os.mkfifo(c / "optimizer.bin")), st.NOT_A_FILE),
    ("3 GB manifest", lambda c: os.truncate(c / "manifest.json", 3 << 30), st.UNREADABLE_MANIFEST),
    ("FIFO manifest", lambda c: ((c / "manifest.json").unlink(), os.mkfifo(c / "manifest.json")), st.UNREADABLE_MANIFEST),
    ("bare pickle as optimizer.bin", lambda c: ((c / "optimizer.bin").write_bytes(b"\x80\x04K\x01."), rehash(c)),
     st.UNSAFE_PICKLE),
    # 9 bytes that make an unpickler allocate 64 GiB for its memo: checked in a capped child
    ("memo bomb", lambda c: _archive(c, b"\x80\x04Nr\xf0\xff\xff\xff."), st.UNSAFE_PICKLE),
    ("deflated member", lambda c: _archive(c, pickle.dumps({"a": 1}, protocol=2), zipfile.ZIP_DEFLATED), st.UNSAFE_PICKLE),
    ("unlisted .pt in a sub-directory", lambda c: ((c / "sub").mkdir(), (c / "sub" / "x.pt").write_bytes(b"x")),
     st.UNLISTED_FILE),
]


def _archive(ckpt: Path, data_pkl: bytes, compression: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(ckpt / "optimizer.bin", "w", compression) as z:
        z.writestr("archive/data.pkl", data_pkl)
    rehash(ckpt)


@pytest.mark.parametrize("corrupt,code", [c[1:] for c in CRAFTED], ids=[c[0] for c in CRAFTED])
def test_crafted_manifest_is_invalid_with_a_reason_never_a_traceback(one_ckpt, corrupt, code):
    store, c = one_ckpt
    corrupt(c.path)
    t0 = time.monotonic()
    for full in (False, True):
        got = store.check(c.path, full=full)
        assert not got.valid and got.code == code, got.problem
    assert [x.code for x in store.scan()] == [code]
    assert store.latest_valid() is None
    assert time.monotonic() - t0 < 1.0  # nothing blocks (a FIFO) or reads gigabytes


def test_stray_files_are_reported_not_fatal(one_ckpt):
    store, c = one_ckpt
    (c.path / ".nfs000123").write_bytes(b"x")
    got = store.check(c.path, full=True)
    assert got.valid and got.strays == (".nfs000123",)


def test_fifo_manifest_is_listed_invalid_within_a_second(one_ckpt):
    store, c = one_ckpt
    (c.path / "manifest.json").unlink()
    os.mkfifo(c.path / "manifest.json")
    t0 = time.monotonic()
    r = run_cli("checkpoints", "list", str(store.root.parent), timeout=10)
    took = time.monotonic() - t0
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "INVALID: manifest.json is not a regular file" in r.stdout
    assert took < 1.0 + 1.0  # the command's own start-up (~0.3 s) plus the second the issue allows


def test_runner_survives_an_error_from_a_scan(tmp_path, monkeypatch):
    from supervisor.config import load_job
    from supervisor.runner import Runner

    job = load_job(write_job(tmp_path, []), check_script=False)
    r = Runner(job, install_signals=False)

    def boom(*a, **k):
        raise RecursionError("crafted")

    monkeypatch.setattr(r.ckpts.store, "scan", boom)
    assert r.ckpts.refresh(force=True) is None  # logs, keeps the last known list
    assert r.ckpts.all == []


# --------------------------------------------------------------------------- planted pickles


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A plain toy run with two checkpoints: step 2 (interval) and step 4 (final); its data is
    a stream with a position, so the checkpoints hold every file a checkpoint can hold."""
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    r = toy(run_dir, *STREAM, "--steps", "4", "--save-every", "2")
    assert r.returncode == 0, r.stderr
    return run_dir


STREAM = ("--stream", "stateful")


def _pickled_files(ckpt: Path) -> list[str]:
    m = json.loads((ckpt / "manifest.json").read_text())
    return sorted(f["path"] for f in m["files"] if safeload.needs_scan(f["path"]))


def test_a_checkpoint_holds_these_pickled_files(toy_run):
    # The planted-payload test below attacks every pickled file it finds; this names today's.
    files = _pickled_files(toy_run / "checkpoints" / "step-00000004")
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
            "stream_state.pt"} <= set(files)


@pytest.mark.slow
def test_planted_payload_never_runs(toy_run, tmp_path):
    """Every pickled file a checkpoint holds (today's, and any a later change adds: the list is
    read from a real checkpoint), in turn replaced by a payload with the hashes recomputed."""
    import torch

    victims = _pickled_files(toy_run / "checkpoints" / "step-00000004")
    for victim in victims:
        run_dir = tmp_path / victim / "run"
        shutil.copytree(toy_run, run_dir)
        ckpt = run_dir / "checkpoints" / "step-00000004"
        marker = tmp_path / victim / "PWNED"
        (ckpt / victim).write_bytes(payload(marker))
        rehash(ckpt)

        # torch-free checks name the file and the import
        c = CheckpointStore(run_dir / "checkpoints").check(ckpt, full=True)
        assert c.code == st.UNSAFE_PICKLE and victim in c.problem and "posix.system" in c.problem, c.problem
        r = run_cli("checkpoints", "verify", str(run_dir))
        assert r.returncode == 1 and f"INVALID: refused: {victim}" in r.stdout, r.stdout + r.stderr
        # the rank's loader refuses it too, even if the check were bypassed
        with pytest.raises(Exception, match="Weights only load failed"):
            safeload.load_torch_file(ckpt / victim)
        # asked for by name: exit 2 naming the file; asked for "auto": the previous valid checkpoint
        r = toy(run_dir, *STREAM, "--steps", "4", "--save-every", "2", env={"TRAINSUP_RESUME_FROM": str(ckpt)})
        assert r.returncode == 2 and victim in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert read_json(run_dir / "ranks" / "exit-0.json")["kind"] == "bad_input"
        r = toy(run_dir, *STREAM, "--steps", "4", "--save-every", "2", env={"TOY_LOG": "INFO"})
        assert r.returncode == 0, r.stderr
        assert "resumed from step-00000002" in r.stderr
        assert not marker.exists(), victim
        # positive control: the same bytes under a plain torch.load(weights_only=False) do run
        planted = tmp_path / victim / "planted.bin"
        planted.write_bytes(payload(marker))
        torch.load(planted, weights_only=False)
        assert marker.exists()


@pytest.mark.slow
def test_supervisor_falls_back_past_a_planted_checkpoint(toy_run, tmp_path, cleanup):
    run_dir = tmp_path / "run"
    shutil.copytree(toy_run, run_dir)
    cleanup[0].append(run_dir)
    ckpt = run_dir / "checkpoints" / "step-00000004"
    marker = tmp_path / "PWNED"
    (ckpt / "random_states_0.pkl").write_bytes(payload(marker))
    rehash(ckpt)
    job = write_job(tmp_path, [*STREAM, "--steps", "6", "--save-every", "2"], script=TOY, run_dir=run_dir)
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)
    assert finish(sup, 120) == 0, (tmp_path / "sup.log").read_text()[-3000:]
    starts = [e for e in events(run_dir, "state") if e["to"] == "starting"]
    assert starts[0]["resume_from"].endswith("step-00000002")
    assert not marker.exists()


# --------------------------------------------------------------------------- permissions


def _modes(run_dir: Path) -> dict[str, int]:
    out = {}
    for root, dirs, files in os.walk(run_dir):
        for name in dirs + files:
            p = Path(root) / name
            if not p.is_symlink():
                out[str(p.relative_to(run_dir))] = stat.S_IMODE(p.lstat().st_mode)
    return out


@pytest.mark.slow
def test_fresh_run_is_private_whatever_the_umask(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    job = write_job(tmp_path, ["--steps", "4", "--save-every", "2"], script=TOY, run_dir=run_dir)
    old = os.umask(0o002)  # the supervisor inherits a lax umask (Debian's default for users)
    try:
        sup = start_supervisor(job, log=tmp_path / "sup.log")
    finally:
        os.umask(old)
    cleanup[1].append(sup)
    assert finish(sup, 120) == 0, (tmp_path / "sup.log").read_text()[-3000:]
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    modes = _modes(run_dir)
    assert "checkpoints/step-00000004/model.safetensors" in modes and "final_hash.json" in modes
    loose = {p: f"{m:04o}" for p, m in modes.items() if m & 0o077}
    assert not loose, loose  # every file 0600, every dir 0700: the ranks' files too


def _daemon_group() -> int:
    import grp
    import pwd

    for g in grp.getgrall():  # a group another user is in: group write there is not private
        others = set(g.gr_mem) | {p.pw_name for p in pwd.getpwall() if p.pw_gid == g.gr_gid}
        if others - {pwd.getpwuid(os.getuid()).pw_name}:
            return g.gr_gid
    pytest.skip("no group with another user in it on this machine")


@pytest.mark.parametrize("how", ["group-writable run dir", "world-writable checkpoint", "owned by another user"])
def test_untrusted_run_dir_is_refused_with_the_fix(tmp_path, how):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    if how == "group-writable run dir":
        os.chown(run_dir, -1, _daemon_group())
        os.chmod(run_dir, 0o775)
        want = "writable by its group (mode 0775)"
    elif how == "world-writable checkpoint":
        os.chmod(ckpt, 0o777)
        want = "writable by others (mode 0777)"
    else:
        if os.getuid() != 0:
            pytest.skip("chown to another user needs root")
        os.chown(ckpt / "manifest.json", 65534, 65534)
        want = "is owned by nobody (uid 65534)"
    job = write_job(tmp_path, [], script=TOY, run_dir=run_dir)
    r = run_cli("run", str(job), timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert want in r.stderr and ("chmod -R go-w" in r.stderr or "chown -R" in r.stderr), r.stderr
    assert "Traceback" not in r.stderr
    assert not (run_dir / "logs").exists() and not (run_dir / "events.jsonl").exists()  # nothing written


def test_existing_readable_run_dir_is_tightened_with_a_note(tmp_path):
    from supervisor.rundir import secure_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o755)
    os.chmod(run_dir, 0o755)
    notes = secure_run_dir(run_dir)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert len(notes) == 1 and "from 0755 to 0700" in notes[0]


def _secure_after(barrier, run_dir, out):
    from supervisor.rundir import secure_run_dir

    barrier.wait()
    try:
        secure_run_dir(run_dir)
        out.put("ok")
    except Exception as exc:  # noqa: BLE001 - the test reports what failed
        out.put(repr(exc))


def test_nodes_creating_one_run_dir_at_once_all_succeed(tmp_path):
    """The nodes of a multi-node job start together on a shared run dir: whichever creates it,
    the others find it made and go on (an exists-then-mkdir check lost that race in CI)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    results = []
    for attempt in range(10):
        run_dir = tmp_path / f"run{attempt}" / "run"
        barrier, out = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_secure_after, args=(barrier, run_dir, out)) for _ in range(8)]
        for p in procs:
            p.start()
        results += [out.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert set(results) == {"ok"}, [r for r in results if r != "ok"][:3]


def test_lock_and_pid_files_never_follow_symlinks(tmp_path):
    from supervisor.errors import UserError
    from supervisor.rundir import acquire_run_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (run_dir / "job.lock").symlink_to(victim)
    with pytest.raises(UserError, match="job.lock is a symlink"):
        acquire_run_lock(run_dir)
    (run_dir / "job.lock").unlink()
    (run_dir / "job.lock.pid.tmp").symlink_to(victim)
    (run_dir / "job.lock.pid").symlink_to(victim)
    lock = acquire_run_lock(run_dir)
    lock.release()
    assert victim.read_text() == "precious\n"
    assert (run_dir / "job.lock.pid").read_text() == f"{os.getpid()}\n" and not (run_dir / "job.lock.pid").is_symlink()


# --------------------------------------------------------------------------- transient load errors


@pytest.fixture(scope="module")
def stopped_at_6(tmp_path_factory) -> Path:
    """A plain toy run stopped by its own signal at step 7 (12 planned), interval saves every 3."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    r = toy(run_dir, "--steps", "12", "--save-every", "3", "--eval-every", "0", "--signal-at", "18")
    assert r.returncode == 75, r.stderr
    assert [c.step for c in CheckpointStore(run_dir / "checkpoints").scan() if c.valid] == [3, 6, 7]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("times", [2, -1], ids=["passes on the third try", "never passes"])
def test_oom_inside_load_state_keeps_the_checkpoint(stopped_at_6, tmp_path, cleanup, times):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_at_6, run_dir)
    cleanup[0].append(run_dir)
    oom = "step-00000007" + (f":{times}" if times > 0 else "")
    job = write_job(tmp_path, ["--steps", "12", "--save-every", "3", "--eval-every", "0", "--load-oom", oom],
                    script=TOY, run_dir=run_dir,
                    gpu={"oom_recovery": True})
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)
    assert finish(sup, 150) == 0, (tmp_path / "sup.log").read_text()[-3000:]
    log_text = (tmp_path / "sup.log").read_text()
    starts = [e["resume_from"] for e in events(run_dir, "state") if e["to"] == "starting"]
    assert not events(run_dir, "oom_backoff")  # out of memory while loading says nothing about the batch
    final = CheckpointStore(run_dir / "checkpoints").latest_valid()
    assert final.step == 12 and (final.manifest["micro_batch"], final.manifest["grad_accum"]) == (4, 3)
    assert not list((run_dir / "checkpoints").glob("failed-*"))  # nothing quarantined
    if times == 2:
        assert starts == [str(run_dir / "checkpoints" / "step-00000007")]  # one attempt: the rank retried
        assert log_text.count("retry") >= 2 and not events(run_dir, "resume_fallback")
    else:
        assert [Path(s).name for s in starts] == ["step-00000007", "step-00000006"]
        fb = events(run_dir, "resume_fallback")
        assert len(fb) == 1 and fb[0]["quarantined"] is False and "3 retries" in fb[0]["reason"]
        assert (run_dir / "checkpoints" / "step-00000007" / "manifest.json").exists()  # kept, not moved


# --------------------------------------------------------------------------- signals only to our own


@pytest.mark.slow
def test_planted_rank_file_cannot_get_an_unrelated_group_killed(tmp_path, cleanup):
    bystander = subprocess.Popen([PY, "-c", "import time; time.sleep(120)"], start_new_session=True)
    cleanup[1].append(bystander)
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    # every micro-batch sleeps 30 s: the save request cannot be honoured within grace_s
    job = write_job(tmp_path, ["--steps", "50", "--sleep-s", "30"], script=TOY, run_dir=run_dir,
                    stop={"grace_s": 1.0, "kill_after_s": 1.0})
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)
    wait_for(lambda: (read_json(run_dir / "status.json") or {}).get("state") == "training", 60, "training")
    attempt = read_json(run_dir / "status.json")["attempt"]
    (run_dir / "ranks" / "rank-7.json").write_text(json.dumps({"pid": bystander.pid, "rank": 7, "attempt": attempt}))
    time.sleep(0.5)  # the supervisor reads rank files every tick
    os.kill(sup.pid, signal.SIGTERM)
    finish(sup, 60)
    esc = events(run_dir, "escalate")
    assert esc and esc[0]["signal"] == "SIGTERM"  # grace expired: escalation ran
    assert all(os.getpgid(bystander.pid) not in e["groups"] for e in esc)
    assert bystander.poll() is None, "an unrelated process was killed"
    assert "rank-7.json names pid" in (tmp_path / "sup.log").read_text()


# --------------------------------------------------------------------------- a SIGKILLed supervisor


@pytest.mark.slow
def test_sigkilled_supervisor_1_rank_still_commits_an_8s_save_and_no_second_set_starts(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    job = write_job(tmp_path, ["--steps", "40", "--sleep-s", "0.1", "--save-sleep-s", "8"], script=TOY,
                    run_dir=run_dir, stop={"grace_s": 30.0, "kill_after_s": 2.0})
    sup = start_supervisor(job, log=tmp_path / "sup1.log")
    cleanup[1].append(sup)
    wait_for(lambda: (read_json(run_dir / "status.json") or {}).get("step", 0) >= 2, 60, "step 2")
    os.kill(sup.pid, signal.SIGTERM)
    wait_for(lambda: "slow save" in (run_dir / "logs" / "attempt-1.log").read_text(), 20, "the save to begin")
    os.kill(sup.pid, signal.SIGKILL)
    sup.wait()
    killed_at = time.time()
    old = [p.pid for p in run_processes(run_dir)]
    assert old, "the rank died with its supervisor"
    sup2 = start_supervisor(job, log=tmp_path / "sup2.log")  # at once, as a restart script would
    cleanup[1].append(sup2)
    assert finish(sup2, 180) == 0, (tmp_path / "sup2.log").read_text()[-3000:]
    first_start = next(e for e in events(run_dir, "state") if e["to"] == "starting" and e["attempt"] == 2)
    saved = CheckpointStore(run_dir / "checkpoints").check(Path(first_start["resume_from"]), full=True)
    assert saved.valid and saved.reason == "preempt"  # the save the dead supervisor asked for
    assert first_start["ts"] > killed_at + 5  # it waited for the old rank (8 s save) before starting
    assert "ranks of an earlier run" in (tmp_path / "sup2.log").read_text()


# --------------------------------------------------------------------------- another job's checkpoint


@pytest.mark.slow
def test_checkpoint_of_another_config_stops_at_once_with_exit_2(stopped_at_6, tmp_path, cleanup):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_at_6, run_dir)
    cleanup[0].append(run_dir)
    job = write_job(tmp_path, ["--steps", "12", "--lr", "0.05", "--hidden", "16", "--dataset-size", "80"],
                    script=TOY, run_dir=run_dir)
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)
    assert finish(sup, 90) == 2
    out = (tmp_path / "sup.log").read_text()
    assert len([e for e in events(run_dir, "state") if e["to"] == "starting"]) == 1  # not retried
    assert "step-00000007" in out and "3 key(s) differ" in out and "allow_changes" in out and "--run-dir" in out
    assert "Traceback" not in out + (run_dir / "logs" / "attempt-1.log").read_text()
    assert max(len(line) for line in out.splitlines()) < 600


# --------------------------------------------------------------------------- time asleep


class Suspend(QuietWatcher):
    """A watcher that, once the run trains, freezes every process of the run (SIGSTOP) for 3 s,
    longer than hang_timeout_s: what a laptop's sleep looks like to the supervisor, except
    that the sleep also stops CLOCK_MONOTONIC. The injected clocks model that: the monotonic
    one does not count the frozen seconds, the wall clock does."""

    name = "suspend"

    def __init__(self, run_dir: Path, mono_offset: list[float]) -> None:
        self.status = run_dir / "status.json"
        self.mono_offset = mono_offset
        self.done = False

    def poll(self, now):
        from supervisor.runner import procs as os_procs

        if not self.done and (read_json(self.status) or {}).get("step", -1) >= 5:
            self.done = True
            procs = os_procs.descendants()
            for p in procs:
                p.suspend()
            time.sleep(3.0)
            self.mono_offset[0] += 3.0  # the machine was asleep: the monotonic clock stood still
            for p in procs:
                p.resume()
        return []

    def status(self):
        return {"suspended": self.done}


@pytest.mark.slow  # seconds of real processes: out of the fast lane
def test_a_suspend_longer_than_the_hang_timeout_is_not_a_hang(tmp_path):
    from supervisor.config import load_job
    from supervisor.runner import Runner
    from supervisor_helpers import write_job as wj

    job = load_job(wj(tmp_path, ["--steps", "30", "--step-time", "0.03", "--heartbeat-s", "0.1"],
                      launch={"launcher": "python"}, watch={"hang_timeout_s": 2.0, "poll_interval_s": 0.1}))
    offset = [0.0]
    w = Suspend(job.run_dir, offset)
    r = Runner(job, watchers=[w], install_signals=False,
               clock=lambda: time.monotonic() - offset[0], wall_clock=time.time)
    assert r.run() == 0
    assert w.done and not events(job.run_dir, "hung")
    assert [e["to"] for e in events(job.run_dir, "state")] == ["starting", "running", "exited"]
    ts = [e["ts"] for e in events(job.run_dir)]
    assert ts == sorted(ts) and ts[-1] - ts[0] >= 3.0  # events keep wall-clock time, the sleep included


def test_quarantined_checkpoints_are_listed_and_pruned_only_with_invalid(one_ckpt):
    store, c = one_ckpt
    tmp = store.begin(5)
    (tmp / "model.safetensors").write_bytes(b"m" * 100)
    store.commit(tmp, 5, epoch=0, batch_in_epoch=5, reason="interval")
    moved = store.quarantine(store.check(store.root / "step-00000005"), 1_700_000_000)
    assert moved.name == "failed-step-00000005-1700000000"
    run_dir = str(store.root.parent)
    r = run_cli("checkpoints", "list", run_dir)
    assert "1 quarantined (failed to load, never resumed from): failed-step-00000005-1700000000" in r.stdout
    r = run_cli("checkpoints", "prune", run_dir, "--keep-last", "1")
    assert r.returncode == 0 and moved.exists() and "pass --invalid to remove it" in r.stdout, r.stdout + r.stderr
    r = run_cli("checkpoints", "prune", run_dir, "--keep-last", "1", "--invalid")
    assert r.returncode == 0 and not moved.exists() and c.path.exists(), r.stdout + r.stderr


def test_strays_are_reported_by_list(one_ckpt):
    store, c = one_ckpt
    (c.path / ".nfs000123").write_bytes(b"x")
    r = run_cli("checkpoints", "list", str(store.root.parent), "--json")
    assert json.loads(r.stdout)["checkpoints"][0]["strays"] == [".nfs000123"]
    r = run_cli("checkpoints", "list", str(store.root.parent))
    assert "step-00000003: not in its manifest, never loaded: .nfs000123" in r.stdout


def test_a_new_commit_of_a_step_sets_the_old_invalid_one_aside_never_deletes_it(one_ckpt):
    store, c = one_ckpt
    (c.path / "optimizer.bin").write_bytes(b"\x80\x04K\x01.")  # refused (not an archive), and so invalid
    rehash(c.path)
    tmp = store.begin(3)
    (tmp / "model.safetensors").write_bytes(b"n" * 100)
    new = store.commit(tmp, 3, epoch=0, batch_in_epoch=3, reason="interval")
    assert new.valid and (new.path / "model.safetensors").read_bytes() == b"n" * 100
    [aside] = store.quarantined()
    assert aside.path.name.startswith("replaced-step-00000003-")
    assert (aside.path / "optimizer.bin").read_bytes() == b"\x80\x04K\x01."


def test_a_remembered_verdict_never_hides_a_swapped_file(one_ckpt):
    store, c = one_ckpt
    assert store.check(c.path).valid and store._verdicts  # checked once, remembered
    (c.path / "optimizer.bin").write_bytes(torch_like(600, obj={"x": 2}))  # same size, new content
    assert store.check(c.path).valid
    (c.path / "optimizer.bin").write_bytes(b"\x80\x04K\x01.")
    rehash(c.path)
    assert store.check(c.path).code == st.UNSAFE_PICKLE


@pytest.mark.parametrize("entry", ["metrics.jsonl", "report.html", "tensorboard/events.out.tfevents.1"])
def test_what_the_session_and_report_write_is_checked_too(tmp_path, entry):
    from supervisor.errors import UserError
    from supervisor.rundir import secure_run_dir

    run_dir = tmp_path / "run"
    (run_dir / "tensorboard").mkdir(parents=True)
    (run_dir / "mine.txt").write_text("a user's own file beside the run: not trainsup's to judge")
    os.chmod(run_dir / "mine.txt", 0o666)
    secure_run_dir(run_dir)  # passes: mine.txt is not trainsup's
    (run_dir / entry).write_text("x")
    os.chmod(run_dir / entry, 0o666)
    with pytest.raises(UserError, match=f"{entry} is writable by others .*chmod -R go-w"):
        secure_run_dir(run_dir)
