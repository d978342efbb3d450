"""SIGKILL a real process while it commits checkpoints; the store must never show a broken one.

The child is this file run as a script: it commits checkpoints in a loop (files of
random size up to several MB, content derived from (step, file name) so the parent can
recompute it) and keeps the newest two with store.remove(). Kills land:
  - deterministically, at pause points the child reaches through hooks around
    os.fsync / fsync_dir / os.rename / hashing / its own writer (env TRAINSUP_KILL_PAUSE):
    mid-file, before a file's fsync, before the manifest's fsync, before the tmp dir's
    fsync, between rename and the parent dir's fsync, mid-removal, ...
  - at random moments (mostly mid-file: writing dominates a commit).
After every kill: every step-N the store lists is valid under the FULL check, the newest
valid one holds exactly the bytes the child wrote for its step, nothing the child
reported committed is lost, and the next start's remove_stale_tmp() leaves no .tmp-*.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 256 << 10


def file_plan(step: int) -> dict[str, int]:
    """The files (name -> size) the child writes for `step`: multi-MB ones so kills land mid-file."""
    rng = random.Random(step)
    model = rng.choice([0, rng.randrange(1, 5000), rng.randrange(1 << 20, 3 << 20), rng.randrange(1 << 20, 3 << 20)])
    return {
        "model.safetensors": model,
        "optimizer.bin": 2 * model + rng.randrange(0, 1000),
        "random_states_0.pkl": rng.randrange(50, 200),
        "sub/custom_checkpoint_0.pkl": rng.randrange(0, 300),
    }


def chunks(step: int, name: str, size: int):
    i = 0
    while size > 0:
        block = (hashlib.sha256(f"{step}/{name}/{i}".encode()).digest() * (CHUNK // 32))[: min(size, CHUNK)]
        yield block
        size -= len(block)
        i += 1


def expected_sha256(step: int, name: str, size: int) -> str:
    h = hashlib.sha256()
    for c in chunks(step, name, size):
        h.update(c)
    return h.hexdigest()


# --------------------------------------------------------------------------- the child


def child_main(root: str, start: int) -> None:
    sys.path.insert(0, str(ROOT))
    from train_core import store as st

    pause_at = os.environ.get("TRAINSUP_KILL_PAUSE", "")
    pause_from = int(os.environ.get("TRAINSUP_KILL_PAUSE_STEP", "0"))
    current = {"step": start}

    def hook(point: str) -> None:
        if point == pause_at and current["step"] >= pause_from:
            print(f"PAUSED {point} {current['step']}", flush=True)
            while True:  # stop here until the parent's SIGKILL
                time.sleep(60)

    real_fsync, real_rename, real_fsync_dir, real_hash = os.fsync, os.rename, st.fsync_dir, st._hash_file

    def fsync(fd):
        hook("fsync:" + Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    def fsync_dir(d):
        which = "tmp" if Path(d).name.startswith(".tmp-") else ("root" if Path(d) == store.root else "sub")
        hook(f"fsync_dir:{which}")
        real_fsync_dir(d)
        hook(f"after_fsync_dir:{which}")

    def rename(a, b):
        kind = "del_rename" if Path(b).name.startswith(".tmp-del-") else "rename"
        hook(kind)
        real_rename(a, b)
        hook("after_" + kind)

    def hash_file(p, *args):
        hook("hash:" + Path(p).name)
        return real_hash(p, *args)

    os.fsync, os.rename, st.fsync_dir, st._hash_file = fsync, rename, fsync_dir, hash_file

    store = st.CheckpointStore(Path(root), trust_pickle=True)  # protocol test: its files are not torch archives
    print("READY", flush=True)
    step = start
    while True:
        current["step"] = step
        tmp = store.begin(step)
        for name, size in file_plan(step).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            half = size // 2
            with open(tmp / name, "wb") as f:
                written = 0
                for block in chunks(step, name, size):
                    f.write(block)
                    f.flush()  # into the page cache now: a kill leaves a partial file
                    written += len(block)
                    if written >= half > 0 and written - len(block) < half:
                        hook("mid_file:" + name)
        store.commit(tmp, step, epoch=step // 100, batch_in_epoch=step % 100, reason="interval",
                     metrics={"val_loss": 1.0 / (step + 1)})
        print(f"COMMITTED {step}", flush=True)
        for old in [c for c in store.scan() if c.valid][:-2]:
            store.remove(old)
        step += 1


# --------------------------------------------------------------------------- the parent

PAUSE_POINTS = [
    "mid_file:model.safetensors",
    "mid_file:optimizer.bin",
    "hash:optimizer.bin",
    "fsync:optimizer.bin",
    "fsync:manifest.json",  # manifest written, not yet fsynced, no rename
    "fsync_dir:tmp",
    "rename",
    "after_rename",  # renamed to step-N, parent dir not yet fsynced
    "after_fsync_dir:root",  # committed, not yet reported
    "del_rename",
    "after_del_rename",  # a removal half done: .tmp-del-* left
]
BEFORE_RENAME = {"mid_file:model.safetensors", "mid_file:optimizer.bin", "hash:optimizer.bin", "fsync:optimizer.bin",
                 "fsync:manifest.json", "fsync_dir:tmp", "rename"}


class Child:
    def __init__(self, root: Path, start: int, pause: str = "", pause_step: int = 0):
        env = dict(os.environ, TRAINSUP_KILL_PAUSE=pause, TRAINSUP_KILL_PAUSE_STEP=str(pause_step),
                   PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, __file__, "child", str(root), str(start)],
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.all: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("EOF")

    def wait_for(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"child printed no {prefix!r} line in {timeout_s} s; it printed {self.all}")
            self.all.append(line)
            if line.startswith(prefix) or line == "EOF":
                return line

    def kill(self) -> list[str]:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.reader.join(10)
        while not self.lines.empty():
            self.all.append(self.lines.get())
        assert self.proc.returncode == -signal.SIGKILL, (self.proc.returncode, self.all)
        return self.all


def check_after_kill(store, committed: int, writing: int) -> tuple[int, int]:
    """The invariants after a kill; returns (newest valid step, stale tmp dirs removed)."""
    ckpts = store.scan(full=True)
    bad = [(c.path.name, c.problem) for c in ckpts if not c.valid]
    assert not bad, f"a kill left a step-N that is not a complete checkpoint: {bad}"
    newest = store.latest_valid(full=True)
    assert newest is not None and newest.step >= committed, (newest, committed)
    assert newest.step <= writing
    plan = file_plan(newest.step)
    listed = {f["path"]: f for f in newest.manifest["files"]}
    assert set(listed) == set(plan), (listed, plan)
    for name, size in plan.items():
        # Intact: the bytes on disk are the bytes the child generated for this step.
        assert listed[name]["size"] == size
        assert st_sha256(newest.path / name) == expected_sha256(newest.step, name, size), (newest.step, name)
    assert newest.manifest["batch_in_epoch"] == newest.step % 100
    removed = store.remove_stale_tmp()  # what the next start does
    assert store.tmp_dirs() == [], store.tmp_dirs()
    assert [c.step for c in store.scan()] == [c.step for c in ckpts]  # cleanup touched no checkpoint
    return newest.step, len(removed)


def st_sha256(path: Path) -> str:
    from train_core.store import sha256_file

    return sha256_file(path)


@pytest.mark.slow  # ~15 s of real SIGKILLs; the fast lane keeps the in-process commit-protocol tests
def test_sigkill_at_random_moments_and_every_commit_step_never_leaves_a_broken_checkpoint(tmp_path):
    from train_core.store import CheckpointStore

    root = tmp_path / "checkpoints"
    store = CheckpointStore(root, trust_pickle=True)
    seed = int(os.environ.get("TRAINSUP_KILL_SEED", "1234"))
    rng = random.Random(seed)

    # Two committed checkpoints to start from, so that kills mid-removal are possible too.
    first = Child(root, 0)
    assert first.wait_for("COMMITTED 2", 30) == "COMMITTED 2"
    first.kill()
    committed = max(int(l.split()[1]) for l in first.all if l.startswith("COMMITTED"))
    newest, _ = check_after_kill(store, committed, committed + 1)

    schedule = [p for p in PAUSE_POINTS for _ in range(2)] + [""] * 40
    if os.environ.get("TRAINSUP_KILL_RANDOM_ONLY"):  # for checking that the test catches a broken store
        schedule = [""] * 60
    rng.shuffle(schedule)
    kills, stale_removed, landed = 0, 0, {}
    for pause in schedule:
        start = newest + 1
        child = Child(root, start, pause, start)
        if pause:
            line = child.wait_for("PAUSED", 30)
            assert line.startswith(f"PAUSED {pause} "), (pause, line, child.all)
            paused_step = int(line.split()[2])
        else:
            assert child.wait_for("READY", 30) == "READY"
            time.sleep(rng.uniform(0.0, 0.35))
        lines = child.kill()
        kills += 1
        reported = [int(l.split()[1]) for l in lines if l.startswith("COMMITTED")]
        committed = max([committed, *reported])
        tmp_before = [p.name for p in store.tmp_dirs()]
        if tmp_before:
            landed["with an uncommitted .tmp-* left"] = landed.get("with an uncommitted .tmp-* left", 0) + 1
        newest, n = check_after_kill(store, committed, writing=max([start, *reported]) + 1)
        stale_removed += n
        if pause in BEFORE_RENAME:
            # Killed before the rename: that step must not exist, and its tmp dir was cleaned.
            assert newest == paused_step - 1 and any(t.startswith(f".tmp-step-{paused_step:08d}-") for t in tmp_before)
        elif pause in ("after_rename", "after_fsync_dir:root"):
            assert newest == paused_step  # renamed = committed, even before the parent's fsync
        elif pause == "after_del_rename":
            assert any(t.startswith(".tmp-del-") for t in tmp_before)
        landed[pause or "random"] = landed.get(pause or "random", 0) + 1

    print(f"\nseed={seed} kills={kills + 1} newest={newest} stale tmp removed={stale_removed} landed={landed}")
    assert kills + 1 >= 50
    assert landed.get("with an uncommitted .tmp-* left", 0) >= 20  # most kills hit a save in progress
    assert newest > 30


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "child":
    child_main(sys.argv[2], int(sys.argv[3]))
