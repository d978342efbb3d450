"""A full disk mid-run (a real tmpfs filled up under a real `trainsup run`): the save that does
not fit fails and is removed, the supervisor neither crashes nor spins restarts but waits with
the fix in its reason, the newest checkpoint stays valid, and training resumes by itself once
space is freed. Needs root to mount the tmpfs (skipped otherwise)."""

from __future__ import annotations

import subprocess

import pytest

from supervisor_helpers import REPO, finish, missing, start_supervisor, wait_for, write_job
from train_core.store import CheckpointStore

pytestmark = pytest.mark.slow

TOY = REPO / "tests" / "scripts" / "toy_train.py"


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        missing(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_waits_keeps_the_checkpoint_and_resumes(tmp_path, small_disk, cleanup):
    run_dir = small_disk / "run"
    job = write_job(tmp_path, ["--steps", "60", "--sleep-s", "0.03", "--save-every", "10", "--eval-every", "0",
                               "--hidden", "256"], script=TOY, run_dir=run_dir,  # ~84 kB checkpoints
                    restart={"max_restarts": 5, "backoff_initial_s": 0.2, "no_progress_limit": 0})
    log = tmp_path / "sup.log"
    sup = start_supervisor(job, log=log)
    cleanup[0].append(run_dir)
    cleanup[1].append(sup)
    store = CheckpointStore(run_dir / "checkpoints")
    wait_for(lambda: any(c.valid for c in store.scan()), 60, "the first checkpoint")

    # Fill the disk to the last page, then give back ~40 kB: the next save (84 kB) cannot fit,
    # but the rank's exit report and log lines can.
    reserve, filler = small_disk / "reserve", small_disk / "filler"
    reserve.write_bytes(b"r" * 40_000)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"f" * 65536)
        except OSError:
            pass
    reserve.unlink()
    wait_for(lambda: "-> waiting: not restarting after error" in log.read_text(), 60,
             "the supervisor waiting on the full disk")
    assert sup.poll() is None, log.read_text()[-3000:]  # alive, not crashed
    text = log.read_text()
    [waiting] = [line for line in text.splitlines() if "-> waiting:" in line]
    assert "disk: disk full:" in waiting and "free space or lower [retention] keep_last" in waiting
    # the rank's own failure says the same, and what is safe
    [failed] = [line for line in text.splitlines() if "attempt 1 ended: error" in line]
    assert "CheckpointSaveFailed" in failed and "is full" in failed and "is intact" in failed, failed
    ckpts = store.scan()
    assert not store.tmp_dirs(), "the failed save must be removed at once"
    newest = max(c.step for c in ckpts if c.valid)
    assert all(c.valid for c in ckpts) and store.check(store.root / f"step-{newest:08d}", newest, full=True).valid
    starts = text.count("-> starting")

    filler.unlink()  # space is back: training resumes by itself from that checkpoint
    assert finish(sup, 120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("-> starting") == starts + 1 and f"resuming from step-{newest:08d}" in text
    final = [c for c in store.scan() if c.valid]
    assert max(c.step for c in final) == 60
