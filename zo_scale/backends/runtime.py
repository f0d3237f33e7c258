"""How a run is spread over processes, as the trainer sees it.

A :class:`Runtime` answers the few questions the trainer has about the other ranks: how to load the
model (whole, or partitioned at construction), which ``shard_fn`` / ``loss_reduce`` the ZO optimizer
needs, how to sum a few numbers over ranks, how to collect the full weights on rank 0 for a
checkpoint. :class:`Runtime` itself is one process holding the whole model; ``replicated`` (every
rank holds the whole model, torch.distributed) and ``zero3`` (DeepSpeed partitions) are in their own
modules, and :mod:`zo_scale.train.select_runtime` picks one from the config and the launcher's environment.

First-order (FO) hooks, for the hybrid ZO-FO optimizer (:mod:`zo_scale.train.hybrid`), where a few
blocks train by backprop: :meth:`Runtime.fo_forward`, :meth:`Runtime.fo_backward` (backward, then
:meth:`Runtime.average_gradients`), :meth:`Runtime.fo_step` and :meth:`Runtime.fo_zero_grad`. Here they
are plain torch (``loss.backward()``, ``fo.step()``); replicated averages the gradients in one
all-reduce; ZeRO-3 hands backward and step to the DeepSpeed engine, which owns the FO partitions.

Every method here is called by every rank at the same point: the distributed ones are collectives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ModelAndTokenizer = tuple[torch.nn.Module, Any]


class Runtime:
    """One process, the whole model: every collective is the identity."""

    name = "single"
    rank = 0
    world_size = 1
    deepspeed_config: dict[str, Any] | None = None  # the DeepSpeed config the run reconciled and ran with, if any

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, shows the progress bar and writes every file."""
        return self.rank == 0

    @property
    def comm_bytes(self) -> int:
        """Bytes this rank has handed to the optimizers' own collectives (the ZO loss all-reduces and, for a
        hybrid run, the FO gradient reduction)."""
        return 0

    @property
    def gathered_bytes(self) -> int:
        """Bytes of parameters this rank has all-gathered (ZeRO-3's fetches before each module runs):
        the output of every all-gather, so one gather of the whole model adds the model's bytes."""
        return 0

    @property
    def swapped_bytes(self) -> int:
        """Bytes of parameter partitions this rank has read from and written to NVMe (ZeRO-3 offload)."""
        return 0

    @property
    def stored_bytes(self) -> int:
        """Bytes of parameters this rank's ZO optimizer has stored from inside the forward (``store_fn``: an update
        landed on a gathered parameter written back to the rank's partition: device memory, host memory under CPU
        offload, its NVMe file). Sweeps' writes are not counted."""
        return 0

    def load_model(self, load: Callable[[], ModelAndTokenizer]) -> ModelAndTokenizer:
        """Run ``load`` (which builds the model and tokenizer) the way this runtime needs."""
        return load()

    def optimizer_kwargs(self) -> dict[str, Any]:
        """``shard_fn`` / ``loss_reduce`` / ``store_fn`` / ``writing``: the backend's hooks of
        :class:`~zo_scale.core.optimizer.ZOOptimizer`."""
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

    def save_model(self, model: torch.nn.Module, folder: Path, max_shard_bytes: int) -> None:
        """Write the full model as an HF folder (config + sharded safetensors, shards of at most
        ``max_shard_bytes``) into ``folder``, from rank 0; a collective."""
        if self.is_main:
            model.save_pretrained(folder, max_shard_size=max_shard_bytes)

    def barrier(self) -> None:
        """Wait for every rank."""

    # -- first-order hooks (hybrid ZO-FO) ----------------------------------------------------------
    def fo_forward(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``loss_fn()`` with autograd on: the FO forward, whose graph :meth:`fo_backward` consumes."""
        with torch.enable_grad():
            return loss_fn()

    def fo_backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> float:
        """Backward of this rank's ``loss`` (0-dim), then the gradients of ``params`` averaged over ranks.

        Returns the loss averaged over ranks. When that is not finite, the gradients are dropped
        (``.grad = None``) on every rank alike, so the caller skips the FO update with no rank out of step.
        """
        loss.backward()
        (mean,) = self.average_gradients(params, [float(loss.detach())])  # float(): a host sync
        if not math.isfinite(mean):
            for p in params:
                p.grad = None
        return mean

    def average_gradients(self, params: Sequence[torch.Tensor], scalars: Sequence[float] = ()) -> list[float]:
        """Average ``p.grad`` over data-parallel ranks in place, and ``scalars`` with them; returns the
        averaged scalars. One process: nothing to average."""
        del params
        return [float(x) for x in scalars]

    def fo_step(self, fo: torch.optim.Optimizer) -> None:
        """Apply the FO update from the (averaged) gradients and clear them."""
        fo.step()
        fo.zero_grad(set_to_none=True)

    def fo_zero_grad(self, fo: torch.optim.Optimizer) -> None:
        """Drop the FO gradients without an update (a skipped step)."""
        fo.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Release the process group (after a barrier, so no rank tears it down under a peer)."""


def quiet_unless_main(runtime: Runtime) -> None:
    """Ranks other than 0 log warnings and errors only: one copy of every info line."""
    if not runtime.is_main:
        logging.getLogger("zo_scale").setLevel(logging.WARNING)
