"""Hugging Face's sharded safetensors layout, written from a stream of tensors one shard at a time.

A folder holds ``model.safetensors`` (one shard) or ``model-00001-of-0000N.safetensors`` ... plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``),
which ``from_pretrained`` reads. The shards are planned from the tensors' names, shapes and dtypes
before any data is seen (greedily in order, a new shard when the next tensor would pass
``max_shard_bytes``, as ``save_pretrained`` does), so each file's safetensors header can be written
first and each tensor's bytes appended as it arrives: a caller that gathers each tensor only when
asked for it (ZeRO-3) holds one tensor at a time, never a shard, let alone the model.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB' (10^9, as transformers reads it) or '512MiB' (2^20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"cannot read {size!r} as a size: write bytes or e.g. '5GB', '512MiB'")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f"a shard size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written, known before its data: name, full shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def spec_of(name: str, tensor: torch.Tensor, shape: Sequence[int] | None = None) -> TensorSpec:
    """The spec of ``tensor`` (``shape``: its full shape where the tensor is a placeholder, e.g. ZeRO-3's)."""
    return TensorSpec(name, tuple(tensor.shape if shape is None else shape), tensor.dtype)


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """The tensors of each shard, in order: greedy, a tensor larger than the limit alone in its shard."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def shard_file(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _header(specs: Sequence[TensorSpec]) -> bytes:
    """The safetensors header of one file: 8-byte little-endian length, then JSON naming each tensor's
    dtype, shape and byte range in the data that follows (in order, no gaps), padded to 8 bytes."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        if spec.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{spec.name}: safetensors has no dtype for {spec.dtype}")
        entries[spec.name] = {"dtype": _SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_sharded(folder: Path, specs: Sequence[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int) -> list[str]:
    """Write ``tensors`` (pairs in the order of ``specs``, each matching its spec) into ``folder`` as HF
    sharded safetensors; returns the files written. Each file's header is written from the plan
    first and each tensor's bytes are appended as it arrives, so nothing is buffered: the caller's
    tensor in hand is all the memory this takes. Raises ValueError if the stream does not match."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(specs, max_shard_bytes)
    stream = iter(tensors)
    files, weight_map = [], {}
    for i, shard in enumerate(plan):
        file = shard_file(i, len(plan))
        with open(folder / file, "wb") as f:
            f.write(_header(shard))
            for spec in shard:
                got, tensor = next(stream, (None, None))
                if got != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                    raise ValueError(f"tensor stream out of step with its plan: expected {spec}, got {got!r}")
                f.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
        files.append(file)
        weight_map.update(dict.fromkeys((spec.name for spec in shard), file))
    if next(stream, None) is not None:
        raise ValueError("tensor stream has more tensors than its plan")
    if len(plan) > 1:
        index = {"metadata": {"total_parameters": sum(math.prod(s.shape) for s in specs),
                              "total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(INDEX_FILE)
    return files


def saved_tensors(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter | torch.Tensor]]:
    """What ``save_pretrained`` stores, in order: each parameter once under its first name (a tied LM head
    is the embedding's parameter: stored once, as the embedding), then the persistent buffers."""
    params = list(model.named_parameters())
    all_param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    persistent = set(model.state_dict(keep_vars=True))
    return params + [(n, b) for n, b in model.named_buffers() if n in persistent and n not in all_param_names]


def write_hf_folder(model: torch.nn.Module, folder: Path, specs: Sequence[TensorSpec],
                    tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """An HF model folder that ``from_pretrained`` loads: ``model``'s config (and generation config),
    and the weights from the stream ``tensors`` (as :func:`write_sharded`), in the stream's dtype."""
    write_sharded(folder, specs, tensors, max_shard_bytes)
    config = model.config
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(folder)
