"""supervisor.watch.registry: which watchers a job gets."""

from __future__ import annotations

import json

from supervisor.watch import registry as extensions
from supervisor.config import load_job
from supervisor.watch.gpu import GpuWatcher
from supervisor_helpers import write_job


def _gpu(tmp_path, launch: dict, gpu: dict | None = None):
    sections = {"launch": launch} | ({"gpu": gpu} if gpu else {})
    w = extensions.gpu_watcher(load_job(write_job(tmp_path, [], **sections)))
    if w is not None:
        w.close()
    return w


def test_gpu_watcher_only_where_a_gpu_is_used(tmp_path):
    (tmp_path / "heat.json").write_text(json.dumps({"points": [{"t_s": 0, "temp_c": 50}]}))
    assert _gpu(tmp_path, {"cpu": True}) is None  # a CPU job: no NVML, no warning
    assert _gpu(tmp_path, {"cpu": False}, {"enabled": False}) is None
    assert isinstance(_gpu(tmp_path, {"cpu": False}), GpuWatcher)  # NVML (unavailable here: warns, runs on)
    assert isinstance(_gpu(tmp_path, {"cpu": True}, {"fake_script": "heat.json"}), GpuWatcher)  # tests, demos
