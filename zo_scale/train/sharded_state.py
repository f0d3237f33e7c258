"""The ZO optimizer's state in a form that does not depend on how parameters are partitioned.

Per-element tensors (momentum, Adam's moments, the fp32 master copy) live per shard: a ZeRO-3 rank holds elements
[offset, offset + n) of each flattened parameter. :func:`consolidate` collects them on rank 0 into
full-length flat buffers, which is exactly the state dict a single process has (its shard is the
whole parameter, offset 0); :func:`localize` cuts a consolidated state dict down to this rank's
shards. So a checkpoint written on W ranks resumes on W' ranks, W' = 1 included. Everything else in
the state (step counts, LOZO-M's factor, counters) is the same on every rank and kept as it is.
"""

from __future__ import annotations

from typing import Any

import torch

from zo_scale.backends.runtime import Runtime
from zo_scale.core.optimizer import ZOOptimizer


def _is_per_element(optimizer: ZOOptimizer, key: str, value: Any) -> bool:
    return key in optimizer.per_element_keys and isinstance(value, torch.Tensor) and value.dim() == 1


def consolidate(optimizer: ZOOptimizer, runtime: Runtime) -> dict[str, Any] | None:
    """The full optimizer state dict on rank 0 (None elsewhere); a collective. Flushes a pending update."""
    local = optimizer.state_dict()
    shards = optimizer.local_shards()
    pieces = {(i, k): (shards[i].offset, v.cpu()) for i, buffers in local["state"].items() for k, v in buffers.items()
              if _is_per_element(optimizer, k, v)}
    gathered = runtime.gather(pieces)
    if gathered is None:
        return None
    for (i, k), (_, first) in pieces.items():
        full = torch.zeros(shards[i].shape.numel(), dtype=first.dtype)
        for rank_pieces in gathered:
            offset, values = rank_pieces[(i, k)]
            full[offset : offset + values.numel()] = values
        local["state"][i][k] = full
    return local


def localize(optimizer: ZOOptimizer, full: dict[str, Any]) -> None:
    """Load a consolidated state dict (from :func:`consolidate`, or any single-process one) into
    this rank's shards."""
    shards = optimizer.local_shards()
    state = {}
    for i, buffers in full["state"].items():
        shard = shards[int(i)]
        state[i] = {k: v[shard.offset : shard.offset + shard.flat.numel()].clone()
                    if _is_per_element(optimizer, k, v) else v
                    for k, v in buffers.items()}
    optimizer.load_state_dict({**full, "state": state})
