"""One rank on one machine starts without `accelerate launch` (supervisor/runner/launch.py):
the same environment as accelerate's own simple launcher, checked against accelerate itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import load_job
from supervisor.runner import launch as L
from supervisor_helpers import CLI, env, write_job

PROBE = Path(__file__).parent / "scripts" / "accelerate_probe.py"


def accelerate_env(argv: list[str], base: dict[str, str]) -> dict[str, str]:
    """What accelerate's launcher adds to `base` for this launcher argv (its own code path)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    i = argv.index("accelerate.commands.launch")
    args = launch_command_parser().parse_args(argv[i + 1:])
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(base)
    try:
        args, _, _ = _validate_launch_command(args)
        _, out = prepare_simple_launcher_cmd_env(args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {k: v for k, v in out.items() if base.get(k) != v}


@pytest.mark.parametrize("launch, base", [
    ({"cpu": True}, {}),
    ({"cpu": True, "mixed_precision": "bf16"}, {"OMP_NUM_THREADS": "3"}),
    ({"cpu": False, "mixed_precision": "fp16"}, {}),
    ({"cpu": False}, {"OMP_NUM_THREADS": "2"}),
])
def test_direct_env_is_what_accelerate_launch_sets(tmp_path, launch, base, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no default accelerate config of this machine
    base = dict(base, PATH=os.environ["PATH"], HF_HOME=str(tmp_path / "hf"))
    direct = load_job(write_job(tmp_path, ["--x"], launch=launch))
    via = load_job(write_job(tmp_path, ["--x"], launch={**launch, "direct": False}))
    plan = L.build_launch(direct, attempt=1, resume_from=None, supervisor_pid=1, base_env=base)
    assert plan.argv == (sys.executable, str(direct.train.script), "--x") and plan.launcher_is_rank
    launcher = L.build_launch(via, attempt=1, resume_from=None, supervisor_pid=1, base_env=base)
    assert "accelerate.commands.launch" in launcher.argv and not launcher.launcher_is_rank
    expected = accelerate_env(list(launcher.argv), dict(launcher.env))
    assert expected  # accelerate does add variables: the comparison below means something
    assert {k: plan.env.get(k) for k in expected} == expected


@pytest.mark.parametrize("launch", [
    {"direct": False},
    {"num_processes": 2},
    {"extra_args": ["--debug"]},
    {"num_machines": 2, "num_processes": 2, "machine_rank": 0, "main_process_ip": "10.0.0.1", "main_process_port": 29500},
])
def test_launcher_kept_where_only_accelerate_knows_what_to_do(tmp_path, launch):
    job = load_job(write_job(tmp_path, [], launch=launch))
    assert not L.starts_directly(job)
    assert "accelerate.commands.launch" in L.build_launch(job, attempt=1, resume_from=None, supervisor_pid=1,
                                                          base_env={}, port=29999).argv


def test_launcher_kept_with_a_config_file(tmp_path):
    cfg = tmp_path / "acc.yaml"
    cfg.write_text("num_processes: 1\n")
    assert not L.starts_directly(load_job(write_job(tmp_path, [], launch={"config_file": str(cfg)})))


@pytest.mark.slow
def test_rank_sees_the_same_accelerator_either_way(tmp_path):
    """A real Accelerator in a real rank, started directly and through `accelerate launch`."""
    seen = {}
    for direct in (True, False):
        d = tmp_path / str(direct)
        d.mkdir()
        job = write_job(d, [], script=PROBE, launch={"cpu": True, "mixed_precision": "bf16", "direct": direct})
        out = d / "probe.json"
        r = subprocess.run([*CLI, "run", str(job)], env={**env(), "PROBE_OUT": str(out), "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        (found,) = d.glob("probe.json.*")
        seen[direct] = json.loads(found.read_text())
    assert seen[True] == seen[False]
    assert seen[True]["mixed_precision"] == "bf16" and seen[True]["device"] == "cpu"
    assert seen[True]["torch_threads"] == 1


def test_a_node_of_several_machines_launches_its_share_at_the_job_s_port(tmp_path):
    job = load_job(write_job(tmp_path, [], launch={"num_machines": 2, "num_processes": 4, "machine_rank": 1,
                                                   "main_process_ip": "10.0.0.1", "main_process_port": 29500}))
    plan = L.build_launch(job, attempt=3, resume_from=None, supervisor_pid=1, base_env={"TRAINSUP_MACHINE_RANK": "7"},
                          port=29999)
    argv = list(plan.argv)
    assert plan.world_size_local == 2  # accelerate's --num_processes 4 counts both machines
    assert argv[argv.index("--machine_rank") + 1] == "1" and argv[argv.index("--num_processes") + 1] == "4"
    assert argv[argv.index("--main_process_port") + 1] == "29500"  # the job's, the same on every node
    assert plan.env["TRAINSUP_MACHINE_RANK"] == "1"
    assert argv[argv.index("--log_dir") + 1] == str(tmp_path / "run" / "nodes" / "node-1" / "logs" / "attempt-3-ranks")
    one = L.build_launch(load_job(write_job(tmp_path, [])), attempt=1, resume_from=None, supervisor_pid=1,
                         base_env={"TRAINSUP_MACHINE_RANK": "7"})
    assert "TRAINSUP_MACHINE_RANK" not in one.env
