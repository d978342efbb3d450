"""Restart policy: classification, backoff, budget, no-progress, fallback (pure tables)."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given, strategies as st

from supervisor.config import RestartConfig
from train_core.contract import ExitKind
from supervisor.runner.policy import (
    AttemptResult,
    LauncherStatus,
    RestartState,
    Verdict,
    after_exit,
    backoff_delay_s,
    choose_resume,
    classify_exit,
    exit_code_for_stop,
)

OK = LauncherStatus(code=0)


def rep(kind, rank=0, **kw):
    return {"rank": rank, "attempt": 1, "kind": kind, **kw}


@pytest.mark.parametrize(
    "reports, launcher, expected, kw",
    [
        ([rep("finished")], OK, ExitKind.FINISHED, {}),
        ([rep("finished"), rep("finished", 1)], LauncherStatus(code=1), ExitKind.FINISHED, {"expected_ranks": 2}),
        ([rep("saved"), rep("saved", 1)], LauncherStatus(code=1), ExitKind.SAVED, {"expected_ranks": 2}),
        ([rep("saved"), rep("error", 1, detail="boom")], LauncherStatus(code=1), ExitKind.ERROR, {"expected_ranks": 2}),
        ([rep("oom", micro_batch=8, grad_accum=1)], LauncherStatus(code=1), ExitKind.OOM, {}),
        ([rep("resume_failed", checkpoint="/r/step-10"), rep("error", 1)], LauncherStatus(code=1),
         ExitKind.RESUME_FAILED, {"expected_ranks": 2}),
        ([], LauncherStatus(code=0), ExitKind.FINISHED, {}),
        ([], LauncherStatus(code=75), ExitKind.SAVED, {}),
        ([], LauncherStatus(code=1), ExitKind.ERROR, {}),
        ([], LauncherStatus(signal=9), ExitKind.KILLED, {}),
        ([], LauncherStatus(code=-9), ExitKind.KILLED, {}),
        ([rep("finished")], LauncherStatus(code=1), ExitKind.ERROR, {"expected_ranks": 2}),
        ([], LauncherStatus(signal=15), ExitKind.KILLED, {"killed_by_supervisor": True}),
        ([rep("finished")], OK, ExitKind.HUNG, {"hung": True}),
        ([rep("bad_input", detail="no corpus"), rep("error", 1)], LauncherStatus(code=1), ExitKind.BAD_INPUT,
         {"expected_ranks": 2}),
    ],
)
def test_classify(reports, launcher, expected, kw):
    kw.setdefault("expected_ranks", 1)
    c = classify_exit(reports, launcher, **kw)
    assert c.kind is expected
    assert "\n" not in c.detail and c.detail


def test_classify_details():
    c = classify_exit([rep("error", detail="ValueError: x")], LauncherStatus(code=1), expected_ranks=1)
    assert c.detail == "rank 0 failed: ValueError: x"
    c = classify_exit([rep("resume_failed", checkpoint="/r/step-10", detail="EOF")], LauncherStatus(code=1),
                      expected_ranks=1)
    assert c.checkpoint == "/r/step-10" and "could not resume from /r/step-10" in c.detail
    assert LauncherStatus(signal=int(signal.SIGKILL)).describe() == "killed by SIGKILL"


CFG = RestartConfig(max_restarts=4, backoff_initial_s=1.0, backoff_max_s=5.0, backoff_multiplier=2.0,
                    jitter=0.0, window_s=0.0, no_progress_limit=0)


@pytest.mark.parametrize("failures, delay", [(0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (10, 5.0)])
def test_backoff_grows_and_caps(failures, delay):
    assert backoff_delay_s(CFG, failures, 0.5) == delay


@given(st.integers(1, 30), st.floats(0, 1), st.floats(0, 1))
def test_backoff_jitter_bounds(failures, jitter, r):
    cfg = RestartConfig(backoff_initial_s=2.0, backoff_max_s=60.0, jitter=jitter)
    base = min(60.0, 2.0 * 2.0 ** (failures - 1))
    d = backoff_delay_s(cfg, failures, r)
    assert base * (1 - jitter) - 1e-9 <= d <= base * (1 + jitter) + 1e-9


def err(step=-1, new=False, kind=ExitKind.ERROR):
    return AttemptResult(kind, "boom", new, step)


def test_crash_loop_backs_off_then_gives_up():
    state, delays, now = RestartState(), [], 0.0
    for _ in range(4):
        state, d = after_exit(CFG, state, err(), now, 0.5)
        assert d.verdict is Verdict.RESTART
        delays.append(d.delay_s)
        now += 10
    assert delays == [1.0, 2.0, 4.0, 5.0]
    state, d = after_exit(CFG, state, err(), now, 0.5)
    assert d.verdict is Verdict.GIVE_UP
    assert d.reason.startswith("restart budget spent: 4 restart(s) of max_restarts=4; last attempt: error: boom")


def test_window_forgets_old_restarts():
    cfg = RestartConfig(max_restarts=2, window_s=100.0, jitter=0.0, no_progress_limit=0)
    state = RestartState()
    state, d = after_exit(cfg, state, err(), 0.0, 0.5)
    state, d = after_exit(cfg, state, err(), 10.0, 0.5)
    _, d = after_exit(cfg, state, err(), 20.0, 0.5)
    assert d.verdict is Verdict.GIVE_UP and "within 100 s" in d.reason
    _, d = after_exit(cfg, state, err(), 200.0, 0.5)
    assert d.verdict is Verdict.RESTART


def test_no_progress_limit():
    cfg = RestartConfig(max_restarts=100, no_progress_limit=3, jitter=0.0)
    state = RestartState()
    state, d = after_exit(cfg, state, err(step=50, new=True), 0, 0.5)  # progress: reached 50
    assert d.verdict is Verdict.RESTART and state.no_progress_in_a_row == 0 and d.delay_s == 1.0
    state, d = after_exit(cfg, state, err(step=50), 1, 0.5)  # crashes at the same step again
    state, d = after_exit(cfg, state, err(step=40), 2, 0.5)
    assert d.verdict is Verdict.RESTART and d.delay_s == 4.0
    state, d = after_exit(cfg, state, err(step=50), 3, 0.5)
    assert d.verdict is Verdict.GIVE_UP
    assert d.reason.startswith("no progress in 3 attempt(s) in a row (no_progress_limit=3, best step 50)")


def test_progress_resets_backoff():
    state = RestartState()
    for i in range(3):
        state, d = after_exit(CFG, state, err(step=i), i, 0.5)  # each attempt gets further
        assert d.delay_s == 1.0


@pytest.mark.parametrize("kind, verdict", [(ExitKind.FINISHED, Verdict.DONE), (ExitKind.SAVED, Verdict.RESTART)])
def test_finished_and_saved_are_not_failures(kind, verdict):
    state = RestartState(restart_times=(0.0,) * 10, failures_in_a_row=3)
    new, d = after_exit(CFG, state, err(kind=kind), 1.0, 0.5)
    assert d.verdict is verdict and d.delay_s == 0.0
    assert new.restart_times == state.restart_times


def test_bad_input_is_not_retried():
    """The same input fails the same way: stop at once (exit 2), whatever budget is left."""
    new, d = after_exit(CFG, RestartState(), err(kind=ExitKind.BAD_INPUT), 1.0, 0.5)
    assert d.verdict is Verdict.BAD_INPUT and d.reason == "boom" and new.restart_times == ()


def test_zero_restarts_gives_up_at_once():
    _, d = after_exit(RestartConfig(max_restarts=0), RestartState(), err(), 0.0, 0.5)
    assert d.verdict is Verdict.GIVE_UP


@pytest.mark.parametrize(
    "ckpts, excluded, expected",
    [([], (), None), ([(10, True), (20, True)], (), 20), ([(10, True), (20, False)], (), 10),
     ([(10, True), (20, True)], (20,), 10), ([(10, True)], (10,), None)],
)
def test_choose_resume(ckpts, excluded, expected):
    assert choose_resume(ckpts, excluded) == expected


@given(st.lists(st.tuples(st.integers(0, 50), st.booleans())), st.sets(st.integers(0, 50)))
def test_choose_resume_never_picks_invalid_or_excluded(ckpts, excluded):
    s = choose_resume(ckpts, excluded)
    if s is not None:
        assert (s, True) in ckpts and s not in excluded


@pytest.mark.parametrize("saved, sig, code", [(True, 15, 75), (False, 15, 143), (False, 2, 130), (False, None, 1)])
def test_exit_code_for_stop(saved, sig, code):
    assert exit_code_for_stop(saved, sig) == code
