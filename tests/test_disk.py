"""supervisor.watch.disk: the free-space policy and watcher (statvfs faked), and train_core's cleanup
of a save that failed."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from supervisor.watch import disk
from supervisor.watch.disk import MARGIN_BYTES, DiskWatcher, checkpoint_bytes, disk_problem, space_needed
from supervisor.watch import Action
from train_core.store import CheckpointStore, StoreError

MIB = 1 << 20


@pytest.mark.parametrize("free, need, blocked", [(0, 1, True), (MIB - 1, MIB, True), (MIB, MIB, False),
                                                 (10 * MIB, MIB, False)])
def test_disk_problem(free, need, blocked, tmp_path):
    why = disk_problem(free, need, tmp_path)
    assert (why is not None) == blocked
    if blocked:
        assert why.startswith(f"disk full: {free / MIB:.1f} MiB free on the file system of {tmp_path}")
        assert "free space or lower [retention] keep_last" in why


def test_space_needed_grows_with_the_checkpoint():
    assert space_needed(0) == MARGIN_BYTES
    assert space_needed(100 * MIB) == MARGIN_BYTES + 110 * MIB


def test_checkpoint_bytes_is_the_newest_step_and_follows_no_link(tmp_path):
    ck = tmp_path / "checkpoints"
    assert checkpoint_bytes(ck) == 0  # no dir yet
    for step, size in ((10, 1000), (20, 300)):
        d = ck / f"step-{step:08d}"
        (d / "sub").mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * size)
        (d / "sub" / "extra.bin").write_bytes(b"y" * 5)
    big = tmp_path / "big"
    big.write_bytes(b"z" * 10_000)
    os.symlink(big, ck / "step-00000020" / "link")
    (ck / ".tmp-step-00000030-1").mkdir()
    assert checkpoint_bytes(ck) == 305 + len(str(big))  # the link itself, not its 10 kB target


def test_watcher_blocks_while_full_and_notes_once_per_episode(tmp_path, monkeypatch):
    free = {"bytes": 100 * MIB}
    monkeypatch.setattr(disk.os, "statvfs", lambda p: SimpleNamespace(f_bavail=free["bytes"] // 4096, f_frsize=4096))
    w = DiskWatcher(tmp_path, poll_interval_s=1.0)
    assert w.poll(0.0) == [] and w.blocking_reason(0.0) is None
    assert w.status()["summary"] == "100.0 MiB free, the next checkpoint needs ~8.0 MiB"
    free["bytes"] = 4 * MIB
    assert w.poll(0.5) == []  # not due yet
    [d] = w.poll(1.0)
    assert (d.action, d.event) == (Action.NOTE, "disk_low") and d.reason.startswith("disk full: 4.0 MiB free")
    assert w.poll(2.0) == [] and w.poll(3.0) == []  # once per episode
    assert w.blocking_reason(3.0).startswith("disk full")
    assert w.status()["blocking"].startswith("disk full")
    free["bytes"] = 50 * MIB
    assert w.poll(4.0) == [] and w.blocking_reason(4.0) is None
    # a bigger checkpoint raises the bar
    d = tmp_path / "checkpoints" / "step-00000010"
    d.mkdir(parents=True)
    with open(d / "model.safetensors", "wb") as f:
        f.truncate(60 * MIB)  # sparse: size without the bytes
    w.on_checkpoint(10, 5.0)
    assert w.need_bytes == space_needed(60 * MIB)
    assert w.blocking_reason(5.0).startswith("disk full: 50.0 MiB free")
    free["bytes"] = 1 * MIB
    [d] = w.poll(6.0)  # a new episode
    assert d.event == "disk_low"


def test_store_abort_removes_only_an_uncommitted_save(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    tmp = store.begin(7)
    (tmp / "model.safetensors").write_bytes(b"x")
    store.abort(tmp)
    assert not tmp.exists()
    store.abort(tmp)  # already gone: fine
    other = tmp_path / "checkpoints" / "step-00000007"
    other.mkdir()
    with pytest.raises(StoreError, match="is not an uncommitted save"):
        store.abort(other)
    assert other.exists()
    with pytest.raises(StoreError):
        store.abort(Path("/tmp") / tmp.name)
