"""Retention: one table row per rule, and properties that hold for any steps and metrics."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from train_core.retention import Entry, RetentionError, RetentionPolicy, plan_retention

NAN = float("nan")


def E(step, loss=None, valid=True, reason="interval", **metrics):
    if loss is not None:
        metrics["val_loss"] = loss
    return Entry(step, valid, metrics, reason)


BASE = [E(100, 3.0), E(200, 2.0), E(300, 2.5), E(400, 2.7), E(500, 2.9)]
OFF = dict(keep_last=1, keep_best=0, keep_every=0, keep_final=False)

# (id, policy kwargs, entries, plan kwargs, expected keep {step: reasons}, expected delete, expected invalid)
CASES = [
    ("keep_last 1 keeps only the newest", OFF, BASE, {}, {500: ("keep_last=1", "newest valid")},
     (100, 200, 300, 400), ()),
    ("keep_last 3", {**OFF, "keep_last": 3}, BASE, {},
     {300: ("keep_last=3",), 400: ("keep_last=3",), 500: ("keep_last=3", "newest valid")}, (100, 200), ()),
    ("keep_last larger than what exists", {**OFF, "keep_last": 10}, BASE[:2], {},
     {100: ("keep_last=10",), 200: ("keep_last=10", "newest valid")}, (), ()),
    ("keep_best min", {**OFF, "keep_best": 2}, BASE, {},
     {200: ("best val_loss=2",), 300: ("best val_loss=2.5",), 500: ("keep_last=1", "newest valid")}, (100, 400), ()),
    ("keep_best max", {**OFF, "keep_best": 1, "best_mode": "max"}, BASE, {},
     {100: ("best val_loss=3",), 500: ("keep_last=1", "newest valid")}, (200, 300, 400), ()),
    ("keep_best other metric, ties keep the older",
     {**OFF, "keep_best": 1, "best_metric": "acc", "best_mode": "max"},
     [E(1, acc=0.9), E(2, acc=0.9), E(3, acc=0.1)], {},
     {1: ("best acc=0.9",), 3: ("keep_last=1", "newest valid")}, (2,), ()),
    ("keep_best ignores NaN, inf and missing metrics", {**OFF, "keep_best": 1},
     [E(1, NAN), E(2, math.inf), E(3), E(4, -math.inf), E(5, 9.0), E(6, None)], {},
     {5: ("best val_loss=9",), 6: ("keep_last=1", "newest valid")}, (1, 2, 3, 4), ()),
    ("keep_best never counts an invalid checkpoint", {**OFF, "keep_best": 1},
     [E(1, 0.1, valid=False), E(2, 5.0), E(3, 6.0)], {},
     {2: ("best val_loss=5",), 3: ("keep_last=1", "newest valid")}, (), (1,)),
    ("keep_every", {**OFF, "keep_every": 200}, BASE, {},
     {200: ("keep_every=200",), 400: ("keep_every=200",), 500: ("keep_last=1", "newest valid")}, (100, 300), ()),
    ("keep_every keeps step 0", {**OFF, "keep_every": 7}, [E(0), E(5), E(9)], {},
     {0: ("keep_every=7",), 9: ("keep_last=1", "newest valid")}, (5,), ()),
    ("final", {**OFF, "keep_final": True}, [E(1, reason="final"), E(2), E(3)], {},
     {1: ("final",), 3: ("keep_last=1", "newest valid")}, (2,), ()),
    ("final off", OFF, [E(1, reason="final"), E(2)], {}, {2: ("keep_last=1", "newest valid")}, (1,), ()),
    ("newest VALID is kept when newer ones are invalid", OFF,
     [E(1), E(2), E(3, valid=False), E(4, valid=False)], {},
     {2: ("keep_last=1", "newest valid")}, (1,), (3, 4)),
    ("protected (resume source) is kept", OFF, BASE, {"protected": [200]},
     {200: ("resume source",), 500: ("keep_last=1", "newest valid")}, (100, 300, 400), ()),
    ("protected invalid is kept even with remove_invalid", OFF, [E(1, valid=False), E(2)],
     {"protected": [1], "remove_invalid": True}, {1: ("resume source",), 2: ("keep_last=1", "newest valid")}, (), (1,)),
    ("invalid are reported, not deleted", OFF, [E(1), E(2, valid=False), E(3)], {},
     {3: ("keep_last=1", "newest valid")}, (1,), (2,)),
    ("invalid deleted with remove_invalid", OFF, [E(1), E(2, valid=False), E(3)], {"remove_invalid": True},
     {3: ("keep_last=1", "newest valid")}, (1, 2), (2,)),
    ("rules combine as a union", {"keep_last": 1, "keep_best": 1, "keep_every": 300, "keep_final": True},
     [*BASE[:3], E(400, 2.7, reason="final"), BASE[4]], {},
     {200: ("best val_loss=2",), 300: ("keep_every=300",), 400: ("final",), 500: ("keep_last=1", "newest valid")},
     (100,), ()),
    ("nothing on disk", {}, [], {}, {}, (), ()),
    ("only invalid", {}, [E(1, valid=False)], {"remove_invalid": True}, {}, (1,), (1,)),
]


@pytest.mark.parametrize("policy,entries,kw,keep,delete,invalid", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule(policy, entries, kw, keep, delete, invalid):
    plan = plan_retention(RetentionPolicy(**policy), list(reversed(entries)), **kw)  # input order does not matter
    assert plan.keep == keep
    assert plan.delete == delete
    assert plan.invalid == invalid


@pytest.mark.parametrize("kwargs,message", [
    ({"keep_last": 0}, "[retention] keep_last must be an integer >= 1 (the newest checkpoint is always kept), got 0"),
    ({"keep_best": -1}, "[retention] keep_best must be an integer >= 0 (0 turns it off), got -1"),
    ({"keep_every": 1.5}, "[retention] keep_every must be an integer >= 0 (0 turns it off), got 1.5"),
    ({"keep_last": True}, "[retention] keep_last must be an integer >= 1"),
    ({"best_mode": "lowest"}, "[retention] best_mode must be \"min\" or \"max\", got 'lowest'"),
    ({"best_metric": ""}, "[retention] best_metric must be a metric name"),
    ({"keep_final": "yes"}, "[retention] keep_final must be true or false, got 'yes'"),
])
def test_bad_policy_names_the_key_and_the_fix(kwargs, message):
    with pytest.raises(RetentionError) as e:
        RetentionPolicy(**kwargs)
    assert str(e.value).startswith(message)


# --------------------------------------------------------------------------- properties

metric_values = hs.one_of(hs.none(), hs.floats(allow_nan=True, allow_infinity=True), hs.integers(-5, 5))


@hs.composite
def entries_strategy(draw):
    steps = draw(hs.lists(hs.integers(0, 10_000), unique=True, max_size=25))
    out = []
    for s in steps:
        metrics = {}
        for name in ("val_loss", "acc"):
            v = draw(metric_values)
            if v is not None or draw(hs.booleans()):
                metrics[name] = v
        out.append(Entry(s, draw(hs.booleans()) or draw(hs.booleans()), metrics,
                         draw(hs.sampled_from(["interval", "final", "preempt", "best"]))))
    return out


policies = hs.builds(
    RetentionPolicy,
    keep_last=hs.integers(1, 6),
    keep_best=hs.integers(0, 4),
    best_metric=hs.sampled_from(["val_loss", "acc", "absent"]),
    best_mode=hs.sampled_from(["min", "max"]),
    keep_every=hs.integers(0, 50),
    keep_final=hs.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(policy=policies, entries=entries_strategy(), data=hs.data(), remove_invalid=hs.booleans())
def test_never_deletes_newest_valid_or_protected(policy, entries, data, remove_invalid):
    steps = [e.step for e in entries]
    protected = data.draw(hs.lists(hs.sampled_from(steps), max_size=3)) if steps else []
    plan = plan_retention(policy, entries, protected=protected, remove_invalid=remove_invalid)
    valid = sorted(e.step for e in entries if e.valid)
    invalid = sorted(e.step for e in entries if not e.valid)
    deleted = set(plan.delete)
    if valid:
        assert valid[-1] not in deleted and "newest valid" in plan.keep[valid[-1]]
    assert not deleted & set(protected)
    assert not deleted & set(plan.keep)  # delete ∩ keep = ∅
    assert set(plan.keep) | deleted | set(invalid) == set(steps)  # every step accounted for
    assert set(plan.keep) <= set(steps) and deleted <= set(steps)
    assert plan.invalid == tuple(invalid)
    if not remove_invalid:
        assert not deleted & set(invalid)
    else:
        assert set(invalid) - set(protected) <= deleted | set(plan.keep)
    assert list(plan.delete) == sorted(plan.delete)
    # keep_last keeps the newest N valid ones
    assert set(valid[-policy.keep_last:]) <= set(plan.keep)


@settings(max_examples=200, deadline=None)
@given(policy=policies, entries=entries_strategy())
def test_union_semantics(policy, entries):
    """What the combined policy keeps is exactly the union of what each rule alone keeps."""
    plan = plan_retention(policy, entries)
    alone = [
        RetentionPolicy(keep_last=policy.keep_last, keep_best=0, keep_every=0, keep_final=False),
        RetentionPolicy(keep_last=1, keep_best=policy.keep_best, best_metric=policy.best_metric,
                        best_mode=policy.best_mode, keep_every=0, keep_final=False),
        RetentionPolicy(keep_last=1, keep_best=0, keep_every=policy.keep_every, keep_final=False),
        RetentionPolicy(keep_last=1, keep_best=0, keep_every=0, keep_final=policy.keep_final),
    ]
    union = set().union(*(plan_retention(p, entries).keep for p in alone))
    assert set(plan.keep) == union
    # and a checkpoint kept by a rule says which rule
    for step, why in plan.keep.items():
        assert why


@settings(max_examples=200, deadline=None)
@given(entries=entries_strategy(), k=hs.integers(1, 4), mode=hs.sampled_from(["min", "max"]))
def test_keep_best_keeps_the_k_best_finite_values(entries, k, mode):
    policy = RetentionPolicy(keep_last=1, keep_best=k, best_mode=mode, keep_every=0, keep_final=False)
    plan = plan_retention(policy, entries)
    scored = [e for e in entries if e.valid and isinstance(e.metrics.get("val_loss"), (int, float))
              and math.isfinite(e.metrics["val_loss"])]
    best = {s for s, why in plan.keep.items() if any(w.startswith("best ") for w in why)}
    assert len(best) == min(k, len(scored))
    if best and len(scored) > len(best):
        worst_kept = [e.metrics["val_loss"] for e in scored if e.step in best]
        dropped = [e.metrics["val_loss"] for e in scored if e.step not in best]
        if mode == "min":
            assert max(worst_kept) <= min(dropped)
        else:
            assert min(worst_kept) >= max(dropped)
