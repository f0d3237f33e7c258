"""How a run is spread over processes, as the trainer sees it.

A :class:`Runtime` answers the few questions the trainer has about the other ranks: how to load the
model (whole, or partitioned at construction), which ``shard_fn`` / ``loss_reduce`` the ZO optimizer
needs, how to sum a few numbers over ranks, how to collect the full weights on rank 0 for a
checkpoint. :class:`Runtime` itself is one process holding the whole model; ``replicated`` (every
rank holds the whole model, torch.distributed) and ``zero3`` (DeepSpeed partitions) are in their own
modules, and :mod:`zo_scale.train.select_runtime` picks one from the config and the launcher's environment.

Every method here is called by every rank at the same point: the distributed ones are collectives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

ModelAndTokenizer = tuple[torch.nn.Module, Any]


class Runtime:
    """One process, the whole model: every collective is the identity."""

    name = "single"
    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, shows the progress bar and writes every file."""
        return self.rank == 0

    @property
    def comm_bytes(self) -> int:
        """Bytes this rank has sent in the ZO optimizer's own collectives (the loss all-reduces)."""
        return 0

    def load_model(self, load: Callable[[], ModelAndTokenizer]) -> ModelAndTokenizer:
        """Run ``load`` (which builds the model and tokenizer) the way this runtime needs."""
        return load()

    def optimizer_kwargs(self) -> dict[str, Any]:
        """``shard_fn`` / ``loss_reduce`` for :class:`~zo_scale.core.optimizer.ZOOptimizer`."""
        return {}

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over ranks (float64)."""
        return list(values)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0; None elsewhere."""
        return [obj]

    def check_same(self, value: int, what: str) -> None:
        """Raise unless ``value`` is equal on every rank (a debug check: ranks that disagree desynchronize)."""

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The full weights on rank 0 (None elsewhere); None also means 'the model's own state_dict'."""
        del model
        return None

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self) -> None:
        """Release the process group (after a barrier, so no rank tears it down under a peer)."""


def quiet_unless_main(runtime: Runtime) -> None:
    """Ranks other than 0 log warnings and errors only: one copy of every info line."""
    if not runtime.is_main:
        logging.getLogger("zo_scale").setLevel(logging.WARNING)
