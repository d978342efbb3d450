"""The collectives a TrainSession makes, in one place.

Every rank makes each call at the same point of the run, or none does: a rank that fails
locally still takes part, with its failure as its value, so no rank is left waiting alone.
With one process, or without torch.distributed initialised, every call is the identity.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from accelerate.utils import broadcast_object_list


class Collectives:
    def __init__(self, world_size: int, device: Any) -> None:
        self.world_size = world_size
        self.device = device  # where the reductions' tensors live (NCCL needs the rank's GPU)

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled: keep it small). Other ranks' `obj` is ignored."""
        if not self.active:
            return obj
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def all_max(self, values: Sequence[int]) -> list[int]:
        """The element-wise maximum over ranks: one rank's "stop" or "failed" is every rank's."""
        return self._all_reduce(values, "MAX")

    def all_sum(self, values: Sequence[int]) -> list[int]:
        return self._all_reduce(values, "SUM")

    def all_ok(self, ok: bool) -> bool:
        """True when `ok` on every rank (a barrier too)."""
        return self.all_max([0 if ok else 1]) == [0]

    def _all_reduce(self, values: Sequence[int], op: str) -> list[int]:
        values = [int(v) for v in values]
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return [int(v) for v in t.tolist()]
