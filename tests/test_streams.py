"""Streams (IterableDataset) resume from their saved position, bitwise exact, without re-reading:
the toy (tests/scripts/toy_train.py --stream ...) stopped by real signals at several positions,
with 0 and 2 DataLoader workers and with 2 ranks; a stream without a position re-reads (one
warning) and is exact too; a state that is not plain data is refused."""

from __future__ import annotations

import argparse
import json
import logging
import pickle

import pytest
import torch

from supervisor_helpers import final_hash
from toy_inprocess import isolated, run, toy  # noqa: F401 - isolated: an autouse fixture
from train_core import streams
from train_core.errors import StreamStateError
from train_core.store import CheckpointStore

REREAD = "resuming a stream by re-reading"
MICRO, ITEMS = 4, 64  # the toy's micro-batch and dataset size: 16 batches an epoch, 3 per step


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Uninterrupted runs, by (stream kind, workers)."""
    cache = {}

    def ref(kind: str, workers: int = 0) -> str:
        if (kind, workers) not in cache:
            d = tmp_path_factory.mktemp(f"ref-{kind}-{workers}")
            code, _ = run(d, "--stream", kind, "--num-workers", str(workers))
            assert code == 0
            cache[kind, workers] = final_hash(d)
        return cache[kind, workers]

    return ref


def newest(run_dir):
    return [c for c in CheckpointStore(run_dir / "checkpoints").scan() if c.valid][-1]


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # 2: worker processes, slower
def test_a_stateful_stream_stopped_at_several_positions_resumes_bitwise_equal(tmp_path, refs, workers, caplog):
    args = ("--stream", "stateful", "--num-workers", str(workers))
    # micro-batch 5 of the first attempt: mid accumulation -> step 2; micro 9 of the next:
    # step 5 (epoch 0, batch 15 of 16); micro 12 of the third: mid accumulation in epoch 1 -> step 10
    for at, step in (("5", 2), ("9", 5), ("12", 10)):
        code, rep = run(tmp_path, "--signal-at", at, *args)
        assert (code, rep["kind"], rep["step"]) == (75, "saved", step)
        assert (newest(tmp_path).path / streams.STATE_FILE).is_file()
    with caplog.at_level(logging.INFO, logger="train_core"):
        code, _ = run(tmp_path, *args)
    assert code == 0 and final_hash(tmp_path) == refs("stateful", workers)
    assert "resuming the stream at its saved position" in caplog.text and REREAD not in caplog.text


def test_a_stateful_stream_reads_no_consumed_item_again(tmp_path):
    toy.ToyStream.READS.clear()
    code, rep = run(tmp_path, "--stream", "stateful", "--signal-at", "9")  # step 3: 9 batches of epoch 0
    assert code == 75 and rep["batch_in_epoch"] == 9
    toy.ToyStream.READS.clear()
    run(tmp_path, "--stream", "stateful", "--steps", "4")
    assert toy.ToyStream.READS[0] == (0, 0, 9 * MICRO)  # epoch 0, the first item not trained on


def test_a_stream_without_a_position_warns_and_rereads_exactly(tmp_path, refs, caplog):
    toy.ToyStream.READS.clear()
    code, _ = run(tmp_path, "--stream", "plain", "--signal-at", "9")
    assert code == 75 and not (newest(tmp_path).path / streams.STATE_FILE).exists()
    toy.ToyStream.READS.clear()
    with caplog.at_level(logging.WARNING, logger="train_core"):
        code, _ = run(tmp_path, "--stream", "plain")
    assert code == 0 and final_hash(tmp_path) == refs("plain")
    warnings = [r.getMessage() for r in caplog.records if REREAD in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "re-reading the 36 items (9 batches)" in warnings[0] and "about 0 s more" in warnings[0]
    assert "ToyStream cannot say where it is: give it state_dict() and load_state_dict()" in warnings[0]
    assert toy.ToyStream.READS[0] == (0, 0, 0)  # from the start of the epoch


def test_a_checkpoint_without_a_stream_position_still_resumes_at_the_right_item(tmp_path, caplog):
    # written the way trainsup wrote it before stream positions: the loader prepared by accelerate
    seen = {}
    reference = tmp_path / "ref"
    run(reference, "--stream", "stateful", on_micro=lambda n, s, x: seen.setdefault("ref", []).append(x.clone()))
    code, _ = run(tmp_path / "old", "--stream", "stateful", "--stream-via-accelerate", "--signal-at", "9",
                  on_micro=lambda n, s, x: seen.setdefault("old", []).append(x.clone()))
    assert code == 75 and not (newest(tmp_path / "old").path / streams.STATE_FILE).exists()
    with caplog.at_level(logging.WARNING, logger="train_core"):
        code, _ = run(tmp_path / "old", "--stream", "stateful",
                      on_micro=lambda n, s, x: seen.setdefault("old", []).append(x.clone()))
    assert code == 0 and "step-00000003 has no stream position" in caplog.text
    assert len(seen["old"]) == len(seen["ref"])
    assert all(torch.equal(a, b) for a, b in zip(seen["old"], seen["ref"]))  # the same items, in the same order


@pytest.mark.slow
def test_resume_from_a_background_interval_save_of_a_stream(tmp_path, refs, monkeypatch):
    monkeypatch.setenv("TRAINSUP_BACKGROUND_SAVES", "1")
    code, rep = run(tmp_path, "--stream", "stateful", "--num-workers", "2", "--save-every", "4", "--eval-every", "0",
                    "--crash-at", "17")  # micro 17: step 5, after step 4's save
    assert isinstance(code, RuntimeError) and newest(tmp_path).step == 4
    assert json.loads((newest(tmp_path).path / "manifest.json").read_text())["reasons"] == ["interval"]
    code, _ = run(tmp_path, "--stream", "stateful", "--num-workers", "2", "--save-every", "4", "--eval-every", "0")
    assert code == 0 and final_hash(tmp_path) == refs("stateful", 2)


@pytest.mark.parametrize("save_every,step", [("4", 4), ("0", 24)])  # an interval save; the final save on the way out
def test_a_state_that_is_not_plain_data_is_refused_at_the_save(tmp_path, capsys, save_every, step):
    code, rep = run(tmp_path, "--stream", "bad", "--save-every", save_every, "--eval-every", "0")
    assert (code, rep["kind"], rep["code"], rep["step"]) == (2, "bad_input", 2, step)
    assert "the stream's state_dict()['rng'] is a numpy.random._generator.Generator" in rep["detail"]
    assert "rng.bit_generator.state" in rep["detail"]
    assert "state_dict()['rng']" in capsys.readouterr().err
    assert not list((tmp_path / "checkpoints").glob("*step*"))  # nothing half written


@pytest.mark.parametrize("value,where", [
    ({"a": [1, 2.5, "x", None, torch.zeros(2)], "b": {"c": b"x", 3: (True,)}}, None),
    ({"dataset_state": {"f": open}}, "the stream's state_dict()['f'] is a builtins.builtin_function_or_method"),
    ({"_snapshot": {"w": {"dataset_state": {"s": {1, 2}}}}}, "the stream's state_dict()['s'] is a builtins.set"),
    ({"x": {(1, 2): 3}}, "the stream loader's state['x'] has a key (1, 2) of type tuple"),
])
def test_check_plain_names_the_dataset_key(value, where):
    if where is None:
        streams.check_plain(value)
        return
    with pytest.raises(StreamStateError) as e:
        streams.check_plain(value)
    assert str(e.value).startswith(where)


def test_a_stream_state_file_that_is_not_a_state_is_refused_by_load(tmp_path):
    torch.save({"format": 1, "loader": {"dataset_state": {"ok": 1}}}, tmp_path / streams.STATE_FILE)
    assert streams.load(tmp_path, trust=False)["loader"] == {"dataset_state": {"ok": 1}}
    torch.save([1, 2], tmp_path / streams.STATE_FILE)
    with pytest.raises(ValueError, match="is not a format-1 stream state"):
        streams.load(tmp_path, trust=False)
    torch.save({"format": 1, "loader": {"x": argparse.Namespace(a=1)}}, tmp_path / streams.STATE_FILE)
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):  # weights_only: never built
        streams.load(tmp_path, trust=False)


@pytest.mark.slow
def test_two_ranks_stream_dispatched_from_rank_0_resume_bitwise_equal(tmp_path):
    from test_session_resume import assert_saved_together, launch

    launch(tmp_path / "ref", "--stream", "stateful", nproc=2)
    for at, step in (("4", 2), ("7", 5)):
        assert_saved_together(launch(tmp_path / "x", "--signal-at", at, "--signal-rank", "1", "--stream", "stateful",
                                     nproc=2), step=step)
        ckpt = newest(tmp_path / "x")
        assert (ckpt.path / streams.STATE_FILE).is_file()
    launch(tmp_path / "x", "--stream", "stateful", nproc=2)
    assert final_hash(tmp_path / "x") == final_hash(tmp_path / "ref")
