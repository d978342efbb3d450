"""The default GPT job's training script: real processes end to end, and bad input.

End to end (slow): the shipped examples/gpt/job.toml, shortened with --set (tiny model, a
~180 KB corpus of a few stdlib files, 120 steps over ~2 epochs, the job's mixed_precision "auto"), through
`trainsup run` with accelerate launch and 1 CPU process. One run is stopped by SIGTERM to the
supervisor mid-epoch and run again; its final checkpoint must equal an uninterrupted run's bit
for bit, and its val loss must have fallen below the step-0 value.

Bad input (fast): train.py run plainly must exit 2 with a one-line error before training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from supervisor_helpers import CLI, REPO, env, events, finish, kill_run, read_json, run_processes, wait_for
from train_core.manifest import hash_name
from train_core.metricslog import read_metrics
from train_core.store import CheckpointStore

TRAIN = REPO / "examples" / "gpt" / "train.py"
JOB = REPO / "examples" / "gpt" / "job.toml"
STREAM_JOB = REPO / "examples" / "gpt" / "job-stream.toml"
LAPTOP_JOB = REPO / "examples" / "gpt" / "job-laptop-gpu.toml"
CORPUS_FILES = ("argparse.py", "textwrap.py", "shlex.py", "heapq.py", "calendar.py")  # ~180 KB
MAX_STEPS = 120


def short_args(corpus: Path, cache: Path) -> list[str]:
    # ~55 optimizer steps per epoch (micro-batch 8 x accum 2 of 64 tokens): 120 steps cross two
    # epoch boundaries. Dropout on, so the RNG state must come back exactly on resume.
    return ["--corpus", str(corpus), "--cache-dir", str(cache), "--vocab-size", "512", "--block-size", "64",
            "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--dropout", "0.1",
            "--micro-batch", "8", "--grad-accum", "2", "--max-steps", str(MAX_STEPS), "--warmup-steps", "10",
            "--eval-every", "40", "--eval-batches", "4", "--save-every", "50", "--sample-tokens", "16"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CORPUS_FILES:
        shutil.copy(stdlib / name, root / name)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run_job(run_dir: Path, args: list[str], log: Path, job: Path = JOB) -> subprocess.Popen:
    """`trainsup run` on a shipped job file, shortened by --set; its own session (a
    scheduler's SIGTERM reaches the supervisor only)."""
    sets = ["--set", f"train.args={json.dumps(args)}", "--set", "restart.backoff_initial_s=0.2",
            "--set", "watch.poll_interval_s=0.1"]
    return subprocess.Popen([*CLI, "run", str(job), "--run-dir", str(run_dir), *sets], env=env(),
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)



def final_checkpoint(run_dir: Path, step: int = MAX_STEPS):
    ckpt = CheckpointStore(run_dir / "checkpoints").latest_valid(full=True)
    assert ckpt is not None and ckpt.step == step and ckpt.reason == "final", ckpt
    return ckpt


def file_hashes(ckpt) -> dict[str, str]:
    """The hash of every file of the checkpoint, from its manifest (checked against the files above)."""
    return {f["path"]: f[hash_name(ckpt.manifest)] for f in ckpt.manifest["files"]}


def val_losses(run_dir: Path) -> dict[int, float]:
    """The evaluations' lines of metrics.jsonl (the session writes a line per step too)."""
    return {rec["step"]: rec["val_loss"] for rec in read_metrics(run_dir / "metrics.jsonl")
            if rec["kind"] == "metrics" and "val_loss" in rec}


@pytest.fixture(scope="module")
def uninterrupted(corpus, cache, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("uninterrupted")
    run_dir = d / "run"
    try:
        proc = run_job(run_dir, short_args(corpus, cache), d / "sup.log")
        assert finish(proc) == 0, (d / "sup.log").read_text()[-4000:]
    finally:
        kill_run(run_dir)
    return {"run_dir": run_dir, "hashes": file_hashes(final_checkpoint(run_dir)), "log": d / "sup.log"}


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, corpus, cache, uninterrupted):
    run_dir = tmp_path / "run"
    args = short_args(corpus, cache)
    try:
        sup = run_job(run_dir, args, tmp_path / "sup1.log")
        # a heartbeat from a training step > 0: the model, optimizer and EMA all have state to lose
        wait_for(lambda: (read_json(run_dir / "status.json") or {}).get("step", 0) > 0, 90, "a step > 0")
        os.kill(sup.pid, signal.SIGTERM)
        assert finish(sup) == 75, (tmp_path / "sup1.log").read_text()[-4000:]
        assert run_processes(run_dir) == []
        stop = CheckpointStore(run_dir / "checkpoints").latest_valid(full=True)
        assert stop is not None and stop.reason == "preempt", stop
        assert 0 < stop.step < MAX_STEPS
        # mid-epoch: the resume must skip the consumed part of the epoch, not start a new one
        assert stop.manifest["batch_in_epoch"] > 0 and not stop.manifest["epoch_complete"], stop.manifest

        sup2 = run_job(run_dir, args, tmp_path / "sup2.log")
        assert finish(sup2) == 0, (tmp_path / "sup2.log").read_text()[-4000:]
    finally:
        kill_run(run_dir)
    out = (tmp_path / "sup2.log").read_text()
    m = stop.manifest
    # "auto" chose by hardware at the first start, the stop checkpoint records it, the resume keeps it
    chose = m["mixed_precision"]
    assert f"mixed precision auto -> {chose} (" in (tmp_path / "sup1.log").read_text()
    assert f"mixed precision auto -> {chose} (kept from {stop.path.name}" in out
    assert f"resumed at step {stop.step} (epoch {m['epoch']}, batch {m['batch_in_epoch']})" in out
    starts = [e for e in events(run_dir) if e["event"] == "state" and e["to"] == "starting"]
    assert [s.get("resume_from") for s in starts] == [None, str(stop.path)]

    # The model, optimizer, EMA, LR schedule, RNG states and position: bit for bit.
    hashes = file_hashes(final_checkpoint(run_dir))
    assert "model.safetensors" in hashes and "optimizer.bin" in hashes
    assert hashes == uninterrupted["hashes"]
    assert (run_dir / "sample.txt").read_text() == (uninterrupted["run_dir"] / "sample.txt").read_text()

    losses = val_losses(run_dir)
    assert set(losses) == {0, 40, 80, 120}, losses
    assert losses[MAX_STEPS] < losses[0] - 0.5, losses  # from ~ln(512) = 6.2: clearly learning
    assert losses == val_losses(uninterrupted["run_dir"])


@pytest.mark.slow
def test_the_stream_job_stopped_mid_epoch_resumes_from_its_position_bit_for_bit(tmp_path, corpus, cache):
    """examples/gpt/job-stream.toml (TokenStream, 1 DataLoader worker), shortened the same way."""
    args = [*short_args(corpus, cache), "--stream", "--num-workers", "1", "--max-steps", "70", "--save-every", "0",
            "--eval-every", "0"]
    ref = tmp_path / "ref"
    try:
        assert finish(run_job(ref / "run", args, tmp_path / "ref.log", STREAM_JOB)) == 0
        run_dir = tmp_path / "run"
        sup = run_job(run_dir, args, tmp_path / "sup1.log", STREAM_JOB)
        wait_for(lambda: (read_json(run_dir / "status.json") or {}).get("step", 0) >= 20, 90, "step 20")
        os.kill(sup.pid, signal.SIGTERM)
        assert finish(sup) == 75, (tmp_path / "sup1.log").read_text()[-4000:]
        stop = CheckpointStore(run_dir / "checkpoints").latest_valid(full=True)
        assert stop.manifest["batch_in_epoch"] > 0 and not stop.manifest["epoch_complete"], stop.manifest
        assert "stream_state.pt" in file_hashes(stop)
        assert finish(run_job(run_dir, args, tmp_path / "sup2.log", STREAM_JOB)) == 0
    finally:
        kill_run(ref / "run")
        kill_run(tmp_path / "run")
    assert "re-reading" not in (tmp_path / "sup2.log").read_text()
    assert file_hashes(final_checkpoint(run_dir, 70)) == file_hashes(final_checkpoint(ref / "run", 70))


# --------------------------------------------------------------------------- bad input


def run_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINSUP_", "ACCELERATE_"))}
    e["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, str(TRAIN), "--run-dir", str(tmp_path / "run"), *args], env=e,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.slow
def test_tensorboard_curves_continue_after_a_crash_past_the_last_checkpoint(tmp_path, corpus, cache):
    """Attempt 1 logged steps 1..30; the newest checkpoint that survives is step 20 (step 30's is
    removed: as if the process had died after logging steps 21..30 and before saving them).
    Attempt 2 recomputes 21..30: every curve has each step once, the recomputed points are
    attempt 2's, and the resume is noted at step 20."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [*short_args(corpus, cache), "--max-steps", "30", "--save-every", "10", "--eval-every", "10",
            "--log-every", "1", "--sample-tokens", "0", "--tensorboard", "on"]
    first = run_train(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    shutil.rmtree(store.latest_valid().path)
    assert store.latest_valid().step == 20
    resumed_at = time.time()
    second = run_train(tmp_path, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at step 20" in second.stdout

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/loss", "val/ppl"} <= set(acc.Tags()["scalars"])
    for tag, expected in (("train/loss", list(range(1, 31))), ("val/loss", [0, 10, 20, 30])):
        points = acc.Scalars(tag)
        assert [p.step for p in points] == expected, tag
        assert all(p.wall_time >= resumed_at for p in points if p.step > 20), tag  # attempt 2's points
        assert all(p.wall_time < resumed_at for p in points if p.step <= 20), tag
    assert [e.step for e in acc.Tensors("resume/text_summary")] == [20]


def assert_usage_error(tmp_path: Path, proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, exactly one error line (no traceback) holding every fragment, nothing trained."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not (tmp_path / "run").exists()  # no session started: no checkpoint, no status
    return errors[0]


def test_tensorboard_on_without_the_package_stops_before_training(tmp_path, corpus, cache, monkeypatch):
    blocker = tmp_path / "block"
    (blocker / "tensorboard").mkdir(parents=True)
    (blocker / "tensorboard" / "__init__.py").write_text("raise ImportError('tensorboard blocked by the test')\n")
    monkeypatch.setenv("PYTHONPATH", f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = run_train(tmp_path, "--corpus", str(corpus), "--cache-dir", str(cache), "--tensorboard", "on")
    assert_usage_error(tmp_path, proc, "--tensorboard on: the tensorboard package is missing",
                       "pip install tensorboard")


def test_corpus_path_missing(tmp_path, cache):
    proc = run_train(tmp_path, "--corpus", "no/such/folder", "--cache-dir", str(cache))
    assert_usage_error(tmp_path, proc, f"corpus path {tmp_path / 'no/such/folder'} does not exist",
                       "pass an existing text file or folder")


@pytest.mark.parametrize("contents", [{}, pytest.param({"a.bin": b"\x00\x01\x02" * 100, "b.png": b"\x89PNG\r\n\x1a\n\x00"},
                                                  marks=pytest.mark.slow)],  # the fast lane keeps one of the two
                         ids=["empty-folder", "binary-files-only"])
def test_corpus_without_text(tmp_path, cache, contents):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    proc = run_train(tmp_path, "--corpus", str(folder), "--cache-dir", str(cache))
    assert_usage_error(tmp_path, proc, f"corpus folder {folder} holds no text files", "name a folder of text files")


@pytest.mark.slow  # a demo process each (~2.5 s): out of the fast lane
def test_vocab_size_the_tokenizer_cannot_reach(tmp_path, corpus, cache):
    proc = run_train(tmp_path, "--corpus", str(corpus), "--cache-dir", str(cache), "--vocab-size", "60000")
    line = assert_usage_error(tmp_path, proc, "fewer than vocab_size=60000", "lower vocab_size to <=")
    reached = int(line.split("reached only ")[1].split()[0])
    assert 257 <= reached < 60000


@pytest.mark.slow  # a demo process each (~2.5 s): out of the fast lane
def test_vocab_size_below_the_byte_alphabet(tmp_path, corpus, cache):
    proc = run_train(tmp_path, "--corpus", str(corpus), "--cache-dir", str(cache), "--vocab-size", "200")
    assert_usage_error(tmp_path, proc, "vocab_size=200 is below the 257 tokens", "use vocab_size >= 257")


@pytest.mark.slow  # a demo process each (~2.5 s): out of the fast lane
def test_block_size_larger_than_the_train_split(tmp_path, corpus, cache):
    proc = run_train(tmp_path, "--corpus", str(corpus), "--cache-dir", str(cache), "--vocab-size", "512",
                     "--block-size", "10000000")
    assert_usage_error(tmp_path, proc, "block size larger than the data: --block-size 10000000 needs 10000001 "
                       "tokens but the train split holds", "use --block-size <=")


@pytest.mark.slow  # a demo process each (~2.5 s): out of the fast lane
def test_block_size_larger_than_the_val_split(tmp_path, corpus, cache):
    from examples.gpt.data import prepare_data

    data = prepare_data(corpus, cache, vocab_size=512, val_fraction=0.01, max_corpus_bytes=4_000_000)
    block = data.n_val_tokens + 10
    assert block + 1 < data.n_train_tokens  # fits the train split, not the val split
    proc = run_train(tmp_path, "--corpus", str(corpus), "--cache-dir", str(cache), "--vocab-size", "512",
                     "--val-fraction", "0.01", "--block-size", str(block))
    assert_usage_error(tmp_path, proc, f"the val split holds {data.n_val_tokens}",
                       f"use --block-size <= {data.n_val_tokens - 1} or a larger --val-fraction")


@pytest.mark.slow  # a demo process each (~2.5 s): out of the fast lane
@pytest.mark.parametrize("args, fragment", [
    (["--n-embd", "100", "--n-head", "3"], "[model] n_embd must be a multiple of n_head"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--micro-batch", "0"], "--micro-batch must be >= 1"),
    (["--lr-decay-steps", "10", "--warmup-steps", "20"], "--lr-decay-steps (10) must be larger than --warmup-steps"),
])
def test_bad_hyperparameters_fail_before_the_data(tmp_path, args, fragment):
    proc = run_train(tmp_path, "--corpus", str(tmp_path / "never-read"), *args)
    assert_usage_error(tmp_path, proc, fragment)


# --------------------------------------------------------------------------- pieces


def test_job_files_validate():
    for job in (JOB, LAPTOP_JOB):
        r = subprocess.run([*CLI, "validate", str(job)], env=env(), capture_output=True, text=True, cwd=REPO,
                           timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"script:     {TRAIN}" in r.stdout
        if job == JOB:  # the demo's "auto": what it picks on this machine, before a run
            assert "mixed precision auto -> " in r.stdout


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    from examples.gpt.train import get_lr

    lr = lambda step: get_lr(step, lr=1.0, min_lr=0.1, warmup_steps=9, decay_steps=109)  # noqa: E731
    assert [round(lr(s), 6) for s in (0, 4, 8)] == [0.1, 0.5, 0.9]  # linear warmup, never 0
    assert lr(9) == pytest.approx(1.0)  # the peak, where the cosine starts
    assert lr(59) == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    assert lr(109) == pytest.approx(0.1) and lr(500) == 0.1  # then flat at min_lr
    steps = [lr(s) for s in range(9, 110)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


@pytest.mark.slow  # seconds of real processes: out of the fast lane
def test_supervisor_batch_override_is_used(tmp_path, corpus, cache):
    """OOM back-off: TRAINSUP_MICRO_BATCH / TRAINSUP_GRAD_ACCUM win over --micro-batch / --grad-accum."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINSUP_", "ACCELERATE_"))}
    e.update(OMP_NUM_THREADS="1", TRAINSUP_MICRO_BATCH="4", TRAINSUP_GRAD_ACCUM="4")
    args = short_args(corpus, cache) + ["--max-steps", "2", "--eval-every", "0", "--sample-tokens", "0"]
    proc = subprocess.run([sys.executable, str(TRAIN), "--run-dir", str(tmp_path / "run"), *args], env=e,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1,024 tokens/step (micro-batch 4 x accum 4 x 1 rank(s))" in proc.stdout
    ckpt = CheckpointStore(tmp_path / "run" / "checkpoints").latest_valid()
    assert (ckpt.step, ckpt.manifest["micro_batch"], ckpt.manifest["grad_accum"]) == (2, 4, 4)


@pytest.mark.slow  # seconds of real processes: out of the fast lane
def test_bad_input_under_the_supervisor_stops_at_once(tmp_path, cache):
    """The rank reports bad input: `trainsup run` exits 2 with the script's message, no retry."""
    run_dir = tmp_path / "run"
    proc = run_job(run_dir, short_args(tmp_path / "no-corpus", cache), tmp_path / "sup.log")
    try:
        assert finish(proc) == 2
    finally:
        kill_run(run_dir)
    out = (tmp_path / "sup.log").read_text()
    assert f"not restarting: the training script rejected its input: corpus path {tmp_path / 'no-corpus'} " \
           "does not exist" in out, out[-3000:]
    exits = [e for e in events(run_dir) if e["event"] == "attempt_exit"]
    assert [e["kind"] for e in exits] == ["bad_input"]
