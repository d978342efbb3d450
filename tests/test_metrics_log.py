"""RUN_DIR/metrics.jsonl: the writer (train_core/metricslog.py), what a real TrainSession writes
(the toy script, in this process), the rate meter behind status.json's tokens/s, and the
accounting of a session stopped and resumed."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch

from supervisor.accounting import account
from toy_inprocess import isolated, run  # noqa: F401 - isolated: an autouse fixture
from train_core import reporting
from train_core.metricslog import MetricsLog, read_metrics
from train_core.reporting import LossMean, RateMeter, losses_to_floats


def test_writer_buffers_steps_and_writes_whole_lines(tmp_path):
    clock = iter(range(100, 200))
    log = MetricsLog(tmp_path / "metrics.jsonl", attempt=3, flush_s=3600, clock=lambda: next(clock),
                     to_floats=losses_to_floats)
    log.step(1, loss=torch.tensor(2.5), lr=1e-3, tokens_per_s=float("nan"))
    log.step(2, loss=torch.tensor(float("inf")))
    assert not (tmp_path / "metrics.jsonl").exists()  # buffered: no write per step
    log.metrics(2, {"val_loss": 1.25, "step": 7.0, "bad": float("nan")})  # written at once, after the steps
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert recs == [
        {"kind": "step", "step": 1, "ts": 100, "attempt": 3, "loss": 2.5, "lr": 1e-3},
        {"kind": "step", "step": 2, "ts": 101, "attempt": 3},  # a non-finite loss is left out
        {"kind": "metrics", "step": 2, "ts": 102, "attempt": 3, "val_loss": 1.25, "metric_step": 7.0, "bad": None},
    ]
    log.save(2, blocked_s=0.25, reasons=["interval"], background=True)
    log.pause(2, paused_s=3.0)
    log.step(3)
    log.close()
    assert [r["kind"] for r in read_metrics(tmp_path / "metrics.jsonl")] == ["step", "step", "metrics", "save",
                                                                             "pause", "step"]
    assert stat.S_IMODE(os.stat(tmp_path / "metrics.jsonl").st_mode) == 0o600
    assert all(line.endswith("}") for line in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_a_timed_flush_leaves_the_newest_step_pending(tmp_path):
    """Its loss may still be computing on a device: converting it would wait for the device at
    every flush (every step, with steps longer than the flush interval)."""
    converted: list[list] = []

    def to_floats(values):
        converted.append(list(values))
        return [float(v) for v in values]

    log = MetricsLog(tmp_path / "metrics.jsonl", attempt=1, flush_s=0.0, to_floats=to_floats)
    log.step(1, loss=1.0)
    assert converted == [] and not (tmp_path / "metrics.jsonl").exists()
    log.step(2, loss=2.0)
    assert converted == [[1.0]] and [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    log.close()  # the end writes everything
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_hostile_numbers_are_skipped_not_raised(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n".join([
        '{"kind": "step", "step": 1, "ts": 1' + "0" * 400 + '}', "[" * 20000,
        '{"kind": "step", "step": 2, "ts": 2.0, "loss": 1.5}']) + "\n")
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [2]
    log = MetricsLog(tmp_path / "w.jsonl", attempt=1)
    log.metrics(3, {"huge": 10 ** 400})
    assert read_metrics(tmp_path / "w.jsonl")[0]["huge"] is None


def test_writer_survives_a_bad_path_and_readers_skip_junk(tmp_path, caplog):
    (tmp_path / "target").write_text("")
    os.symlink(tmp_path / "target", tmp_path / "metrics.jsonl")  # never written through a symlink
    log = MetricsLog(tmp_path / "metrics.jsonl", attempt=1)
    log.metrics(0, {"x": 1})
    log.metrics(0, {"x": 2})
    assert (tmp_path / "target").read_text() == "" and caplog.text.count("cannot write") == 1
    (tmp_path / "m.jsonl").write_text('\n'.join([
        '{"step": 4, "val_loss": 2.0, "time": 5.5}',  # the demo's old lines: metrics, time as ts
        '{"kind": "step", "step": -1, "ts": 1}', '{"kind": "step", "step": true, "ts": 1}',
        '{"kind": "step", "step": 1, "ts": NaN}', 'x' * 70000, '[]', '{"kind": "step", "st']))
    assert read_metrics(tmp_path / "m.jsonl") == [{"step": 4, "val_loss": 2.0, "time": 5.5, "kind": "metrics",
                                                   "ts": 5.5}]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_loss_mean_and_conversion_need_no_sync_per_step():
    m = LossMean()
    assert m.take() is None
    for v in (torch.tensor(1.0), torch.tensor([2.0, 4.0]), 6):
        m.add(v)
    m.add("not a loss")
    mean = m.take()
    assert isinstance(mean, torch.Tensor) and m.take() is None
    assert losses_to_floats([mean, 1, None, float("nan"), torch.tensor(float("inf"))]) == [
        pytest.approx((1 + 3 + 6) / 3), 1.0, None, None, None]


def test_rate_meter_keeps_the_last_rate_between_steps(monkeypatch):
    """status.json showed tok/s 0 when no step ended between two heartbeats (a slow step, an
    evaluation, a save): the meter now measures between steps and keeps the last rate."""
    now = [0.0]
    monkeypatch.setattr(reporting.time, "monotonic", lambda: now[0])
    m = RateMeter(world_size=2)
    assert m.rates() == (None, None)
    m.stepped(0, 0)
    for t, tokens in ((1.0, 100), (2.0, 200)):  # one step a second, 100 tokens each on this rank
        now[0] = t
        m.stepped(tokens, tokens // 10)
        assert m.rates() == (pytest.approx(200.0), pytest.approx(20.0))
    for t in (2.4, 3.1, 3.9, 10.0):  # heartbeats while no step ends: the last rate, never 0
        now[0] = t
        assert m.rates()[0] == pytest.approx(200.0)
    now[0] = 12.0
    m.restart()  # after a pause: the time since the last step is not throughput
    now[0] = 13.0
    m.stepped(300, 30)
    assert m.rates()[0] == pytest.approx(200.0)


def test_a_session_writes_metrics_jsonl(tmp_path):
    code, report = run(tmp_path, "--steps", "8", "--eval-every", "4")
    assert code == 0, report
    recs = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in recs if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(r["attempt"] == 0 and isinstance(r["loss"], float) and math.isfinite(r["loss"]) for r in steps)
    assert all(r["lr"] > 0 for r in steps) and all(a["ts"] <= b["ts"] for a, b in zip(steps, steps[1:]))
    evals = [r for r in recs if r["kind"] == "metrics"]
    assert [r["step"] for r in evals] == [4, 8] and all(isinstance(r["val_loss"], float) for r in evals)
    saves = [r for r in recs if r["kind"] == "save"]
    assert saves and saves[-1]["step"] == 8 and "final" in saves[-1]["reasons"] and saves[-1]["blocked_s"] >= 0
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_a_stopped_and_resumed_session_loses_no_step(tmp_path):
    """A save-and-stop (exit 75) then a resume: every step is in the final model's history once."""
    code, report = run(tmp_path, "--steps", "12", "--signal-at", "9")  # grad_accum 3: the end of step 3
    assert code == 75, report
    code, report = run(tmp_path, "--steps", "12")
    assert code == 0, report
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == list(range(1, 13))
    acc = account(tmp_path, live=False)
    assert (acc.final_step, acc.steps_in_history, acc.steps_recomputed) == (12, 12, 0)
    assert acc.lost_s["recomputed"] == 0 and acc.lost_s["saving"] > 0 and acc.productive_s > 0
    assert 0 < acc.goodput <= 1
    assert [s["cause"] for s in acc.stops] == ["other"]  # no supervisor saw why
