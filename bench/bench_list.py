"""Wall time of `trainsup checkpoints list RUN_DIR` (a real CLI subprocess) on 1,000 checkpoints.

Target: < 1 s (quick validation: manifest parsed, every file's size checked, and every
pickled file's imports scanned against the allow-list, train_core/safeload.py).
Each checkpoint holds the real files of one accelerator.save_state of the toy model
(tests/scripts/toy_train.py: optimizer.bin, scheduler.bin, random_states_0.pkl,
custom_checkpoint_0.pkl, ...), so the pickle scan reads what it reads in a real run.
Measured side by side: the same list with TRAINSUP_TRUST_PICKLE=1 (no scan).
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


def real_files(base: Path) -> dict[str, bytes]:
    """The files of one real checkpoint of the toy model (a plain run of tests/scripts/toy_train.py)."""
    run = base / "toy"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "toy_train.py"), "--run-dir", str(run),
                    "--steps", "2"], check=True, env=env, capture_output=True)
    ckpt = CheckpointStore(run / "checkpoints").latest_valid()
    return {f["path"]: (ckpt.path / f["path"]).read_bytes() for f in ckpt.manifest["files"]}


def make(run_dir: Path, count: int, files: dict[str, bytes]) -> None:
    store = CheckpointStore(run_dir / "checkpoints")
    for i in range(count):
        step = (i + 1) * 100
        tmp = store.begin(step)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
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
        make(base / "run", args.count, real_files(base))
        print(f"made {args.count} checkpoints in {time.perf_counter() - t:.1f} s under {base}")
        exe = shutil.which("trainsup")
        prefix = [exe] if exe else [sys.executable, "-c", "from supervisor.cli import main; main()"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        medians = {}
        runs = (("list", [], {}), ("list --json", ["--json"], {}),
                ("list, scan off (TRAINSUP_TRUST_PICKLE=1)", [], {"TRAINSUP_TRUST_PICKLE": "1"}))
        for label, extra, more_env in runs:
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                p = subprocess.run([*prefix, "checkpoints", "list", str(base / "run"), *extra],
                                   capture_output=True, text=True, env={**env, **more_env})
                times.append(time.perf_counter() - t)
                assert p.returncode == 0, p.stderr
            if extra:
                doc = json.loads(p.stdout)
                assert doc["count"] == args.count and doc["invalid"] == 2
            else:
                assert len(p.stdout.splitlines()) == args.count + 2
            medians[label] = statistics.median(times)
            print(f"trainsup checkpoints {label} ({args.count} checkpoints): median {statistics.median(times):.3f} s, "
                  f"min {min(times):.3f} s, max {max(times):.3f} s  (target < 1 s)")
        print(f"the pickle scan costs {medians['list'] / medians[runs[2][0]]:.2f}x the list without it")
        t = time.perf_counter()
        p = subprocess.run([*prefix, "--version"], capture_output=True, text=True, env=env)
        print(f"for scale, `trainsup --version` (interpreter + imports): {time.perf_counter() - t:.3f} s")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
