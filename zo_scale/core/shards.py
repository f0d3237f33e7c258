"""The one view of a parameter that the ZO core works on: a flat local slice plus where it sits.

Single-process, the slice is the whole parameter. Under ZeRO-3 a backend hands the core rank r's
flat shard with its global element offset instead; the core generates exactly those elements of z
(counter-based noise, :mod:`zo_scale.core.noise`), so the arithmetic is the same either way.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Prefixes that wrappers put in front of a model's own parameter names (DDP, torch.compile, peft,
# DeepSpeed engines). Stripped so a parameter keeps its noise stream whatever wraps the model.
_WRAPPER_PREFIXES = re.compile(r"^(?:(?:module|_orig_mod|_forward_module|base_model\.model|base_model)\.)+")


def canonical_name(name: str) -> str:
    """A parameter's name without wrapper prefixes: 'module.base_model.model.x.weight' -> 'x.weight'."""
    return _WRAPPER_PREFIXES.sub("", name)


def stream_id(name: str) -> int:
    """A stable 63-bit noise stream id from a parameter name (same on every process and run)."""
    digest = hashlib.blake2b(canonical_name(name).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class ShardSpan:
    """Where a shard sits, without its data: elements [offset, offset + numel) of ``param``, on ``device``."""

    param: torch.Tensor
    offset: int
    numel: int
    device: torch.device


@dataclass
class ParamShard:
    """A flat, contiguous local slice of one parameter.

    ``flat`` holds elements [offset, offset + flat.numel()) of the flattened full parameter, whose
    full shape is ``shape`` (numel = prod(shape)). ``param`` is the owning tensor; ``name`` its name.
    ``release``: called when the optimizer is done with this shard (a backend that swapped the data
    in writes it back and frees the buffer); None when the data simply lives in ``flat``.
    """

    param: torch.Tensor
    name: str
    stream: int
    flat: torch.Tensor
    offset: int
    shape: torch.Size
    release: Callable[[], None] | None = None

    @property
    def span(self) -> ShardSpan:
        return ShardSpan(self.param, self.offset, self.flat.numel(), self.flat.device)

    def narrow(self, start: int, stop: int) -> ParamShard:
        """The shard of elements [start, stop) of the flattened parameter, within this one (no release hook:
        the caller's shard keeps it)."""
        if not self.offset <= start <= stop <= self.offset + self.flat.numel():
            raise ValueError(f"elements [{start}, {stop}) of {self.name!r} are not in its shard "
                             f"[{self.offset}, {self.offset + self.flat.numel()})")
        flat = self.flat[start - self.offset : stop - self.offset]
        return ParamShard(self.param, self.name, self.stream, flat, start, self.shape)

    @property
    def full_numel(self) -> int:
        return self.shape.numel()

    @property
    def decays(self) -> bool:
        """Weight decay applies to matrices only: biases and norm weights (1-D) are skipped."""
        return len(self.shape) >= 2


def whole_param_shard(param: torch.Tensor, name: str) -> ParamShard:
    """The single-process view: the whole parameter as one flat slice at offset 0."""
    if not param.is_contiguous():
        raise ValueError(f"parameter {name!r} is not contiguous; ZO updates it through a flat view")
    return ParamShard(param, name, stream_id(name), param.data.view(-1), 0, param.shape)
