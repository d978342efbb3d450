"""What does the atomic commit cost on top of writing the checkpoint's bytes?

For each checkpoint size (default 100 MB and 1 GB; model.safetensors : optimizer.bin = 1 : 2,
plus two small files, like accelerator.save_state writes), median of --reps runs of:

  plain        write the files, no fsync (what accelerate's save_state does: not durable)
  plain+fsync  write the files, fsync each and the directory (a durable plain write)
  commit       write the files into store.begin()'s tmp dir, then store.commit():
               sha256 + fsync of every file (overlapped in threads), manifest, renames
  commit: hash only / fsync only   the commit's two parts alone (they overlap in commit)
  hash-in-writer  (what-if) the writer hashes each buffer before writing it, then fsync:
               what a store-provided writer could save; accelerate writes its own files,
               so the store re-reads them instead

and the ratios commit/plain and commit/plain+fsync (target: commit adds < 25%), from the
median and from the fastest run (the least disturbed by other processes on a shared box).
Where the time goes: sha256 (~1.6 GB/s per core with SHA-NI) is the whole overhead; fsync
runs in other threads while files hash, and the files hash in parallel, so on 2 cores the
commit is bounded by hashing the biggest file (optimizer.bin, 2/3 of the bytes).
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
    results: dict[str, list[float]] = {k: [] for k in ("plain", "plain+fsync", "commit", "hash-in-writer",
                                                       "commit: hash only", "commit: fsync only")}
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

        store = st.CheckpointStore(work / "checkpoints")

        def commit():
            tmp = store.begin(rep)
            write_files(tmp, files, data, fsync=False)
            store.commit(tmp, rep, epoch=0, batch_in_epoch=rep, reason="bench", metrics={"val_loss": 1.0})

        results["commit"].append(timed(commit))
        assert store.latest_valid().step == rep

        d3 = work / "hw"
        d3.mkdir()

        def hash_in_writer():
            write_files(d3, files, data, fsync=True, hasher=True)

        results["hash-in-writer"].append(timed(hash_in_writer))

        # The commit's two parts alone, on files already written and synced (page cache warm).
        paths = [d2 / n for n in files]
        t = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(st._hash_file, paths))
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

                print(f"  [{stat}] commit adds {pct('commit', 'plain')} to a plain write (no fsync), "
                      f"{pct('commit', 'plain+fsync')} to a durable plain write (write + fsync); "
                      f"a hashing writer + fsync adds {pct('hash-in-writer', 'plain+fsync')} to the latter")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
