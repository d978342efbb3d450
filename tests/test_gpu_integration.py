"""GPU watch and OOM back-off end to end: `trainsup run` with real `accelerate launch` children.

There is no GPU here: the `[gpu]` section points the watcher at a scripted fake backend
(backend = "fake", readings over time since the supervisor started), and the OOM test
script raises torch.OutOfMemoryError above a micro-batch size, as CUDA would.

Hysteresis at the thresholds and "VRAM warning once per episode" are asserted here on the
whole run (event counts) and, exhaustively, on the pure policy in tests/test_thermal.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.cli.status import format_gpu_status
from supervisor_helpers import (
    finish,
    REPO,
    events,
    final_weights,
    read_json,
    run_cli,
    start_supervisor,
    wait_for,
    write_job,
)

TOY = REPO / "tests" / "scripts" / "toy_train.py"
OOM_TRAIN = REPO / "tests" / "scripts" / "gpu_oom_train.py"
GIB = 2**30




def gpu_section(tmp: Path, points: list[dict], **over) -> dict:
    script = tmp / "gpu-script.json"
    script.write_text(json.dumps({"points": points}))
    cfg = {"backend": "fake", "fake_script": script.name, "poll_interval_s": 0.2,
           "pause_c": 85, "resume_c": 75, "stop_c": 95}
    cfg.update(over)
    return cfg


def point(t_s: float, temp_c: float, vram_gib: float = 1.0) -> dict:
    return {"t_s": t_s, "temp_c": temp_c, "vram_used_bytes": int(vram_gib * GIB), "vram_total_bytes": 4 * GIB,
            "power_w": 50.0, "power_limit_w": 80.0,
            "processes": [{"pid": 1, "used_bytes": GIB // 2}]}  # not a rank: filtered out of the job's view


def sample_status(run_dir: Path) -> tuple[int, str] | None:
    st = read_json(run_dir / "status.json")
    return (st.get("step"), st.get("state")) if st else None


# --------------------------------------------------------------------------- status formatting (fast)


def test_status_shows_each_gpu_readably():
    ws = {"available": True, "backend": "nvml", "poll_interval_s": 2.0, "reading_age_s": 0.4, "thermal": "paused",
          "blocking": "GPU 0 too hot (at 86 C): paused, waiting until it is at or below resume_c 75 C",
          "gpus": [{"index": 0, "name": "NVIDIA RTX A2000 Laptop GPU", "vram_used_bytes": 3 * GIB,
                    "vram_total_bytes": 4 * GIB, "vram_fraction": 0.75, "temp_c": 86.0, "power_w": 35.2,
                    "power_limit_w": 60.0, "throttle": ["sw_power_cap", "sw_thermal"]},
                   {"index": 1, "vram_used_bytes": None, "vram_total_bytes": None, "vram_fraction": None,
                    "temp_c": None, "power_w": None, "power_limit_w": None, "throttle": []}]}
    assert format_gpu_status(ws) == [
        "gpu:             2 GPU(s) via nvml, every 2 s, thermal paused",
        "  waiting: GPU 0 too hot (at 86 C): paused, waiting until it is at or below resume_c 75 C",
        "  GPU 0 NVIDIA RTX A2000 Laptop GPU: VRAM 3.00/4.00 GiB (75%)  86 C  35/60 W  throttle: sw_power_cap, sw_thermal",
        "  GPU 1: VRAM ?/? GiB  - C  -/- W  throttle: none",
    ]
    assert format_gpu_status({"available": False, "backend": "nvml",
                              "reason": "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this machine"}) == [
        "gpu:             GPU unmonitored: NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this machine"]
    stale = format_gpu_status({**ws, "reading_age_s": 40.0, "blocking": None, "gpus": []})
    assert stale == ["gpu:             0 GPU(s) via nvml, every 2 s, thermal paused (reading 40 s old)"]


# --------------------------------------------------------------------------- thermal (fake backend)


@pytest.mark.slow
def test_temperature_ramp_pauses_and_resumes_without_flapping_and_vram_warns_once_per_episode(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    points = [
        point(0, 60),
        point(4.0, 84, vram_gib=3.8),  # just under pause_c: nothing; VRAM 95% > 90%: warning 1
        point(4.6, 84.9, vram_gib=3.7),  # still under; VRAM wobbles above the re-arm level: no repeat
        point(5.2, 86, vram_gib=3.65),  # pause
        point(5.8, 80),  # inside the band while paused: stays paused
        point(6.4, 86),  # hot again: already paused, no new event
        point(7.0, 77),
        point(8.0, 74, vram_gib=2.0),  # at/below resume_c: resume; VRAM 50% re-arms the warning
        point(8.6, 80, vram_gib=3.9),  # inside the band while running: no pause; warning 2
        point(9.2, 84.9),
        point(9.8, 60),
    ]
    gpu = gpu_section(tmp_path, points, vram_warn_fraction=0.9, vram_rearm_margin=0.1)
    job = write_job(tmp_path, ["--steps", "300", "--step-time", "0.03", "--heartbeat-s", "0.1"], gpu=gpu)
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)

    wait_for(lambda: events(run_dir, "thermal_pause"), 40, "thermal_pause")
    # While hot the rank holds at one step; the heartbeat keeps coming (no hang).
    paused = []

    def hot_samples():
        s = sample_status(run_dir)
        if s and s[1] == "paused":
            paused.append(s[0])
        return events(run_dir, "thermal_resume")

    sup_json = wait_for(lambda: (s := read_json(run_dir / "supervisor.json")) and s.get("paused_by") == ["gpu"] and s,
                        10, "supervisor.json paused_by gpu")
    assert sup_json["watchers"]["gpu"]["thermal"] == "paused"
    assert sup_json["watchers"]["gpu"]["gpus"][0]["temp_c"] >= 80
    assert sup_json["watchers"]["gpu"]["gpus"][0]["processes"] == []  # the runner told it the rank PIDs
    wait_for(hot_samples, 30, "thermal_resume", interval=0.05)
    assert len(paused) >= 10, paused  # ~2.8 s paused, sampled every 50 ms
    assert len(set(paused)) == 1, f"steps advanced while paused: {sorted(set(paused))}"
    held = paused[0]
    wait_for(lambda: (s := sample_status(run_dir)) and s[1] == "training" and s[0] > held, 20,
             "steps advancing after the resume")
    assert finish(sup) == 0, (tmp_path / "sup.log").read_text()[-3000:]

    ev = events(run_dir)
    thermal = [e["event"] for e in ev if e["event"].startswith("thermal")]
    assert thermal == ["thermal_pause", "thermal_resume"]  # no flapping at either threshold
    vram = [e for e in ev if e["event"] == "vram_warning"]
    assert len(vram) == 2, vram  # one per episode, re-armed by the drop to 50%
    assert [e["action"] for e in ev if e["event"] in ("thermal_pause", "thermal_resume")] == ["pause", "resume"]
    assert [e["kind"] for e in ev if e["event"] == "attempt_exit"] == ["finished"]  # paused, never restarted
    r = run_cli("status", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "gpu:             1 GPU(s) via fake, every 0.2 s, thermal ok" in r.stdout
    assert "  GPU 0 Fake GPU: VRAM 1.00/4.00 GiB (25%)  60 C  50/80 W  throttle: none" in r.stdout


@pytest.mark.slow
def test_spike_over_stop_c_saves_stops_waits_while_hot_and_restarts_when_cooled(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    args = ["--steps", "250", "--step-time", "0.03", "--heartbeat-s", "0.1"]
    points = [point(0, 60), point(5.0, 96), point(6.5, 80), point(8.0, 70)]  # 80 C: still too hot to restart
    job = write_job(tmp_path, args, gpu=gpu_section(tmp_path, points))
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)
    assert finish(sup) == 0, (tmp_path / "sup.log").read_text()[-3000:]

    ev = events(run_dir)
    names = [e["event"] for e in ev]
    assert [n for n in names if n.startswith("thermal")] == ["thermal_stop", "thermal_cooled"]
    exits = [e for e in ev if e["event"] == "attempt_exit"]
    assert [e["kind"] for e in exits] == ["saved", "finished"]  # attempt 1 saved and exited 75
    saved_step = exits[0]["newest_checkpoint"]
    assert saved_step > 0
    assert any(e["event"] == "checkpoint" and e["step"] == saved_step and e["reason"] == "preempt" for e in ev)
    starts = [i for i, e in enumerate(ev) if e["event"] == "state" and e["to"] == "starting"]
    waiting = [i for i, e in enumerate(ev) if e["event"] == "state" and e["to"] == "waiting"]
    cooled = names.index("thermal_cooled")
    assert len(starts) == 2 and len(waiting) == 1
    assert "too hot" in ev[waiting[0]]["cause"]
    assert starts[0] < names.index("thermal_stop") < waiting[0] < cooled < starts[1]  # no restart while hot
    assert ev[starts[1]]["resume_from"].endswith(f"step-{saved_step:08d}")
    # The stop lost no work: the same weights as an uninterrupted run (the fake rank is deterministic).
    ref = tmp_path / "ref"
    ref.mkdir()
    r = run_cli("run", str(write_job(ref, args, run_dir=ref / "run", launch={"launcher": "python", "cpu": True},
                                     gpu={"enabled": False})))
    assert r.returncode == 0, r.stdout + r.stderr
    assert final_weights(run_dir) == final_weights(ref / "run")


@pytest.mark.slow
def test_pause_holds_two_cpu_ranks_at_the_same_step(tmp_path, cleanup, monkeypatch):
    monkeypatch.setenv("TOY_LOG", "INFO")  # each rank logs "paused at step N"
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    # hot from 20 s to 24 s after the supervisor started: 2 ranks' start-up takes 5-15 s (more on a loaded
    # machine), and 500 steps of >= 40 ms keep them training until well past the window
    points = [point(0, 60), point(20.0, 88), point(24.0, 70)]
    job = write_job(tmp_path, ["--steps", "500", "--micro-batch", "2", "--grad-accum", "1", "--sleep-s", "0.04",
                               "--eval-every", "0", "--dataset-size", "64"],
                    script=TOY, launch={"num_processes": 2}, gpu=gpu_section(tmp_path, points))
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)
    assert finish(sup) == 0, (tmp_path / "sup.log").read_text()[-3000:]
    assert [e["event"] for e in events(run_dir) if e["event"].startswith("thermal")] == ["thermal_pause",
                                                                                         "thermal_resume"]
    log = (run_dir / "logs" / "attempt-1.log").read_text()
    paused = sorted(line.split("]:", 1)[0] + " " + line.rsplit("paused at step", 1)[1].split()[0]
                    for line in log.splitlines() if "paused at step" in line)
    assert len(paused) == 2, log[-3000:]
    (r0, s0), (r1, s1) = (p.split() for p in paused)
    assert {r0, r1} == {"[rank0", "[rank1"} and s0 == s1, paused
    assert json.loads((run_dir / "final_hash.json").read_text())["step"] == 500


# --------------------------------------------------------------------------- OOM back-off


def trajectory(sample_log: Path) -> tuple[dict[int, list[float]], dict[tuple[int, int], list[float]]]:
    """Rows trained per step by the attempt that carried each step into the final run, and per (attempt, step)."""
    by_attempt: dict[tuple[int, int], list[float]] = {}
    for line in sample_log.read_text().splitlines():
        rec = json.loads(line)
        by_attempt.setdefault((rec["attempt"], rec["step"]), []).extend(rec["rows"])
    final: dict[int, list[float]] = {}
    for (attempt, step), rows in sorted(by_attempt.items()):
        final[step] = rows  # a later attempt's copy of a step replaces the earlier one
    return final, by_attempt


@pytest.mark.slow
def test_oom_halves_the_micro_batch_keeps_the_effective_batch_and_resumes_exactly(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    log = tmp_path / "samples.jsonl"
    # 8 x 1 fits until step 6, then only micro-batches of 2 fit: 8x1 -> 4x2 (OOM again) -> 2x4.
    args = ["--fit", "2", "--oom-from-step", "6", "--sample-log", str(log), "--micro-batch", "8", "--grad-accum", "1",
            "--steps", "16", "--dataset-size", "64", "--save-every", "4"]
    job = write_job(tmp_path, args, script=OOM_TRAIN)
    sup = start_supervisor(job, log=tmp_path / "sup.log")
    cleanup[1].append(sup)
    assert finish(sup, 150) == 0, (tmp_path / "sup.log").read_text()[-3000:]

    ev = events(run_dir)
    assert [e["kind"] for e in ev if e["event"] == "attempt_exit"] == ["oom", "oom", "finished"]
    backoffs = [e for e in ev if e["event"] == "oom_backoff"]
    assert [(e["old"], e["new"]) for e in backoffs] == [
        ({"micro_batch": 8, "grad_accum": 1}, {"micro_batch": 4, "grad_accum": 2}),
        ({"micro_batch": 4, "grad_accum": 2}, {"micro_batch": 2, "grad_accum": 4}),
    ]
    assert all(e["effective_batch_per_rank"] == 8 for e in backoffs)
    starts = [e for e in ev if e["event"] == "state" and e["to"] == "starting"]
    assert [Path(e["resume_from"]).name if e.get("resume_from") else None for e in starts] == [
        None, "step-00000004", "step-00000004"]  # each back-off resumes from the newest checkpoint

    manifest = json.loads((run_dir / "checkpoints" / "step-00000016" / "manifest.json").read_text())
    assert (manifest["micro_batch"], manifest["grad_accum"]) == (2, 4)
    assert manifest["samples_seen"] == 16 * 8

    # Sample-exact: the steps redone after each back-off trained the very same rows, and each
    # epoch of the final run saw every row exactly once.
    final, by_attempt = trajectory(log)
    assert sorted(final) == list(range(16)) and all(len(rows) == 8 for rows in final.values())
    for step in (4, 5):
        assert by_attempt[(1, step)] == by_attempt[(2, step)] == by_attempt[(3, step)]
    for epoch in (0, 1):
        rows = [r for s in range(8 * epoch, 8 * epoch + 8) for r in final[s]]
        assert len(rows) == 64 and len(set(rows)) == 64

    r = run_cli("status", str(run_dir))
    assert "batch:           micro-batch 2 x 4 accumulation x 1 rank(s) = 8 samples/step (OOM back-off)" in r.stdout
    assert "gpu:" not in r.stdout  # a CPU job: no GPU watcher (no NVML, no "unmonitored" warning)
    assert "power:           no power supplies found (desktop/server): treated as on AC" in r.stdout

    # A new supervisor on this run dir keeps the back-off for a checkpoint written with it.
    r = run_cli("run", str(job), "--set", "restart.max_restarts=0")
    assert r.returncode == 0, r.stdout + r.stderr
    restored = events(run_dir, "oom_backoff_restored")
    assert [e["new"] for e in restored] == [{"micro_batch": 2, "grad_accum": 4}]


@pytest.mark.slow
def test_oom_at_the_floor_gives_up_with_exit_3_and_the_reason(tmp_path, cleanup):
    run_dir = tmp_path / "run"
    cleanup[0].append(run_dir)
    args = ["--fit", "0", "--micro-batch", "2", "--grad-accum", "1", "--steps", "8", "--dataset-size", "32"]
    job = write_job(tmp_path, args, script=OOM_TRAIN)
    r = run_cli("run", str(job), timeout=120)
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    ev = events(run_dir)
    assert [e["kind"] for e in ev if e["event"] == "attempt_exit"] == ["oom", "oom"]
    assert [e["new"] for e in ev if e["event"] == "oom_backoff"] == [{"micro_batch": 1, "grad_accum": 2}]
    give_up = events(run_dir, "oom_give_up")
    assert len(give_up) == 1 and (give_up[0]["micro_batch"], give_up[0]["grad_accum"]) == (1, 2)
    sup = read_json(run_dir / "supervisor.json")
    assert sup["exit_code"] == 3
    assert sup["exit_reason"].startswith("gave up: CUDA out of memory at micro-batch 1 (x2 accumulation)")
    assert "oom_min_micro_batch" in sup["exit_reason"]
    assert "gave up: CUDA out of memory at micro-batch 1" in r.stdout
