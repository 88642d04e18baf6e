"""torchrun / accelerate launch: one process group, rank-0-only writes, decisions broadcast from rank 0.

The process group is created here (before the HF trainer would create it) so that the stage can agree on
"skip or run" and "resume from which checkpoint" across ranks before any training starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as tdist

            tdist.barrier()

    def from_main(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (the others' argument is ignored)."""
        if not self.enabled:
            return value
        import torch.distributed as tdist

        box: list[Any] = [value if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed() -> Dist:
    """Join the process group that torchrun describes in the environment; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as tdist

    if not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend=backend)
    return Dist(tdist.get_rank(), tdist.get_world_size())
