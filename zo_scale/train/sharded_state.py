"""The ZO optimizer's state in files that do not depend on how the parameters are partitioned.

Per-element tensors (momentum, Adam's moments, the fp32 master copy) live per shard: a ZeRO-3 rank
holds elements [offset, offset + n) of each flattened parameter. :func:`save` has every rank write
its own slices to ``optimizer_state.rank<r>.safetensors`` (key ``"<index>.<buffer>"``, the slices'
global offsets in the file's metadata) and rank 0 the rest of the state dict (param groups,
counters, 0-dim step counts, LOZO-M's factors) to ``optimizer.pt``. :func:`load` has every rank read,
from each saved file, only the part of each slice that overlaps its own shard (safetensors slices:
no rank reads a whole file or holds another rank's state), so a checkpoint written on W ranks
resumes on any W', 1 included. Nothing goes through a collective, and no tensor is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zo_scale.backends.runtime import Runtime
from zo_scale.core.optimizer import ZOOptimizer
from zo_scale.core.shards import ShardSpan
from zo_scale.train.checkpoint import reading, torch_load

STATE_FILE = "optimizer.pt"
SLICES_GLOB = "optimizer_state.rank*.safetensors"
PER_ELEMENT = "per_element"  # in optimizer.pt: {index: [names of the buffers kept in the slice files]}


def slices_file(rank: int) -> str:
    return f"optimizer_state.rank{rank}.safetensors"


def _is_per_element(optimizer: ZOOptimizer, key: str, value: Any) -> bool:
    return key in optimizer.per_element_keys and isinstance(value, torch.Tensor) and value.dim() == 1


def save(optimizer: ZOOptimizer, runtime: Runtime, folder: Path) -> None:
    """Write this rank's slices (every rank) and the shared state (rank 0) into ``folder``. Flushes a
    pending update. Every rank must call it (each writes its own file; no collective)."""
    local = optimizer.state_dict()
    spans = optimizer.shard_spans
    slices: dict[str, torch.Tensor] = {}
    offsets: dict[str, int] = {}
    rest: dict[int, dict[str, Any]] = {}
    listed: dict[int, list[str]] = {}
    for i, buffers in local["state"].items():
        rest[i] = {}
        for k, v in buffers.items():  # state_dict() shares these dicts with the live state: copy, never pop
            if _is_per_element(optimizer, k, v):
                slices[f"{i}.{k}"] = v.detach().to("cpu").contiguous()
                offsets[f"{i}.{k}"] = spans[i].offset
                listed.setdefault(i, []).append(k)
            else:
                rest[i][k] = v
    save_file(slices, folder / slices_file(runtime.rank), metadata={"offsets": json.dumps(offsets)})
    if runtime.is_main:
        torch.save({**local, "state": rest, PER_ELEMENT: listed}, folder / STATE_FILE)


def load(optimizer: ZOOptimizer, folder: Path) -> None:
    """Load the state :func:`save` wrote (on any number of ranks) into this rank's shards. A checkpoint
    whose ``optimizer.pt`` holds full-length per-element buffers itself (written before the slice
    files existed, or a single-process ``state_dict()``) loads too: each rank cuts out its part."""
    saved = torch_load(folder / STATE_FILE, folder)
    listed = saved.pop(PER_ELEMENT, {})
    spans = optimizer.shard_spans
    state: dict[int, dict[str, Any]] = {}
    for i, buffers in saved["state"].items():
        span = spans[int(i)]
        state[i] = {k: v[span.offset : span.offset + span.numel].clone()
                    if _is_per_element(optimizer, k, v) else v for k, v in buffers.items()}
    wanted = {f"{i}.{k}" for i, names in listed.items() for k in names}
    for key, value in _read_own_slices(folder, spans, wanted).items():
        i, k = key.split(".", 1)
        state[int(i)][k] = value
    optimizer.load_state_dict({**saved, "state": state})


def _read_own_slices(folder: Path, spans: list[ShardSpan], wanted: set[str]) -> dict[str, torch.Tensor]:
    """For each wanted ``"<index>.<buffer>"``, the elements of this rank's shard of that parameter,
    assembled from the overlapping parts of every saved rank's slice."""
    out: dict[str, torch.Tensor] = {}
    # the ranges of this rank's shard each key got: saved slices may overlap (a parameter every rank holds
    # whole, such as a ZeRO-3 persistent one, is saved whole by every rank)
    got: dict[str, list[tuple[int, int]]] = {k: [] for k in wanted}
    for file in sorted(folder.glob(SLICES_GLOB)):
        with reading(file, folder), safe_open(file, "pt") as f:
            offsets = json.loads(f.metadata()["offsets"])
            for key in wanted & offsets.keys():
                span = spans[int(key.split(".", 1)[0])]
                lo, hi = span.offset, span.offset + span.numel
                if key not in out:
                    out[key] = torch.zeros(hi - lo, dtype=torch.float32)  # per-element state is fp32
                part = f.get_slice(key)
                start = offsets[key]
                a, b = max(lo, start), min(hi, start + part.get_shape()[0])
                if a < b:
                    out[key][a - lo : b - lo] = part[a - start : b - start]
                    got[key].append((a - lo, b - lo))
    short = [k for k in wanted if not _covers(got[k], spans[int(k.split(".", 1)[0])].numel)]
    if short:
        raise ValueError(f"{folder}: the optimizer state slices do not cover this rank's part of {short[:3]} "
                         f"(files {sorted(p.name for p in folder.glob(SLICES_GLOB))}); the checkpoint is incomplete")
    return {k: out.get(k, torch.zeros(0)) for k in wanted}


def _covers(ranges: list[tuple[int, int]], numel: int) -> bool:
    """Whether the half-open ``ranges`` together cover [0, numel)."""
    end = 0
    for a, b in sorted(ranges):
        if a > end:
            return False
        end = max(end, b)
    return end >= numel
