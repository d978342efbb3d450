"""The checkpoint store: commit protocol, every invalid-checkpoint reason, stale tmp, safe removal."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import blake3
import pytest

from torchfile import torch_like
from train_core import store as st
from train_core.store import Checkpoint, CheckpointStore, StoreError, step_dir_name

FILES = {"model.safetensors": b"m" * 3000, "optimizer.bin": torch_like(6000), "sub/random_states_0.pkl": torch_like(400, b"r")}


def commit(store: CheckpointStore, step: int, files: dict[str, bytes] = FILES, **kw) -> Checkpoint:
    tmp = store.begin(step)
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    kw.setdefault("epoch", 0)
    kw.setdefault("batch_in_epoch", step)
    kw.setdefault("reason", "interval")
    return store.commit(tmp, step, **kw)


def edit_manifest(ckpt: Path, fn: Callable[[dict], object]) -> None:
    m = json.loads((ckpt / "manifest.json").read_text())
    fn(m)
    (ckpt / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "run" / "checkpoints")


# --------------------------------------------------------------------------- commit protocol


def test_commit_writes_manifest_with_sizes_and_hashes(store):
    c = commit(store, 7, metrics={"val_loss": 2.5, "bad": float("nan"), "inf": float("inf"), "none": None}, config_fingerprint="abc",
               extra={"world_size": 2, "samples_in_epoch": 56})
    assert c.path == store.root / "step-00000007" and c.valid
    m = json.loads((c.path / "manifest.json").read_text())  # strict JSON: NaN became null
    assert m["format"] == st.FORMAT_VERSION and m["step"] == 7 and m["epoch"] == 0 and m["batch_in_epoch"] == 7
    assert m["reason"] == "interval" and m["config_fingerprint"] == "abc"
    assert m["metrics"] == {"val_loss": 2.5, "bad": None, "inf": None, "none": None}
    assert m["world_size"] == 2 and m["samples_in_epoch"] == 56
    assert m["format"] == 2 and m["files"] == [  # BLAKE3, computed here by the blake3 package itself
        {"path": rel, "size": len(data), "blake3": blake3.blake3(data).hexdigest()}
        for rel, data in sorted(FILES.items())
    ]
    assert [p.name for p in store.root.iterdir()] == ["step-00000007"]  # no tmp left behind
    assert store.check(c.path, full=True).valid
    assert c.size_bytes == sum(map(len, FILES.values())) + (c.path / "manifest.json").stat().st_size


def test_sha256_checkpoints_of_format_1_still_verify(store, tmp_path):
    """What trainsup wrote before BLAKE3 (format 1, sha256) is read and fully checked with sha256."""
    old = commit(CheckpointStore(store.root, hash_name="sha256"), 3)
    m = json.loads((old.path / "manifest.json").read_text())
    assert m["format"] == 1 and m["files"][0]["sha256"] == hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    assert store.check(old.path, full=True).valid and store.latest_valid(full=True).step == 3
    p = old.path / "model.safetensors"
    p.write_bytes(b"X" + p.read_bytes()[1:])  # same size: only the hash sees it
    bad = store.check(old.path, full=True)
    assert bad.code == st.HASH_MISMATCH and "(sha256 " in bad.problem


def test_blake3_checkpoint_without_blake3_is_unreadable_not_damaged(store, monkeypatch):
    c = commit(store, 4)
    monkeypatch.setattr("train_core.hashing._blake3", None)
    found = store.check(c.path, full=True)
    assert found.code == st.UNREADABLE_FILE and "pip install blake3" in found.problem
    assert store.check(c.path).valid  # the quick check needs no hash


def test_commit_order_files_synced_before_manifest_before_rename(store, monkeypatch):
    """fsync every file, manifest last (fsynced), fsync tmp dir, rename, fsync checkpoints/."""
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append("fsync " + Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    def rename(a, b):
        events.append(f"rename {Path(a).name} {Path(b).name}")
        real_rename(a, b)

    def fsync_dir(d):
        events.append("fsync_dir " + Path(d).name)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            real_fsync(fd)  # not the patched os.fsync: one event per directory
        finally:
            os.close(fd)

    tmp = store.begin(3)
    for rel, data in FILES.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(st, "fsync_dir", fsync_dir)
    store.commit(tmp, 3, epoch=0, batch_in_epoch=3, reason="x")
    file_syncs = {e for e in events[:3]}
    assert file_syncs == {"fsync model.safetensors", "fsync optimizer.bin", "fsync random_states_0.pkl"}
    assert events[3:] == [
        "fsync_dir sub",
        "fsync manifest.json",
        f"fsync_dir {tmp.name}",
        f"rename {tmp.name} step-00000003",
        "fsync_dir checkpoints",
    ]


def test_begin_is_not_listed_and_commit_refuses_to_overwrite_valid(store):
    tmp = store.begin(5)
    assert tmp.name == f".tmp-step-00000005-{os.getpid()}"
    assert store.scan() == [] and store.tmp_dirs() == [tmp]
    commit(store, 5)
    with pytest.raises(StoreError, match="already exists"):
        commit(store, 5)


def test_commit_replaces_an_invalid_checkpoint_of_the_same_step(store):
    c = commit(store, 5)
    (c.path / "manifest.json").unlink()
    c2 = commit(store, 5, files={"model.safetensors": b"new"})
    assert c2.valid and store.check(c2.path, full=True).valid
    assert not any(p.name.startswith(".tmp") for p in store.root.iterdir())


def test_scan_is_oldest_first_and_latest_valid_skips_invalid(store):
    for s in (30, 10, 20):
        commit(store, s)
    (store.root / "step-00000030" / "optimizer.bin").write_bytes(b"short")
    assert [c.step for c in store.scan()] == [10, 20, 30]
    assert store.latest_valid().step == 20


def test_latest_valid_full_skips_hash_damage_only_when_full(store):
    commit(store, 1)
    c = commit(store, 2)
    data = bytearray((c.path / "model.safetensors").read_bytes())
    data[100] ^= 1
    (c.path / "model.safetensors").write_bytes(bytes(data))
    assert store.latest_valid().step == 2  # quick: sizes match
    best = store.latest_valid(full=True)
    assert best.step == 1 and best.checked_hashes


def test_missing_or_empty_root_scans_empty(store):
    assert store.scan() == [] and store.latest_valid() is None and store.remove_stale_tmp() == []


@pytest.mark.parametrize("make", ["symlink", "file"])
def test_unusable_root_raises(tmp_path, make):
    root = tmp_path / "checkpoints"
    if make == "symlink":
        (tmp_path / "real").mkdir()
        root.symlink_to(tmp_path / "real")
    else:
        root.write_text("x")
    with pytest.raises(StoreError, match="symlink" if make == "symlink" else "not a directory"):
        CheckpointStore(root).scan()


# --------------------------------------------------------------------------- every invalid reason


def _remove(rel):
    return lambda c: (c / rel).unlink()


def _manifest(fn):
    return lambda c: edit_manifest(c, fn)


def _write_manifest(text):
    return lambda c: (c / "manifest.json").write_text(text)


def _flip_byte(c):
    p = c / "optimizer.bin"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the padding member: still a well-formed archive
    p.write_bytes(bytes(data))


def _symlinked_file(c):
    (c / "model.safetensors").unlink()
    (c / "model.safetensors").symlink_to(c.parent.parent / "outside.bin")


def _symlinked_subdir(c):
    import shutil

    shutil.move(str(c / "sub"), str(c.parent.parent / "elsewhere"))
    (c / "sub").symlink_to(c.parent.parent / "elsewhere")


def _symlinked_manifest(c):
    (c.parent.parent / "m.json").write_bytes((c / "manifest.json").read_bytes())
    (c / "manifest.json").unlink()
    (c / "manifest.json").symlink_to(c.parent.parent / "m.json")


def _set(key, value):
    return _manifest(lambda m: m.__setitem__(key, value))


def _first_file(key, value):
    return _manifest(lambda m: m["files"][0].__setitem__(key, value))


# (id, corruption of a committed step-00000005, expected code, text in the problem, found by the quick check)
INVALID_CASES = [
    ("missing manifest", _remove("manifest.json"), st.MISSING_MANIFEST, "missing manifest.json", True),
    ("missing file", _remove("optimizer.bin"), st.MISSING_FILE, "missing file: optimizer.bin", True),
    ("missing nested file", _remove("sub/random_states_0.pkl"), st.MISSING_FILE, "sub/random_states_0.pkl", True),
    ("size mismatch", lambda c: (c / "optimizer.bin").write_bytes(b"o" * 10), st.SIZE_MISMATCH,
     "size mismatch: optimizer.bin is 10 bytes, manifest says 6000", True),
    ("hash mismatch", _flip_byte, st.HASH_MISMATCH, "hash mismatch: optimizer.bin", False),
    ("unreadable manifest: not json", _write_manifest("{not json"), st.UNREADABLE_MANIFEST, "not valid JSON", True),
    ("unreadable manifest: not an object", _write_manifest("[1, 2]"), st.UNREADABLE_MANIFEST, "not a JSON object", True),
    ("unreadable manifest: binary", lambda c: (c / "manifest.json").write_bytes(b"\xff\xfe\x00"),
     st.UNREADABLE_MANIFEST, "unreadable manifest.json", True),
    ("unknown format: missing", _manifest(lambda m: m.pop("format")), st.UNKNOWN_FORMAT, "no integer 'format'", True),
    ("unknown format: string", _set("format", "1"), st.UNKNOWN_FORMAT, "no integer 'format'", True),
    ("unknown format: zero", _set("format", 0), st.UNKNOWN_FORMAT, "unknown manifest format 0", True),
    ("newer format", _set("format", st.FORMAT_VERSION + 1), st.NEWER_FORMAT,
     f"manifest format {st.FORMAT_VERSION + 1} is newer than this trainsup reads ({st.FORMAT_VERSION}): upgrade", True),
    ("lacks a key", _manifest(lambda m: m.pop("epoch")), st.BAD_MANIFEST, "manifest.json lacks epoch", True),
    ("files not a list", _set("files", {}), st.BAD_MANIFEST, "'files' is not a list", True),
    ("malformed file entry", _first_file("size", "big"), st.BAD_MANIFEST, "malformed file entry", True),
    ("step mismatch", _set("step", 6), st.STEP_MISMATCH, "manifest says step 6 but the directory is step-00000005", True),
    ("path outside: ..", _first_file("path", "../../outside.bin"), st.PATH_OUTSIDE, "outside the checkpoint", True),
    ("path outside: absolute", _first_file("path", "/etc/passwd"), st.PATH_OUTSIDE, "/etc/passwd", True),
    ("path outside: symlinked dir", _symlinked_subdir, st.PATH_OUTSIDE, "through a symlink", True),
    ("symlinked file", _symlinked_file, st.NOT_A_FILE, "model.safetensors is a symlink", True),
    ("symlinked manifest", _symlinked_manifest, st.SYMLINK, "manifest.json is a symlink", True),
]


@pytest.mark.parametrize("corrupt,code,text,quick", [c[1:] for c in INVALID_CASES], ids=[c[0] for c in INVALID_CASES])
def test_each_invalid_reason(store, corrupt, code, text, quick):
    commit(store, 4)
    c = commit(store, 5)
    (store.root.parent / "outside.bin").write_bytes(b"m" * 3000)  # a target for symlink cases
    corrupt(c.path)
    q = store.check(c.path)
    full = store.check(c.path, full=True)
    assert full.code == code and text in full.problem and not full.valid
    assert q.valid is not quick
    if quick:
        assert q.code == code and q.problem == full.problem
    # Whatever is wrong with the newest one, the store falls back to the previous one.
    assert store.latest_valid(full=True).step == 4
    assert st.PROBLEM_CODES.count(code) == 1


def test_duplicate_step_symlink_and_non_directory_entries(store, tmp_path):
    c = commit(store, 5)
    import shutil

    shutil.copytree(c.path, store.root / "step-5")  # the same step spelled twice
    (store.root / "step-00000009").symlink_to(c.path)  # a symlink that looks like a checkpoint
    (store.root / "step-00000011").write_text("not a dir")
    by_name = {x.path.name: x for x in store.scan(full=True)}
    assert by_name["step-00000005"].valid
    assert by_name["step-5"].code == st.DUPLICATE_STEP and by_name["step-5"].problem == \
        "duplicate step 5 (also step-00000005)"
    assert by_name["step-00000009"].code == st.SYMLINK and "symlink" in by_name["step-00000009"].problem
    assert by_name["step-00000011"].code == st.NOT_A_DIRECTORY
    assert store.latest_valid().path.name == "step-00000005"
    assert store.check(store.root / "notes").code == st.BAD_NAME


# --------------------------------------------------------------------------- stale tmp dirs


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_remove_stale_tmp_keeps_live_writers_and_removes_dead_ones(store, tmp_path):
    commit(store, 1)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        mk = {
            "live": store.root / f".tmp-{step_dir_name(2)}-{live.pid}",
            "dead": store.root / f".tmp-{step_dir_name(3)}-{dead}",
            "dead_del": store.root / f".tmp-del-{step_dir_name(1)}-{dead}",
            "own": store.root / f".tmp-{step_dir_name(4)}-{os.getpid()}",
        }
        for p in mk.values():
            (p / "sub").mkdir(parents=True)
            (p / "sub" / "optimizer.bin").write_bytes(b"x" * 100)
        (tmp_path / "target").mkdir()
        (tmp_path / "target" / "keep.txt").write_text("precious")
        link = store.root / f".tmp-{step_dir_name(5)}-{dead}"
        link.symlink_to(tmp_path / "target")
        removed = store.remove_stale_tmp()
        assert sorted(removed) == sorted([mk["dead"], mk["dead_del"], mk["own"]])
        assert mk["live"].exists() and not mk["dead"].exists() and not mk["dead_del"].exists()
        assert link.is_symlink() and (tmp_path / "target" / "keep.txt").read_text() == "precious"
        assert [c.step for c in store.scan()] == [1]
    finally:
        live.kill()
        live.wait()
    assert mk["live"] in store.remove_stale_tmp()  # its writer is gone now


# --------------------------------------------------------------------------- remove() is safe


def test_remove_deletes_a_checkpoint_but_not_what_its_symlinks_point_to(store, tmp_path):
    c = commit(store, 1)
    (tmp_path / "precious").write_text("keep me")
    (c.path / "link").symlink_to(tmp_path / "precious")
    (c.path / "dirlink").symlink_to(tmp_path)
    store.remove(c)
    assert not c.path.exists() and list(store.root.iterdir()) == []
    assert (tmp_path / "precious").read_text() == "keep me"


def test_remove_refuses_anything_outside_or_through_a_symlink(store, tmp_path):
    c = commit(store, 1)
    other = tmp_path / "other" / "checkpoints"
    outside = CheckpointStore(other)
    oc = commit(outside, 2)
    (tmp_path / "elsewhere").mkdir()
    target = commit(CheckpointStore(tmp_path / "elsewhere"), 3)
    (store.root / "step-00000003").symlink_to(target.path)
    (store.root / "notes.txt").write_text("mine")
    cases = [
        (oc.path, "not a checkpoint inside"),  # a checkpoint of another store
        (store.root / ".." / "checkpoints" / c.path.name, "not a checkpoint inside"),
        (store.root / "notes.txt", "not a checkpoint inside"),
        (store.root, "not a checkpoint inside"),
        (store.root / "step-00000003", "symlink"),
        (Path("/etc"), "not a checkpoint inside"),
    ]
    for path, text in cases:
        with pytest.raises(StoreError, match=text):
            store.remove(path)
    assert oc.path.exists() and c.path.exists() and (store.root / "notes.txt").exists()
    assert store.check(target.path, full=True).valid and (store.root / "step-00000003").is_symlink()


def test_remove_refuses_when_checkpoints_dir_is_a_symlink(tmp_path):
    real = CheckpointStore(tmp_path / "real")
    c = commit(real, 1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(tmp_path / "real")
    linked = CheckpointStore(tmp_path / "run" / "checkpoints")
    with pytest.raises(StoreError, match="symlink"):
        linked.remove(linked.root / c.path.name)
    with pytest.raises(StoreError, match="symlink"):
        linked.scan()
    assert real.check(c.path, full=True).valid
