"""A Lightning callback that ends a spawned rank's process group when the rank finishes fitting.

Lightning's ``ddp_spawn`` launcher leaves the process group alive when its worker returns, so the
group (and the gloo work a DDP reducer holds) is freed while the interpreter shuts down, where
gloo's threads can abort the process (SIGABRT, "terminate called without an active exception").
Nothing runs a collective after ``teardown`` (rank 0 only saves its weights for the parent), so
the tests' multi-process trainers end each rank through ``tests.launch.end_rank`` there. A module
of its own, so that importing ``tests.launch`` does not import Lightning.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from .launch import end_rank


class EndRank(Callback):
    """Destroy the process group and collect garbage at ``teardown`` when more than one process runs."""

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.world_size > 1:
            end_rank()
