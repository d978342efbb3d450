"""OOM back-off with 2 CPU ranks (gloo) through `accelerate launch`, end to end.

Only rank 0 runs out of memory (tests/scripts/gpu_oom_train.py --oom-rank 0); rank 1 is then
left in, or on its way into, a collective with a dead peer. The attempt must still count as
an out-of-memory exit (not a hang, not a plain error), and the next attempt must run the
halved micro-batch with doubled accumulation on BOTH ranks, resume from the newest checkpoint
and train exactly the samples an uninterrupted 2-rank run sees at each step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor_helpers import REPO, events, finish, run_cli, run_processes, start_supervisor, write_job

OOM_TRAIN = REPO / "tests" / "scripts" / "gpu_oom_train.py"
RANKS = 2
DATASET = 32  # rows; 4 optimizer steps per epoch at 2 ranks x 4 samples per rank and step
STEPS = 8  # 2 epochs
SHAPE = ["--steps", str(STEPS), "--dataset-size", str(DATASET), "--save-every", "2", "--eval-every", "0",
         "--hidden", "8"]


def sample_log(path: Path) -> dict[tuple[int, int, int], list[float]]:
    """Rows trained, by (attempt, rank, step), in the order the rank saw them."""
    out: dict[tuple[int, int, int], list[float]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.setdefault((rec["attempt"], rec["rank"], rec["step"]), []).extend(rec["rows"])
    return out


def shapes(path: Path) -> dict[tuple[int, int], set[tuple[int, int]]]:
    """(micro_batch, grad_accum) each rank trained with, by (attempt, rank)."""
    out: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.setdefault((rec["attempt"], rec["rank"]), set()).add((rec["micro_batch"], rec["grad_accum"]))
    return out


def job_for(tmp: Path, args: list[str]) -> Path:
    tmp.mkdir(exist_ok=True)
    return write_job(tmp, [*args, *SHAPE], script=OOM_TRAIN, launch={"num_processes": RANKS},
                     # a hang would be caught here, well before the test's own timeout
                     watch={"hang_timeout_s": 20.0, "startup_timeout_s": 40.0})


def per_step(by: dict[tuple[int, int, int], list[float]], attempts: set[int]) -> dict[int, list[float]]:
    """Rows of each step over both ranks, as the LAST of `attempts` that trained the step left them."""
    out: dict[int, dict[int, list[float]]] = {}
    for (attempt, rank, step), rows in sorted(by.items()):
        if attempt in attempts:
            out.setdefault(step, {})[rank] = rows  # a later attempt's copy of a step replaces the earlier one
    return {step: sorted(r for rows in ranks.values() for r in rows) for step, ranks in out.items()}


@pytest.mark.slow
def test_one_rank_oom_with_two_ranks_backs_off_on_both_and_resumes_exactly(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    log = tmp_path / "samples.jsonl"
    # 4 x 1 per rank fits until step 3; from then on rank 0 only fits micro-batches of 2: 4x1 -> 2x2.
    job = job_for(tmp_path, ["--fit", "2", "--oom-from-step", "3", "--oom-rank", "0", "--sample-log", str(log),
                             "--micro-batch", "4", "--grad-accum", "1"])
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)
    assert finish(sup, 150) == 0, (tmp_path / "sup.log").read_text()[-3000:]
    assert run_processes(run_dir) == []

    ev = events(run_dir)
    exits = [e for e in ev if e["event"] == "attempt_exit"]
    assert [e["kind"] for e in exits] == ["oom", "finished"], exits
    assert exits[0]["detail"].startswith("rank 0 ran out of memory (micro_batch=4, grad_accum=1)")
    assert not [e for e in ev if e["event"] == "hung"]
    backoffs = [e for e in ev if e["event"] == "oom_backoff"]
    assert [(e["old"], e["new"], e["effective_batch_per_rank"]) for e in backoffs] == [
        ({"micro_batch": 4, "grad_accum": 1}, {"micro_batch": 2, "grad_accum": 2}, 4)]
    starts = [e for e in ev if e["event"] == "state" and e["to"] == "starting"]
    # the OOM hit step 3: the newest checkpoint then was step 2
    assert [Path(e["resume_from"]).name if e.get("resume_from") else None for e in starts] == [None, "step-00000002"]

    # Both ranks ran each attempt with its shape (the environment reached rank 1 too).
    assert shapes(log) == {(1, 0): {(4, 1)}, (1, 1): {(4, 1)}, (2, 0): {(2, 2)}, (2, 1): {(2, 2)}}

    manifest = json.loads((run_dir / "checkpoints" / f"step-{STEPS:08d}" / "manifest.json").read_text())
    assert (manifest["micro_batch"], manifest["grad_accum"], manifest["world_size"]) == (2, 2, RANKS)
    assert manifest["samples_seen"] == STEPS * 4 * RANKS
    r = run_cli("status", str(run_dir))
    assert "batch:           micro-batch 2 x 2 accumulation x 2 rank(s) = 8 samples/step (OOM back-off)" in r.stdout

    # Sample-exact: each step of the final run trained 8 rows over the 2 ranks, each rank 4; a
    # step done at 4 x 1 and redone at 2 x 2 trained the very same rows; each epoch saw every
    # row exactly once across the ranks.
    by = sample_log(log)
    final = per_step(by, {1, 2})
    assert sorted(final) == list(range(STEPS))
    assert all(len(rows) == 4 * RANKS for rows in final.values())
    assert all(len(by[(2, rank, step)]) == 4 for rank in range(RANKS) for step in range(2, STEPS))
    first, second = per_step(by, {1}), per_step(by, {2})
    assert sorted(second) == list(range(2, STEPS))  # resumed at step 2: nothing before it redone
    assert first[2] == second[2]
    for epoch in range(STEPS * 4 * RANKS // DATASET):
        steps_per_epoch = DATASET // (4 * RANKS)
        rows = [r for s in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch) for r in final[s]]
        assert len(rows) == DATASET and len(set(rows)) == DATASET

    # The uninterrupted 2-rank run at the smaller shape: from the resume on, each rank trained
    # the very rows (in the same order) it trained there; before it, the same rows per step.
    ref_log = tmp_path / "ref" / "samples.jsonl"
    ref_job = job_for(tmp_path / "ref", ["--fit", "2", "--sample-log", str(ref_log), "--micro-batch", "2",
                                         "--grad-accum", "2"])
    cleanup[0].append(tmp_path / "ref" / "run")
    r = run_cli("run", str(ref_job), timeout=150)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = sample_log(ref_log)
    assert {(rank, step) for _, rank, step in ref} == {(rank, step) for rank in range(RANKS) for step in range(STEPS)}
    assert per_step(ref, {1}) == final
    for rank in range(RANKS):
        for step in range(2, STEPS):
            assert by[(2, rank, step)] == ref[(1, rank, step)], (rank, step)
