"""Where a run stands at a checkpoint: one record, written to manifest.json and trainer_state.json.

A checkpoint says twice where training stopped: in its manifest (read by the store, the
supervisor and the CLI without unpickling anything) and in trainer_state.json (read by the
ranks on resume). Both are written from one Position, built once per save, so the two can
never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

TRAINER_STATE_FORMAT = 1


def samples_in_epoch(batch_in_epoch: int, micro_batch: int | None, world_size: int) -> int:
    """Samples of the epoch consumed by all ranks (nominal: full micro-batches)."""
    return batch_in_epoch * (micro_batch or 1) * world_size


@dataclass(frozen=True)
class Position:
    """The run's position at an optimizer-step boundary, the batch shape that got it there,
    and what must match to continue from it (registered objects, config)."""

    global_step: int
    epoch: int
    batch_in_epoch: int  # micro-batches each rank consumed in this epoch
    epoch_complete: bool  # the step that ended the epoch: resume starts the next one
    micro_batch: int | None
    grad_accum: int
    world_size: int
    tokens_seen: int  # global, over all ranks
    samples_seen: int
    registered: tuple[str, ...]
    config: Mapping[str, Any]
    config_fingerprint: str

    @property
    def samples_in_epoch(self) -> int:
        return samples_in_epoch(self.batch_in_epoch, self.micro_batch, self.world_size)

    def shared(self) -> dict[str, Any]:
        """The keys both files carry, with the same values. The step is not among them: the
        manifest calls it "step" (CheckpointStore.commit), trainer_state.json "global_step"."""
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "epoch_complete": self.epoch_complete,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "world_size": self.world_size,
            "tokens_seen": self.tokens_seen,
            "samples_seen": self.samples_seen,
            "registered": list(self.registered),
            "config": self.config,
            "config_fingerprint": self.config_fingerprint,
        }

    def trainer_state(self, **more: Any) -> dict[str, Any]:
        """trainer_state.json: the shared keys, the step, and `more` (best metric, seed ...)."""
        return {"format": TRAINER_STATE_FORMAT, "global_step": self.global_step, **self.shared(), **more}

    def manifest_extra(self, **more: Any) -> dict[str, Any]:
        """The manifest's keys beyond those CheckpointStore.commit writes itself."""
        return {**self.shared(), **more}
