"""What does the atomic commit cost on top of writing the checkpoint's bytes?

For each checkpoint size (default 100 MB and 1 GB; model.safetensors : optimizer.bin = 1 : 2,
plus two small files, like accelerator.save_state writes), median of --reps runs of:

  plain        write the files, no fsync (what accelerate's save_state does: not durable)
  plain+fsync  write the files, fsync each and the directory (a durable plain write)
  commit       write the files into store.begin()'s tmp dir, then store.commit():
               BLAKE3 + fsync of every file (overlapped in threads), manifest, renames
  commit sha256  the same with sha256 (manifest format 1, what trainsup wrote before BLAKE3)
  commit: hash only / fsync only   the commit's two parts alone (they overlap in commit)
  hash-in-writer  (what-if) the writer hashes each buffer before writing it, then fsync:
               what a store-provided writer could save; accelerate writes its own files,
               so the store re-reads them instead

and the ratios commit/plain+fsync and commit/plain (target: commit <= 1.25x a durable plain
write), from the median and from the fastest run (the least disturbed by other processes on a
shared box). Where the time goes: hashing is the whole overhead; fsync runs in other threads
while files hash, and the files hash in parallel. sha256 (~1.6 GB/s per core with SHA-NI)
bounds the commit by hashing the biggest file (optimizer.bin, 2/3 of the bytes); BLAKE3 is
several times faster and also spreads one file over the cores.
`os.sync()` runs before every timed run so one run's writeback does not land in the next.

Run: PYTHONPATH=. python bench/bench_commit.py [--sizes-mb 100,1000] [--reps 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_core import store as st  # noqa: E402
from train_core.runfiles import fsync_dir  # noqa: E402

CHUNK = 8 << 20


def layout(total: int) -> dict[str, int]:
    small = {"random_states_0.pkl": 16_000, "scheduler.bin": 1_000}
    big = total - sum(small.values())
    return {"model.safetensors": big // 3, "optimizer.bin": big - big // 3, **small}


def write_files(d: Path, files: dict[str, int], data: memoryview, *, fsync: bool, hasher: bool = False) -> dict:
    """Write `files` from `data`; with `hasher`, a second thread hashes each chunk while it is
    written (hashlib and write() both release the GIL), i.e. a pipelined hashing writer."""
    digests = {}
    pool = ThreadPoolExecutor(1) if hasher else None
    for name, size in files.items():
        h = hashlib.sha256() if hasher else None
        pending = None
        with open(d / name, "wb", buffering=0) as f:
            off = 0
            while off < size:
                n = min(CHUNK, size - off)
                start = off % (len(data) - CHUNK)
                buf = data[start: start + n]
                if h:
                    if pending:
                        pending.result()
                    pending = pool.submit(h.update, buf)
                f.write(buf)
                off += n
            if pending:
                pending.result()
            if fsync:
                os.fsync(f.fileno())
        if h:
            digests[name] = h.hexdigest()
    if pool:
        pool.shutdown()
    if fsync:
        fsync_dir(d)
    return digests


def timed(fn) -> float:
    os.sync()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_size(base: Path, total: int, reps: int, data: memoryview) -> dict[str, float]:
    files = layout(total)
    results: dict[str, list[float]] = {k: [] for k in ("plain", "plain+fsync", "commit", "commit sha256",
                                                       "hash-in-writer", "commit: hash only", "commit: fsync only")}
    for rep in range(reps):
        work = base / f"r{rep}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()

        d = work / "plain"
        d.mkdir()
        results["plain"].append(timed(lambda: write_files(d, files, data, fsync=False)))

        d2 = work / "durable"
        d2.mkdir()
        results["plain+fsync"].append(timed(lambda: write_files(d2, files, data, fsync=True)))

        store = st.CheckpointStore(work / "checkpoints", trust_pickle=True)  # random bytes: no torch archive

        def commit():
            tmp = store.begin(rep)
            write_files(tmp, files, data, fsync=False)
            store.commit(tmp, rep, epoch=0, batch_in_epoch=rep, reason="bench", metrics={"val_loss": 1.0})

        results["commit"].append(timed(commit))
        assert store.latest_valid().step == rep
        sha = st.CheckpointStore(work / "checkpoints-sha256", hash_name="sha256", trust_pickle=True)  # format 1

        def commit_sha256():
            tmp = sha.begin(rep)
            write_files(tmp, files, data, fsync=False)
            sha.commit(tmp, rep, epoch=0, batch_in_epoch=rep, reason="bench", metrics={"val_loss": 1.0})

        results["commit sha256"].append(timed(commit_sha256))
        assert sha.latest_valid(full=True).step == rep

        d3 = work / "hw"
        d3.mkdir()

        def hash_in_writer():
            write_files(d3, files, data, fsync=True, hasher=True)

        results["hash-in-writer"].append(timed(hash_in_writer))

        # The commit's two parts alone, on files already written and synced (page cache warm).
        paths = [d2 / n for n in files]
        t = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: st._hash_file(p, store.hash_name), paths))
        results["commit: hash only"].append(time.perf_counter() - t)
        d4 = work / "fs"
        d4.mkdir()
        write_files(d4, files, data, fsync=False)
        t = time.perf_counter()
        for p in files:
            st._fsync_file(d4 / p)
        results["commit: fsync only"].append(time.perf_counter() - t)
        shutil.rmtree(work)
    return {k: (statistics.median(v), min(v)) for k, v in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", default="100,1000")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir; use the disk you train on)")
    args = ap.parse_args()
    sizes = [int(float(s) * 1_000_000) for s in args.sizes_mb.split(",")]
    data = memoryview(os.urandom(min(max(sizes), 256 << 20) + CHUNK))  # incompressible, reused
    base = Path(tempfile.mkdtemp(prefix="bench-commit-", dir=args.dir))
    print(f"dir={base} cpus={os.cpu_count()} reps={args.reps} (median seconds)")
    try:
        for total in sizes:
            r = run_size(base, total, args.reps, data)
            mb = total / 1e6
            print(f"\n{mb:.0f} MB checkpoint ({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in layout(total).items())})")
            print(f"  {'':<20} {'median':>8}  {'min':>8}  {'MB/s (median)':>13}")
            for k, (med, low) in r.items():
                print(f"  {k:<20} {med:7.3f}s  {low:7.3f}s  {mb / med:13.0f}")
            for i, stat in ((0, "median"), (1, "min")):
                def pct(a, b):
                    return f"{100 * (r[a][i] / r[b][i] - 1):+.0f}%"

                def ratio(a, b):
                    return f"{r[a][i] / r[b][i]:.2f}x"

                print(f"  [{stat}] commit ({st.WRITE_HASH}) = {ratio('commit', 'plain+fsync')} a durable plain "
                      f"write (write + fsync), {ratio('commit', 'plain')} a plain write (no fsync); with sha256 "
                      f"{ratio('commit sha256', 'plain+fsync')}; a hashing writer + fsync "
                      f"{ratio('hash-in-writer', 'plain+fsync')}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
