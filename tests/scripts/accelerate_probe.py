"""Writes what accelerate made of this process's environment to $PROBE_OUT (JSON)."""

import json
import os
import sys

import torch
from accelerate import Accelerator

acc = Accelerator()
state = {
    "device": str(acc.device),
    "distributed_type": str(acc.distributed_type),
    "mixed_precision": acc.mixed_precision,
    "num_processes": acc.num_processes,
    "process_index": acc.process_index,
    "use_cpu": acc.state.use_cpu if hasattr(acc.state, "use_cpu") else None,
    "dynamo_backend": str(acc.state.dynamo_plugin.backend),
    "torch_threads": torch.get_num_threads(),
    "env": {k: v for k, v in os.environ.items() if k.startswith(("ACCELERATE_", "OMP_", "KMP_"))},
}
with open(os.environ["PROBE_OUT"] + f".{os.getpid()}", "w") as f:
    json.dump(state, f)
sys.exit(0)
