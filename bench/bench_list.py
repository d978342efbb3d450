"""Wall time of `trainsup checkpoints list RUN_DIR` (a real CLI subprocess) on 1,000 checkpoints.

Target: < 1 s (quick validation only: manifest parsed, every file's size checked).
Each checkpoint has the files accelerator.save_state writes for one rank (small here:
the quick check reads only manifests and stats files, so sizes do not matter).
Uses the installed `trainsup` script when there is one, else `python -c` on this checkout.

Run: PYTHONPATH=. python bench/bench_list.py [--count 1000] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_core.store import CheckpointStore  # noqa: E402

FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json")


def make(run_dir: Path, count: int) -> None:
    store = CheckpointStore(run_dir / "checkpoints")
    for i in range(count):
        step = (i + 1) * 100
        tmp = store.begin(step)
        for name in FILES:
            (tmp / name).write_bytes(name.encode() * (i % 7 + 1))
        store.commit(tmp, step, epoch=i // 50, batch_in_epoch=i % 50, reason="interval",
                     metrics={"val_loss": 3.0 - i / count, "acc": i / count})
    # a few broken ones, as a real run dir may have
    (store.root / "step-00000500" / "optimizer.bin").unlink()
    (store.root / "step-00000900" / "manifest.json").write_text("{")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-list-"))
    try:
        t = time.perf_counter()
        make(base / "run", args.count)
        print(f"made {args.count} checkpoints in {time.perf_counter() - t:.1f} s under {base}")
        exe = shutil.which("trainsup")
        prefix = [exe] if exe else [sys.executable, "-c", "from supervisor.cli import main; main()"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for label, extra in (("list", []), ("list --json", ["--json"])):
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                p = subprocess.run([*prefix, "checkpoints", "list", str(base / "run"), *extra],
                                   capture_output=True, text=True, env=env)
                times.append(time.perf_counter() - t)
                assert p.returncode == 0, p.stderr
            if extra:
                doc = json.loads(p.stdout)
                assert doc["count"] == args.count and doc["invalid"] == 2
            else:
                assert len(p.stdout.splitlines()) == args.count + 2
            print(f"trainsup checkpoints {label} ({args.count} checkpoints): median {statistics.median(times):.3f} s, "
                  f"min {min(times):.3f} s, max {max(times):.3f} s  (target < 1 s)")
        t = time.perf_counter()
        p = subprocess.run([*prefix, "--version"], capture_output=True, text=True, env=env)
        print(f"for scale, `trainsup --version` (interpreter + imports): {time.perf_counter() - t:.3f} s")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
