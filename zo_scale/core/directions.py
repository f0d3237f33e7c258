"""Perturbation directions z and the samplers that pick one per query and step.

A :class:`Direction` is a recipe, never a stored tensor: ``z(shard, start, count)`` regenerates the
elements [start, start + count) of the flattened parameter, from seeds alone. A sampler turns
(run seed, step, query) into directions; every choice it makes (which mask, which V, which block)
is a function of the step, so resumed and multi-rank runs agree without exchanging state.

Samplers (the estimators' "what to perturb" half; :mod:`zo_scale.core.estimators` is the "how"):

- :class:`DenseSampler`: z ~ N(0, I) (MeZO) or Rademacher signs, every element.
- :class:`SparseSampler`: z = m * n with a random mask m keeping each element with probability
  1 - sparsity (independently), drawn anew every ``resample_every`` steps.
- :class:`LowRankSampler` (LOZO): for a 2-D weight W (m x n), z = U V^T with U (m x r) new every step
  and V (n x r) redrawn every ``resample_every`` steps (lazy, LOZO's nu); other params dense normal.
  Its estimate carries LOZO's 1/r on matrices (:meth:`Direction.estimate_scale`).
- :class:`BlockSampler`: perturb one block (a transformer layer, or "the rest") per query, cycling.
- :class:`LayerSubsetSampler` (LeZO): perturb a random fraction of the layers per step, and the rest.
- :class:`MagnitudeSampler` (Sparse-MeZO): perturb only the elements of small magnitude, |theta| <= a
  per-parameter threshold. The one sampler whose z depends on theta, not on seeds alone: it needs the
  perturbation inside the forward, where theta itself is at hand at every point of a step.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from zo_scale.core import noise
from zo_scale.core.shards import ParamShard, canonical_name


class Direction:
    """One perturbation direction z over all parameters, defined by seeds."""

    seed: int
    reads_weights = False  # whether z depends on theta itself (Sparse-MeZO's magnitude mask)

    def z(self, shard: ParamShard, start: int, count: int) -> torch.Tensor | None:
        """Elements [start, start + count) of z for this flattened parameter, shape (count,),
        in the shard's dtype and device; None where z is zero on this parameter."""
        raise NotImplementedError

    def estimate_scale(self, shard: ParamShard) -> float:
        r"""c in the estimate's term :math:`c\,g\,z` on this parameter: the loss is evaluated at
        theta +- eps z and the update moves along c g z. 1, but for LOZO's 1/r on matrices."""
        del shard
        return 1.0

    def on(self, shard: ParamShard) -> Direction | None:
        """This direction as it acts on one parameter: None where z is zero there, a simpler direction
        where one gives the same z (a :class:`DenseDirection` is what the compiled sweep can fuse)."""
        del shard
        return self

    def fused(self, shard: ParamShard) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
        """How the compiled sweep generates this z per element (:func:`z_at`): a static spec and the
        spec's inputs on this shard; None where it cannot (then the sweep runs eager)."""
        del shard
        return None


def sqrt64(x: torch.Tensor) -> torch.Tensor:
    """sqrt of an fp32 tensor through fp64: correctly rounded on every path (eager fp32 sqrt on a CPU is
    not, inductor's is), so eager and compiled sweeps agree bit for bit."""
    return torch.sqrt(x.double()).float()


def z_at(spec: tuple[Any, ...], index: torch.Tensor, inputs: tuple[Any, ...], dtype: torch.dtype) -> torch.Tensor:
    """z at the flat int64 ``index`` of a direction given by its :meth:`Direction.fused` spec and
    inputs, elementwise and in fp32 (the value of the eager ``z`` in ``dtype``, widened): the form the
    compiled sweep fuses. Equal bit for bit to ``z`` (``tests/core/test_kernel.py``)."""
    if spec[0] == "preconditioned":  # (preconditioned, inner spec), inputs (inner inputs, H, shard offset)
        inner, scale, offset = inputs
        return (z_at(spec[1], index, inner, dtype) / sqrt64(scale[index - offset])).to(dtype).float()
    if spec[0] == "scaled":  # (scaled, inner spec), inputs (inner inputs, the parameter's scale)
        inner, scale = inputs
        return (z_at(spec[1], index, inner, dtype) * scale).to(dtype).float()
    if spec[0] == "magnitude":  # (magnitude, inner spec), inputs (inner inputs, theta, shard offset, threshold)
        inner, theta, offset, threshold = inputs
        return z_at(spec[1], index, inner, dtype) * (theta[index - offset].float().abs() <= threshold)
    if spec[0] in noise.KINDS:  # dense: (kind,), inputs (table, key)
        table, key = inputs
        return noise.at(spec[0], index, key, table).float()
    if spec[0] == "sparse":  # (sparse, kind), inputs (table, key, mask key, threshold)
        table, key, mask_key, threshold = inputs
        return noise.at(spec[1], index, key, table).float() * kept(index, mask_key, threshold)
    rank = spec[1]
    if spec[0] == "lowrank":  # U generated: (normal table in fp32, U's key, V flat, ncols)
        table, key, right, ncols = inputs
        left = lambda k: noise.at("normal", (index // ncols) * rank + k, key, table)  # noqa: E731
    else:  # "factor": (M flat, V flat, ncols)
        factor, right, ncols = inputs
        left = lambda k: factor[(index // ncols) * rank + k]  # noqa: E731
    col = index % ncols
    block = left(0) * right[col * rank]
    for k in range(1, rank):  # the order of low_rank_slice
        block = block + left(k) * right[col * rank + k]
    return block.to(dtype).float()


@dataclass
class DenseDirection(Direction):
    seed: int
    kind: str = "normal"

    def z(self, shard: ParamShard, start: int, count: int) -> torch.Tensor:
        return noise.generate(self.kind, self.seed, shard.stream, start, count, shard.flat.dtype, shard.flat.device)

    def fused(self, shard: ParamShard) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        table = noise.table(self.kind, shard.flat.dtype, shard.flat.device)
        return (self.kind,), (table, noise.stream_key(self.seed, shard.stream))


MASK_BITS = 53  # a sparse mask compares this many bits of a hash with round(keep * 2**MASK_BITS)


def mask_threshold(sparsity: float) -> int:
    """The integer an element's mask draw is compared with: P(kept) = 1 - sparsity, exact to 2**-53."""
    return round((1.0 - sparsity) * (1 << MASK_BITS))


def kept(index: torch.Tensor, key: int, threshold: int) -> torch.Tensor:
    """The sparse mask at the int64 ``index``: True where element i is perturbed.

    Each element is kept independently with probability threshold / 2**53, from its own hash
    (SplitMix64 of i under the mask's key), so any slice is exact and costs one hash per element, with
    no data-dependent loop: the same expression runs eager and inside the compiled sweep.
    """
    return ((noise.hash64(index + 1, key) >> (64 - MASK_BITS)) & ((1 << MASK_BITS) - 1)) < threshold


@dataclass
class SparseDirection(Direction):
    """z = m * n: n dense noise, m a Bernoulli(1 - sparsity) mask per element (:func:`kept`), redrawn
    with ``mask_seed``. The number of perturbed elements per tensor is binomial: for a tensor of N
    elements it is (1 - sparsity) N +- sqrt(sparsity (1 - sparsity) N), not an exact count."""

    seed: int
    mask_seed: int
    sparsity: float
    kind: str = "normal"

    def _mask_key(self, shard: ParamShard) -> int:
        return noise.derive_seed(self.mask_seed, shard.stream)

    def z(self, shard: ParamShard, start: int, count: int) -> torch.Tensor:
        idx = torch.arange(start, start + count, dtype=torch.int64, device=shard.flat.device)
        z = noise.generate(self.kind, self.seed, shard.stream, start, count, shard.flat.dtype, shard.flat.device)
        return z * kept(idx, self._mask_key(shard), mask_threshold(self.sparsity))

    def fused(self, shard: ParamShard) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        table = noise.table(self.kind, shard.flat.dtype, shard.flat.device)
        key = noise.stream_key(self.seed, shard.stream)
        return ("sparse", self.kind), (table, key, self._mask_key(shard), mask_threshold(self.sparsity))


@dataclass
class LowRankDirection(Direction):
    r"""LOZO's direction (Chen et al., ICLR 2025, arXiv 2410.07698): z = U V^T on 2-D weights, U and V
    standard normal, so the loss is evaluated at theta +- eps U V^T and the estimate is
    :math:`\frac{L_+ - L_-}{2\epsilon} \cdot \frac{U V^T}{r}` (``estimate_scale`` 1/r: unbiased, since
    E[U V^T <G, U V^T>] = r G), as in the paper; its code leaves the 1/r to the learning rate. Each entry
    of U V^T has variance r. Other parameters (1-D): MeZO's dense normal z, estimate g z, as LOZO's code.
    """

    seed: int
    v_seed: int
    rank: int
    # V by (stream, device); the sampler shares one among the directions of a V window (the same V, generated once)
    _v_cache: dict[tuple[int, torch.device], torch.Tensor] = field(default_factory=dict, repr=False)

    def estimate_scale(self, shard: ParamShard) -> float:
        return 1.0 / self.rank if len(shard.shape) == 2 else 1.0

    def u_rows(self, shard: ParamShard, row0: int, nrows: int) -> torch.Tensor:
        """Rows [row0, row0 + nrows) of U, shape (nrows, rank)."""
        u = noise.normal(self.seed, shard.stream, row0 * self.rank, nrows * self.rank, torch.float32, shard.flat.device)
        return u.view(nrows, self.rank)

    def u_at(self, shard: ParamShard, rows: torch.Tensor) -> torch.Tensor:
        """The rows of U at the int64 indices ``rows`` (any shape), shape (*rows.shape, rank): the same values
        as :meth:`u_rows` (an embedding's looked-up rows)."""
        index = rows.unsqueeze(-1) * self.rank + torch.arange(self.rank, device=rows.device)
        table = noise.table("normal", torch.float32, rows.device)
        return noise.at("normal", index, noise.stream_key(self.seed, shard.stream), table).float()

    def v(self, shard: ParamShard) -> torch.Tensor:
        """V, shape (ncols, rank); cached for the life of this direction (or of its sampler's V window)."""
        key = (shard.stream, shard.flat.device)
        if key not in self._v_cache:
            ncols = shard.shape[1]
            v = noise.normal(self.v_seed, shard.stream, 0, ncols * self.rank, torch.float32, shard.flat.device)
            self._v_cache[key] = v.view(ncols, self.rank)
        return self._v_cache[key]

    def z(self, shard: ParamShard, start: int, count: int) -> torch.Tensor:
        if len(shard.shape) != 2:
            return noise.generate("normal", self.seed, shard.stream, start, count, shard.flat.dtype, shard.flat.device)
        return low_rank_slice(lambda r0, n: self.u_rows(shard, r0, n), self.v(shard), shard, start, count)

    def on(self, shard: ParamShard) -> Direction:
        return self if len(shard.shape) == 2 else DenseDirection(self.seed)  # dense normal off matrices

    def fused(self, shard: ParamShard) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        table = noise.table("normal", torch.float32, shard.flat.device)  # U is fp32, as in u_rows
        key = noise.stream_key(self.seed, shard.stream)
        return ("lowrank", self.rank), (table, key, self.v(shard).reshape(-1), shard.shape[1])


def low_rank_slice(
    left_rows: Callable[[int, int], torch.Tensor], right: torch.Tensor, shard: ParamShard, start: int, count: int
) -> torch.Tensor:
    """Elements [start, start + count) of the flattened (m x n) matrix L R^T, shape (count,).

    ``left_rows(row0, nrows)`` gives rows of L (nrows x r); R is (n x r). Only the rows touching the
    slice are formed.
    """
    ncols, rank = shard.shape[1], right.shape[1]
    row0, row1 = start // ncols, (start + count - 1) // ncols + 1  # rows touching [start, start+count)
    left = left_rows(row0, row1 - row0)
    # sum_k l[:, k] r[:, k]^T elementwise, in a fixed order: a GEMM's summation order depends on
    # the shape, and a slice must equal the same elements of the whole bit for bit.
    # Written as z_at computes it per element, so the compiled sweep gives the same bits.
    block = left[:, :1] * right[:, 0]
    for k in range(1, rank):
        block = block + left[:, k : k + 1] * right[:, k]
    skip = start - row0 * ncols
    return block.view(-1)[skip : skip + count].to(shard.flat.dtype)


@dataclass
class FactorDirection(Direction):
    """z = M V^T on one 2-D weight: LOZO-M's momentum, kept as its m x r factor M."""

    factor: torch.Tensor  # M, (m x r), fp32
    right: torch.Tensor  # V, (n x r)
    stream: int
    seed: int = 0

    def z(self, shard: ParamShard, start: int, count: int) -> torch.Tensor | None:
        if shard.stream != self.stream:
            return None
        return low_rank_slice(lambda r0, n: self.factor[r0 : r0 + n], self.right, shard, start, count)

    def on(self, shard: ParamShard) -> Direction | None:
        return self if shard.stream == self.stream else None

    # the factors as LowRankDirection gives them (M for U): the low-rank forward takes either
    def u_rows(self, shard: ParamShard, row0: int, nrows: int) -> torch.Tensor:
        del shard
        return self.factor[row0 : row0 + nrows]

    def u_at(self, shard: ParamShard, rows: torch.Tensor) -> torch.Tensor:
        del shard
        return self.factor[rows]

    def v(self, shard: ParamShard) -> torch.Tensor:
        del shard
        return self.right

    def fused(self, shard: ParamShard) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        rank = self.right.shape[1]
        return ("factor", rank), (self.factor.reshape(-1), self.right.reshape(-1), shard.shape[1])


@dataclass
class WrappedDirection(Direction):
    """A direction made from ``inner``: its seed and estimate scale are inner's."""

    inner: Direction

    @property
    def seed(self) -> int:  # type: ignore[override]
        return self.inner.seed

    @property
    def reads_weights(self) -> bool:  # type: ignore[override]
        return self.inner.reads_weights

    def estimate_scale(self, shard: ParamShard) -> float:
        return self.inner.estimate_scale(shard)

    def on(self, shard: ParamShard) -> Direction | None:
        """The same wrapping of inner's simpler form on this parameter (None where inner's z is zero there)."""
        inner = self.inner.on(shard)
        if inner is None:
            return None
        return self if inner is self.inner else dataclasses.replace(self, inner=inner)

    def _fused_with(self, shard: ParamShard, kind: str, inputs: Callable[[], tuple[Any, ...]]
                    ) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
        """The fused spec (kind, inner's spec) with inputs (inner's inputs, *inputs()); None where inner has none."""
        inner = self.inner.fused(shard)
        return None if inner is None else ((kind, inner[0]), (inner[1], *inputs()))


@dataclass
class PreconditionedDirection(WrappedDirection):
    """z = inner z / sqrt(H) elementwise, H a per-element fp32 state of the local shard (HiZOO's diagonal
    Hessian): ``scale_of(shard)`` gives H over the shard's elements [offset, offset + numel)."""

    scale_of: Callable[[ParamShard], torch.Tensor] = field(repr=False)

    def z(self, shard: ParamShard, start: int, count: int) -> torch.Tensor | None:
        z = self.inner.z(shard, start, count)
        if z is None:
            return None
        local = start - shard.offset
        return (z.float() / sqrt64(self.scale_of(shard)[local : local + count])).to(shard.flat.dtype)

    def fused(self, shard: ParamShard) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
        return self._fused_with(shard, "preconditioned", lambda: (self.scale_of(shard), shard.offset))


@dataclass
class ScaledDirection(WrappedDirection):
    """z = s_p * inner z on parameter p, s_p one fp32 number per parameter tensor (``scales`` by stream)."""

    scales: dict[int, float] = field(repr=False)

    def z(self, shard: ParamShard, start: int, count: int) -> torch.Tensor | None:
        z = self.inner.z(shard, start, count)
        return None if z is None else (z.float() * self.scales[shard.stream]).to(shard.flat.dtype)

    def fused(self, shard: ParamShard) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
        return self._fused_with(shard, "scaled", lambda: (self.scales[shard.stream],))


@dataclass
class BlockDirection(WrappedDirection):
    """``inner`` restricted to the parameters whose streams are in ``active``; zero elsewhere."""

    active: frozenset[int]

    def z(self, shard: ParamShard, start: int, count: int) -> torch.Tensor | None:
        return self.inner.z(shard, start, count) if shard.stream in self.active else None

    def on(self, shard: ParamShard) -> Direction | None:
        return self.inner.on(shard) if shard.stream in self.active else None


class DirectionSampler:
    """Chooses the q directions of one step. ``bind`` sees the parameters once, before the first step.
    A sampler that restricts another (an ``inner`` attribute: blocks, LeZO's layers) inherits what that
    one reads and keeps."""

    @property
    def reads_weights(self) -> bool:
        """Whether z depends on theta itself, so theta must be what the shard holds whenever z is generated
        (the perturbation inside the forward; the in-place sweep moves theta between points)."""
        inner = getattr(self, "inner", None)
        return inner is not None and inner.reads_weights

    def bind(self, shards: Sequence[ParamShard]) -> None:
        del shards  # most samplers need nothing from the parameters

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond (seed, step): nothing for a sampler of seeds alone; an inner
        sampler's state for one that restricts another."""
        inner = getattr(self, "inner", None)
        return {"inner": inner.state_dict()} if inner is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        inner = getattr(self, "inner", None)
        if inner is not None:
            inner.load_state_dict(state.get("inner", {}))  # saved before samplers kept their inner's: nothing

    def directions(self, seed: int, step: int, q: int) -> list[Direction]:
        return [self.direction(noise.derive_seed(seed, step, i), seed, step, i) for i in range(q)]

    def direction(self, query_seed: int, seed: int, step: int, query: int) -> Direction:
        raise NotImplementedError


@dataclass
class DenseSampler(DirectionSampler):
    kind: str = "normal"

    def __post_init__(self) -> None:
        if self.kind not in noise.KINDS:
            raise ValueError(f"unknown noise kind {self.kind!r}; choose one of {noise.KINDS}")

    def direction(self, query_seed: int, seed: int, step: int, query: int) -> Direction:
        return DenseDirection(query_seed, self.kind)


def _check_period(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class SparseSampler(DirectionSampler):
    sparsity: float = 0.75
    resample_every: int = 1
    kind: str = "normal"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity is the fraction of elements left unperturbed, in [0, 1); got {self.sparsity}")
        _check_period("resample_every", self.resample_every)

    def direction(self, query_seed: int, seed: int, step: int, query: int) -> Direction:
        mask_seed = noise.derive_seed(seed, step // self.resample_every, -1)
        return SparseDirection(query_seed, mask_seed, self.sparsity, self.kind)


@dataclass
class LowRankSampler(DirectionSampler):
    rank: int = 2
    resample_every: int = 50  # LOZO's nu: V is redrawn once per this many steps
    # the current window's V cache, shared by its directions: {v_seed: {(stream, device): V}}
    _v_caches: dict[int, dict[tuple[int, torch.device], torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_period("rank", self.rank)
        _check_period("resample_every", self.resample_every)

    def v_seed(self, seed: int, step: int) -> int:
        return noise.derive_seed(seed, step // self.resample_every, -2)

    def direction(self, query_seed: int, seed: int, step: int, query: int) -> Direction:
        v_seed = self.v_seed(seed, step)
        if v_seed not in self._v_caches:
            self._v_caches = {v_seed: {}}  # a new window: the last one's V is not needed again
        return LowRankDirection(query_seed, v_seed, self.rank, self._v_caches[v_seed])


_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


def block_of(name: str) -> str:
    """The block a parameter belongs to: its transformer layer ('layer 3'), else 'rest'."""
    found = _LAYER_INDEX.search("." + name)
    return f"layer {int(found.group(1))}" if found else "rest"


def layer_blocks(shards: Sequence[ParamShard]) -> tuple[list[str], list[frozenset[int]]]:
    """The blocks of :func:`block_of` in layer order, 'rest' last, and each block's parameter streams."""
    by_block: dict[str, set[int]] = {}
    for shard in shards:
        by_block.setdefault(block_of(shard.name), set()).add(shard.stream)
    names = sorted(by_block, key=lambda b: (b == "rest", int(b.split()[1]) if b != "rest" else 0))
    return names, [frozenset(by_block[b]) for b in names]


@dataclass
class BlockSampler(DirectionSampler):
    """Block-wise ZO: query j of step t perturbs block (t * q + j) mod n_blocks, in layer order."""

    inner: DirectionSampler = field(default_factory=DenseSampler)
    blocks: list[frozenset[int]] = field(default_factory=list)
    block_names: list[str] = field(default_factory=list)

    def bind(self, shards: Sequence[ParamShard]) -> None:
        self.inner.bind(shards)
        self.block_names, self.blocks = layer_blocks(shards)

    def directions(self, seed: int, step: int, q: int) -> list[Direction]:
        if not self.blocks:
            raise RuntimeError("BlockSampler.bind(shards) must run before the first step")
        inner = self.inner.directions(seed, step, q)
        return [BlockDirection(d, self.blocks[(step * q + i) % len(self.blocks)]) for i, d in enumerate(inner)]


@dataclass
class LayerSubsetSampler(DirectionSampler):
    """LeZO (Wang et al. 2024, arXiv 2410.09823): each step perturbs, and so updates, a random subset of the
    transformer layers, plus every parameter outside them (embeddings, final norm, head: the paper keeps
    those always tuned). ``layers`` is the fraction of layers in the subset (the paper counts the layers
    left out, ``n_layers - ceil(layers * n_layers)`` here). The subset is drawn uniformly without
    replacement from (seed, step), the same for all q queries of a step; z is ``inner``'s (dense normal,
    as the paper) on it. Cost per step: the sweeps pass over the subset and the rest only."""

    layers: float = 0.25
    inner: DirectionSampler = field(default_factory=DenseSampler)
    layer_streams: list[frozenset[int]] = field(default_factory=list)
    rest: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not 0.0 < self.layers <= 1.0:
            raise ValueError(f"layers is the fraction of transformer layers perturbed per step, in (0, 1]; "
                             f"got {self.layers}")

    def bind(self, shards: Sequence[ParamShard]) -> None:
        self.inner.bind(shards)
        names, blocks = layer_blocks(shards)
        self.layer_streams = [b for n, b in zip(names, blocks, strict=True) if n != "rest"]
        self.rest = frozenset().union(*(b for n, b in zip(names, blocks, strict=True) if n == "rest"))

    def chosen(self, seed: int, step: int) -> list[int]:
        """The layers (indices in layer order) step ``step`` perturbs."""
        n = len(self.layer_streams)
        k = math.ceil(self.layers * n - 1e-9)
        return sorted(random.Random(noise.derive_seed(seed, step, -3)).sample(range(n), k))

    def directions(self, seed: int, step: int, q: int) -> list[Direction]:
        if not self.layer_streams and not self.rest:
            raise RuntimeError("LayerSubsetSampler.bind(shards) must run before the first step")
        active = self.rest.union(*(self.layer_streams[i] for i in self.chosen(seed, step)))
        return [BlockDirection(d, active) for d in self.inner.directions(seed, step, q)]


@dataclass
class MagnitudeDirection(WrappedDirection):
    """``inner`` z where |theta| <= the parameter's threshold (``sampler.threshold``), zero elsewhere; theta
    is what the shard holds when z is generated, so it must be the unperturbed weights (see
    :class:`MagnitudeSampler`)."""

    sampler: MagnitudeSampler = field(repr=False)
    reads_weights = True  # type: ignore[assignment]

    def z(self, shard: ParamShard, start: int, count: int) -> torch.Tensor | None:
        z = self.inner.z(shard, start, count)
        if z is None:
            return None
        local = start - shard.offset
        return z * (shard.flat[local : local + count].float().abs() <= self.sampler.threshold(shard))

    def fused(self, shard: ParamShard) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
        return self._fused_with(shard, "magnitude", lambda: (shard.flat, shard.offset, self.sampler.threshold(shard)))


MAGNITUDE_CHUNK = 1 << 24  # elements read per histogram call: 128 MiB of int64 bit patterns at a time
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


def kth_magnitude(values: torch.Tensor, k: int, chunk: int = MAGNITUDE_CHUNK) -> float:
    """The k-th smallest |x| of ``values`` (1-based), exactly ``values.float().abs().kthvalue(k)`` (NaNs
    order last), by radix select on the bit patterns: a non-negative float's bits, read as an integer,
    order as its value does. Each pass histograms the next 16 bits below the sign of the elements whose
    higher bits match those chosen so far (one ``bincount`` per chunk) and walks the cumulative counts to
    the bin holding rank k: one pass for 16-bit floats, two for fp32. Memory: one chunk of int64 patterns
    and 65,536 counts, where ``kthvalue`` needs an fp32 copy of the whole tensor (4.2 GB for a 128256 x
    8192 embedding) and runs as one block on a GPU; here every chunk is a data-parallel histogram."""
    flat = values.reshape(-1)
    width = torch.iinfo(_BITS[flat.dtype]).bits
    prefix, below, rank = 0, width - 1, k  # bits chosen so far; how many remain under them; k within them
    while below:
        step = min(16, below)
        shift = below - step
        counts = torch.zeros(1 << step, dtype=torch.int64, device=flat.device)
        for start in range(0, flat.numel(), chunk):
            bits = flat[start : start + chunk].view(_BITS[flat.dtype]).long() & ((1 << (width - 1)) - 1)
            if below < width - 1:
                bits = bits[(bits >> below) == prefix]
            counts += torch.bincount((bits >> shift) & ((1 << step) - 1), minlength=1 << step)
        cumulative = counts.cumsum(0)
        digit = int(torch.searchsorted(cumulative, torch.tensor(rank, device=flat.device)))
        rank -= int(cumulative[digit - 1]) if digit else 0
        prefix, below = (prefix << step) | digit, shift
    return float(torch.tensor(prefix).to(_BITS[flat.dtype]).view(flat.dtype))


@dataclass
class MagnitudeSampler(DirectionSampler):
    r"""Sparse-MeZO (Liu et al. 2024, arXiv 2402.15751): perturb, and so update, only the weights of small
    magnitude, z = m * n with m = 1[|theta_t| <= h] and n ``inner``'s (dense normal, as the paper): the
    paper finds the ZO estimate's error hurts large weights more.

    h is one threshold per parameter tensor (the paper: per layer), the (1 - sparsity) quantile of |theta|
    at the run's first step, fixed after, as the paper fixes its thresholds before training; the mask itself
    follows theta_t every step. ``sparsity`` is the fraction left unperturbed, as for :class:`SparseSampler`
    (ties at h are perturbed too, so in bf16 a little more than 1 - sparsity may be). A tensor whose
    elements start equal gets h = that value: a zero-initialized one (LoRA's B) is perturbed at the first
    step only, since no element is back at 0 after it (the trainer refuses adapters with this sampler).
    Weight decay, when set, still shrinks every element of a matrix, the large ones too.

    Where zo-scale departs from the paper: the paper's memory-efficient implementation computes the mask in
    each layer's forward; here every direction does, at every generation of z (the perturbed copies inside
    the forward, the update pass), from the weights the shard holds, so no mask is ever stored. That holds
    only if those weights are theta_t at every point: the in-place step holds theta_t + eps z at its second
    point, so this sampler needs ``perturb='in_forward'`` (:class:`~zo_scale.core.optimizer.ZOOptimizer`
    refuses it otherwise). Cost: an exact quantile of each parameter's magnitudes once per run
    (:func:`kth_magnitude`: one or two histogram passes, a few host syncs per parameter, no copy of the
    parameter), then a compare per element per pass, inside the sweep kernel.
    h needs the whole parameter: under ZeRO-3 it is taken from the gathered copy in the first forward;
    the thresholds are saved with the optimizer's state, so a resumed run keeps the first run's.
    """

    sparsity: float = 0.75
    inner: DirectionSampler = field(default_factory=DenseSampler)
    thresholds: dict[int, float] = field(default_factory=dict)  # h by noise stream, once measured

    @property
    def reads_weights(self) -> bool:
        return True

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity is the fraction of elements left unperturbed, in [0, 1); got {self.sparsity}")

    def bind(self, shards: Sequence[ParamShard]) -> None:
        self.inner.bind(shards)

    def threshold(self, shard: ParamShard) -> float:
        """h for this parameter: measured on its first use, from the whole parameter the shard must then hold."""
        h = self.thresholds.get(shard.stream)
        if h is None:
            if shard.flat.numel() != shard.full_numel:
                raise RuntimeError(f"the magnitude mask's threshold of {shard.name!r} is measured on the whole "
                                   "parameter, at its first use inside the forward; this shard holds part of it")
            h = kth_magnitude(shard.flat, max(1, round((1.0 - self.sparsity) * shard.flat.numel())))
            self.thresholds[shard.stream] = h
        return h

    def directions(self, seed: int, step: int, q: int) -> list[Direction]:
        return [MagnitudeDirection(d, self) for d in self.inner.directions(seed, step, q)]

    def state_dict(self) -> dict[str, Any]:
        return {"thresholds": dict(self.thresholds), "sparsity": self.sparsity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("sparsity", self.sparsity) != self.sparsity:
            raise ValueError(f"the saved magnitude thresholds are quantiles at sparsity {state['sparsity']}; this "
                             f"sampler has sparsity {self.sparsity}")
        self.thresholds = {int(k): float(v) for k, v in state.get("thresholds", {}).items()}


@dataclass
class ScaledSampler(DirectionSampler):
    r"""ZO Fine-tuner's perturbation (Zhang et al. 2025, arXiv 2510.00419): z_p = c s_p u_p on each parameter
    tensor p, u ``inner``'s noise (dense normal, as the paper) and s_p a scale learned once per base model
    (:class:`~zo_scale.core.learned_scales.ScaleLearner`); the update moves along the same z. c fixes the
    size of z, :math:`\sum_p d_p (c s_p)^2 = \sum_p d_p` (d_p the elements of p), as the paper's normalization:
    only the ratios of the scales matter, and E||z||^2 = d as for plain Gaussian noise.

    ``scales`` are keyed by parameter name (:func:`~zo_scale.core.shards.canonical_name`); every trained
    tensor needs one (a name missing is refused: scales learned on another model), names not trained are
    ignored. Where zo-scale departs from the paper: s_p is one learned number per tensor, where the paper has
    a small network per tensor that maps the tensor's weight statistics and the last step's two losses to
    s_p each step; and d_p is the tensor's size for the embedding too (the paper counts the rows a batch
    touches). Cost: one multiply per element, inside the sweep kernel; no state beyond the scales.
    """

    scales: dict[str, float]
    inner: DirectionSampler = field(default_factory=DenseSampler)
    by_stream: dict[int, float] = field(default_factory=dict)  # c s_p, rounded to fp32, once bound

    def bind(self, shards: Sequence[ParamShard]) -> None:
        self.inner.bind(shards)
        sizes = {canonical_name(sh.name): (sh.stream, sh.full_numel) for sh in shards}
        missing = sorted(set(sizes) - set(self.scales))
        if missing:
            raise ValueError(f"the perturbation scales have none for {len(missing)} trained tensor(s), e.g. "
                             f"{missing[0]!r}: they were learned on another model (or another set of tensors)")
        bad = {name: self.scales[name] for name in sizes if not (math.isfinite(self.scales[name]) and
                                                                self.scales[name] > 0)}
        if bad:
            raise ValueError(f"perturbation scales must be positive and finite; got {bad}")
        total = sum(d for _, d in sizes.values())
        c = math.sqrt(total / sum(d * self.scales[name] ** 2 for name, (_, d) in sizes.items()))
        # fp32 values: the eager multiply (fp32) and the compiled one (the scalar in fp64) round alike
        self.by_stream = {stream: float(torch.tensor(c * self.scales[name], dtype=torch.float32))
                          for name, (stream, _) in sizes.items()}

    def directions(self, seed: int, step: int, q: int) -> list[Direction]:
        if not self.by_stream:
            raise RuntimeError("ScaledSampler.bind(shards) must run before the first step")
        return [ScaledDirection(d, self.by_stream) for d in self.inner.directions(seed, step, q)]

    def state_dict(self) -> dict[str, Any]:
        return {"scales": dict(self.scales), "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("scales")
        if saved is not None and saved != self.scales:
            changed = sorted(k for k in set(saved) | set(self.scales) if saved.get(k) != self.scales.get(k))
            raise ValueError(f"the checkpoint was trained with other perturbation scales ({len(changed)} differ, "
                             f"e.g. {changed[0]!r}); resuming would not continue that run")
        self.inner.load_state_dict(state.get("inner", {}))
