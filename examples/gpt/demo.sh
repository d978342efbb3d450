#!/usr/bin/env bash
# From a fresh clone: install what is missing, train the tiny GPT under trainsup, list its
# checkpoints, print a sample, draw the report. A few minutes on 2 CPU cores; nothing to
# download but the Python packages.
#
#   bash examples/gpt/demo.sh
#
# Ctrl-C (or a SIGTERM) saves a checkpoint and stops; run the same command again and training
# resumes exactly where it stopped. Once finished, running it again only prints the results.
# PYTHON=/path/to/python picks the interpreter (default: python3).
set -euo pipefail

cd "$(dirname "$0")/../.."   # the repo root
PY=${PYTHON:-python3}
JOB=examples/gpt/job.toml

say() { printf '[demo] %s\n' "$*"; }

# torch first, pinned: left to resolve it from the project's unpinned "torch", pip would
# pull a multi-GB CUDA build. An installed torch (any version) is kept.
if ! "$PY" -c "import torch" 2>/dev/null; then
  say "installing torch==2.13.0 ..."
  "$PY" -m pip install torch==2.13.0
fi
# with the extras the demo uses: TensorBoard curves, and matplotlib for `trainsup report`
if ! "$PY" -c "import supervisor.cli, train_core, accelerate, tokenizers, tqdm, tensorboard, matplotlib" 2>/dev/null; then
  say "installing trainsup (pip install -e '.[plot,tensorboard]') ..."
  "$PY" -m pip install -e '.[plot,tensorboard]'
fi

# `trainsup`, through this interpreter: a `trainsup` on PATH may belong to another Python.
trainsup() { "$PY" -m supervisor "$@"; }

say "trainsup run $JOB   (Ctrl-C saves and stops; run this script again to resume)"
start_s=$(date +%s)
set +e
trainsup run "$JOB"
rc=$?
set -e
if [ "$rc" -eq 75 ]; then
  say "stopped with a checkpoint saved; run 'bash examples/gpt/demo.sh' again to resume"
  exit 75
elif [ "$rc" -ne 0 ]; then
  say "trainsup run exited $rc; see the attempt logs in runs/gpt-tiny/logs/"
  exit "$rc"
fi
say "training finished in $(( $(date +%s) - start_s )) s"

echo
say "trainsup checkpoints list $JOB"
trainsup checkpoints list "$JOB"

echo
say "val loss by step (runs/gpt-tiny/metrics.jsonl):"
"$PY" - <<'EOF'
import json
seen = {}
for line in open("runs/gpt-tiny/metrics.jsonl"):
    try:
        rec = json.loads(line)
    except ValueError:  # a torn last line (a killed run)
        continue
    if isinstance(rec, dict) and isinstance(rec.get("val_loss"), (int, float)):  # the evaluations' lines
        seen[rec["step"]] = rec["val_loss"]  # a step evaluated twice (after a crash): the last one
print("  " + "  ".join(f"step {s}: {v:.3f}" for s, v in sorted(seen.items())))
EOF

echo
say "sample from the trained model (runs/gpt-tiny/sample.txt):"
cat runs/gpt-tiny/sample.txt

echo
say "trainsup report $JOB   (the loss curve, every stop, where the time went)"
trainsup report "$JOB"
say "curves: tensorboard --logdir runs/gpt-tiny   (then open http://localhost:6006)"
