"""Data parallel with replicated weights: every rank holds the whole model and applies the same update.

Rank r evaluates the loss of its own micro-batch at theta +/- eps z; one all-reduce averages those
few losses, so every rank forms the same projected gradient, regenerates the same z from the
step's seed and applies the same update to its own full copy. Ranks exchange a few float64 scalars
a step instead of a first-order step's full gradient, and the copies stay bitwise identical
because each rank performs the same float operations on the same numbers.

Hybrid ZO-FO (:mod:`zo_scale.train.hybrid`): the FO part is ordinary data parallelism. Each rank
backpropagates its micro-batch and :meth:`DistributedRuntime.average_gradients` averages the FO
gradients (and the FO loss, in the same buffer) in one all-reduce of a flat fp32 bucket, so the
FO optimizers on every rank see the same gradient and the copies stay identical.

Works under any launcher that sets torch.distributed's env (``torchrun``, ``deepspeed`` with a
ZeRO stage 0-2 config, ``accelerate launch``): ZeRO stages 1 and 2 partition optimizer states and
gradients, which ZO does not have, so under ZO they mean the same as this.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from zo_scale.backends.runtime import Runtime


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


class DistributedRuntime(Runtime):
    """torch.distributed from the launcher's env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""

    name = "replicated"

    def __init__(self, backend: str | None = None, timeout_s: float = 300.0) -> None:
        self.backend = backend or default_backend()
        self.device = torch.device("cpu")
        if self.backend == "nccl":  # one GPU per rank, by the launcher's LOCAL_RANK
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(self.backend, timeout=timedelta(seconds=timeout_s))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._sent = 0

    @property
    def comm_bytes(self) -> int:
        return self._sent

    def optimizer_kwargs(self) -> dict[str, Any]:
        return {"loss_reduce": self.mean}

    def mean(self, losses: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of a step's losses (1-D float64, one per evaluated point): one all-reduce."""
        buffer = losses.to(self.device, torch.float64, copy=True)
        self._sent += buffer.numel() * buffer.element_size()
        dist.all_reduce(buffer)
        return buffer.div_(self.world_size).to(losses.device)

    def average_gradients(self, params: Sequence[torch.Tensor], scalars: Sequence[float] = ()) -> list[float]:
        """Mean over ranks of every ``p.grad`` (in place) and of ``scalars``: one all-reduce of one flat bucket.

        Bucket layout: [grad_0.flatten(), grad_1.flatten(), ..., scalars], in fp32 (or a wider gradient
        dtype): bf16 gradients are summed in fp32 and rounded once on the way back. Parameters without
        a gradient are left out: every rank runs the same graph, so the same ones are missing
        everywhere. Costs one fp32 copy of the FO gradients while it runs.
        """
        grads = [p.grad for p in params if p.grad is not None]
        dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads), torch.float32)
        bucket = torch.cat([*(g.reshape(-1).to(self.device, dtype) for g in grads),
                            torch.tensor(list(scalars), dtype=dtype, device=self.device)])
        self._sent += bucket.numel() * bucket.element_size()
        dist.all_reduce(bucket)
        bucket.div_(self.world_size)
        start = 0
        for g in grads:  # [start, start + numel) of the bucket is this gradient
            g.copy_(bucket[start : start + g.numel()].view_as(g))
            start += g.numel()
        return bucket[start:].tolist()

    def sum(self, values: list[float]) -> list[float]:
        buffer = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(buffer)
        return buffer.tolist()

    def gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def check_same(self, value: int, what: str) -> None:
        low_and_minus_high = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(low_and_minus_high, op=dist.ReduceOp.MIN)  # [min x, -max x] in one collective
        low, high = int(low_and_minus_high[0]), -int(low_and_minus_high[1])
        if low != high:
            raise RuntimeError(f"{what} differs across ranks (from {low} to {high}): the ranks have "
                               "desynchronized (different configs or code on different ranks?)")

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
