r"""Parameters stored in flat buckets, so that a ZO sweep is one kernel call per bucket, not one per tensor.

A sweep over a model of N tensors (:mod:`zo_scale.core.sweep`) is N kernel calls, each paying dynamo's
guards and a launch (0.1 to 0.3 ms): at 7B (291 tensors, two passes a step) that is more time than the
kernels' own work. Here the parameters of one param group, device and dtype are stored as consecutive
views of one flat tensor, a *bucket* (up to :data:`MAX_BUCKET_BYTES`), each starting at a multiple of
:data:`BLOCK` elements. A sweep of the bucket is one compiled elementwise kernel over the flat tensor in
which element i finds its parameter (its *segment*) by one table read, and from it the noise stream and
whether weight decay applies:

.. math::
    s = \mathrm{segment}[\lfloor i / B \rfloor], \qquad j = i - \mathrm{start}_s, \qquad
    z_i = z(\mathrm{key}(\mathrm{seed}, \mathrm{stream}_s), j)

with j the element's index inside its parameter, so every element gets the z, the moves and the update
the per-tensor sweep gives it: the two are equal bit for bit (``tests/core/test_flat_buckets.py``).
The padding (under B elements after each parameter, and the first block) is swept too and never read.

The parameters stay the same ``Parameter`` objects; only their ``.data`` points into the bucket, as
DeepSpeed's ZeRO-1/2 flat buffers do. A parameter whose data is later replaced (``module.to``,
``load_state_dict(assign=True)``) leaves its bucket: :meth:`FlatBucket.intact` sees it and the sweep
takes the per-tensor path for that bucket. Only plain dense parameters that own their storage are
bucketed (not quantized or otherwise subclassed ones, not views into a storage shared with another
tensor). Building a bucket copies its parameters in, so it holds one bucket of extra memory at a time.

Bucket sweeps run under the kernel mode 'compiled', and under 'auto' on an accelerator (:func:`runs_compiled`;
on the CPU a bucket kernel would be one more compile to save milliseconds a step). What a bucket sweep
covers: moves and updates along dense directions (:class:`DenseDirection`: normal
or Rademacher), update rules without per-element state whose numbers do not depend on the step
(ZO-SGD, ZO-SGD-Sign), no fp32 master copy. Anything else (low-rank, sparse and block directions,
Adam's buffers, master weights) takes the per-tensor path, as does the eager kernel mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from zo_scale.core import kernel, noise
from zo_scale.core.directions import DenseDirection, z_at
from zo_scale.core.shards import stream_id
from zo_scale.core.sweep import Moves, Plan, Scalars, Update, exact_casts, sweep_formula
from zo_scale.core.updates import UpdateRule

BLOCK_SHIFT = 12
BLOCK = 1 << BLOCK_SHIFT  # parameters start at multiples of this many elements: one table entry per block
MAX_BUCKET_BYTES = 1 << 30  # a bucket's size, and the extra memory that building one holds for a moment
COPY_WINDOW_BYTES = 1 << 27  # the parameters whose perturbed copies are made at once (K copies of two windows alive)


@dataclass
class FlatBucket:
    """Parameters stored as consecutive views of ``flat``, parameter k at elements [starts[k], starts[k] + numel).

    ``segment``: (numel(flat) / BLOCK,) int32, the parameter each block belongs to; ``seg_start``,
    ``streams``, ``decays``: (len(params),) on the bucket's device, each parameter's first element, its
    noise stream (:func:`~zo_scale.core.shards.stream_id`) and whether weight decay applies (matrices).
    """

    group: int
    flat: torch.Tensor
    params: list[torch.nn.Parameter]
    names: list[str]
    starts: list[int]
    segment: torch.Tensor
    seg_start: torch.Tensor
    streams: torch.Tensor
    decays: torch.Tensor
    steps: torch.Tensor | None = None  # the parameters' step counts (ZOOptimizer's), one element each
    step_views: list[torch.Tensor] = field(default_factory=list)  # steps' elements: the states' 0-dim "step"

    def intact(self) -> bool:
        """Whether every parameter's data is still its view of ``flat`` (no one has replaced it since)."""
        base, size = self.flat.data_ptr(), self.flat.element_size()
        return all(p.data_ptr() == base + start * size and p.dtype == self.flat.dtype
                   for p, start in zip(self.params, self.starts, strict=True))


# a bucketed parameter's attribute: where its data was put. A parameter still there may go into a new bucket
# (a second optimizer over the same model), though it does not own its storage.
PLACED = "_zo_scale_bucket_data_ptr"


def bucketable(p: torch.Tensor) -> bool:
    """A plain floating-point parameter that owns its whole storage (so nothing else aliases its data), or
    whose data is still where a bucket put it."""
    owns = p.storage_offset() == 0 and p.untyped_storage().nbytes() == p.numel() * p.element_size()
    return (type(p) is torch.nn.Parameter and p.dtype.is_floating_point and p.is_contiguous()
            and (owns or getattr(p, PLACED, None) == p.data_ptr()))


def _padded(numel: int) -> int:
    return -(-numel // BLOCK) * BLOCK


def _build(group: int, members: Sequence[tuple[torch.nn.Parameter, str]]) -> FlatBucket:
    """One bucket: the parameters' values copied into a new flat tensor, their data pointed at it."""
    first = members[0][0]
    # the first block is padding: a window of copies (CopyWindows) then never starts at element 0, which
    # dynamo would compile a kernel of its own for (it specializes an int argument of 0)
    starts, total = [], BLOCK
    for p, _ in members:
        starts.append(total)
        total += _padded(p.numel())
    flat = torch.zeros(total, dtype=first.dtype, device=first.device)
    segment = torch.zeros(total // BLOCK, dtype=torch.int32)
    for k, ((p, _), start) in enumerate(zip(members, starts, strict=True)):
        view = flat[start : start + p.numel()]
        view.copy_(p.data.view(-1))
        p.data = view.view(p.shape)
        setattr(p, PLACED, p.data_ptr())
        segment[start // BLOCK : (start + _padded(p.numel())) // BLOCK] = k
    device = first.device
    return FlatBucket(
        group, flat, [p for p, _ in members], [n for _, n in members], starts, segment.to(device),
        torch.tensor(starts, dtype=torch.int64, device=device),
        torch.tensor([stream_id(n) for _, n in members], dtype=torch.int64, device=device),
        torch.tensor([p.dim() >= 2 for p, _ in members], dtype=torch.bool, device=device))


def flatten(groups: Sequence[Sequence[tuple[torch.nn.Parameter, str]]],
            max_bytes: int = MAX_BUCKET_BYTES) -> list[FlatBucket]:
    """Store each param group's bucketable parameters (``groups[g]``: (parameter, name), in order) in flat
    buckets: consecutive parameters of one device and dtype, up to ``max_bytes`` a bucket. Parameters that
    are not :func:`bucketable`, or alone in their bucket, are left where they are."""
    buckets: list[FlatBucket] = []
    for g, members in enumerate(groups):
        runs: dict[tuple[torch.device, torch.dtype], list[tuple[torch.nn.Parameter, str]]] = {}
        for p, name in members:
            if not bucketable(p):
                continue
            run = runs.setdefault((p.device, p.dtype), [])
            if run and sum(_padded(q.numel()) for q, _ in run) + _padded(p.numel()) > max_bytes // p.element_size():
                if len(run) > 1:
                    buckets.append(_build(g, run))
                run.clear()
            run.append((p, name))
        buckets += [_build(g, run) for run in runs.values() if len(run) > 1]
    return buckets


def covers(moves: Sequence[Moves], update: Update | None, master: bool) -> bool:
    """Whether a bucket sweep can run these moves and this update (module docstring: what it covers)."""
    directions = [d for phase in moves for d, _ in phase] + ([d for d, _ in update.weights] if update else [])
    return (not master and all(type(d) is DenseDirection for d in directions)
            and (update is None or stateless(update.rule)))


def stateless(rule: UpdateRule) -> bool:
    """A rule whose u is a function of g_hat alone: no per-element buffers, nothing prepared per shard, no
    step-dependent numbers (so a bucket's parameters, whatever their step counts, share one formula)."""
    kind = type(rule)
    return not rule.buffers and kind.prepare is UpdateRule.prepare and kind.scalars is UpdateRule.scalars


def runs_compiled(kernel_mode: str | None, device: torch.device) -> bool:
    """Whether bucket sweeps run (compiled) under this kernel mode on this device: always under 'compiled'; under
    'auto' on an accelerator, where a call per tensor costs launches and guards, not on the CPU, where a bucket
    kernel is one more compile (tens of seconds) to save a few milliseconds a step."""
    return kernel.compiles(kernel_mode, device, 0)  # asked for 0 elements: yes only where any size compiles


def _bucket_sweep(plan: Plan) -> Callable[..., None]:
    """The sweep formula over elements [start, start + n) of a bucket, each element's z from its segment's
    stream, then the plan's copies of them into ``outs``: what kernel.compiled fuses."""

    def sweep(flat: torch.Tensor, start: int, n: int, segment: torch.Tensor, seg_start: torch.Tensor,
              streams: torch.Tensor, decays: torch.Tensor, tables: list[torch.Tensor | None], seed_keys: list[int],
              before: list[float], weights: list[float], after: list[float], lr: float, weight_decay: float,
              outs: list[torch.Tensor], copies: list[list[float]]) -> None:
        index = torch.arange(n, dtype=torch.int64, device=flat.device) + start
        seg = segment[index >> BLOCK_SHIFT].long()
        local = index - seg_start[seg]
        stream = streams[seg]
        zs = [z_at(spec, local, (table, noise.keys_of(seed_key, stream)), flat.dtype)
              for spec, table, seed_key in zip(plan.specs, tables, seed_keys, strict=True)]
        decay = torch.where(decays[seg], weight_decay, 0.0)
        sweep_formula(plan, flat.narrow(0, start, n), None, {}, zs,
                      Scalars(before, weights, after, lr, decay, copies=copies), outs)

    return sweep


def bucket_pass(bucket: FlatBucket, start: int, stop: int, before: Moves = (), update: Update | None = None,
                after: Moves = (), copies: Sequence[Moves] = (), kernel_mode: str | None = None
                ) -> list[torch.Tensor | None] | None:
    """The per-tensor pass (:func:`~zo_scale.core.sweep.sweep_shard`, then
    :func:`~zo_scale.core.sweep.perturbed_copies` from the swept theta) of elements [start, stop) of the bucket
    (whole parameters), in one kernel call; equal bit for bit. Needs :func:`covers`. Returns each copy, flat,
    of stop - start elements (None for a copy without moves: theta itself), or None where the kernel could
    not run (nothing done: the caller takes the per-tensor path)."""
    flat = bucket.flat
    if not runs_compiled(kernel_mode, flat.device):  # the per-tensor sweeps that run instead count their passes
        return None
    directions: list[DenseDirection] = []
    slots: dict[tuple[str, int], int] = {}

    def slots_of(moves: Moves) -> tuple[int, ...]:
        for d, _ in moves:
            slots.setdefault((d.kind, d.seed), len(directions))
            if len(directions) < len(slots):
                directions.append(d)
        return tuple(slots[(d.kind, d.seed)] for d, _ in moves)

    weights = list(update.weights) if update is not None else []  # a dense direction's estimate scale is 1
    phases = [slots_of(before), slots_of(weights), slots_of(after)]
    moving = [moves for moves in copies if moves]
    copy_slots = tuple(slots_of(moves) for moves in moving)
    plan = Plan(tuple((d.kind,) for d in directions), *phases, update.rule if weights else None, False, copy_slots)
    outs = [torch.empty(stop - start, dtype=flat.dtype, device=flat.device) for _ in moving]
    tables = [noise.table(d.kind, flat.dtype, flat.device) for d in directions]
    lr, wd = (update.lr, update.weight_decay) if weights else (0.0, 0.0)
    if not kernel.run(kernel_mode, _bucket_sweep, plan, flat, start, stop - start, bucket.segment, bucket.seg_start,
                      bucket.streams, bucket.decays, tables, [noise.seed_key(d.seed) for d in directions],
                      [c for _, c in before], [w for _, w in weights], [c for _, c in after], lr, wd, outs,
                      [[c for _, c in moves] for moves in moving], numel=flat.numel(),
                      exact_casts=exact_casts(plan, flat.dtype)):
        return None
    made = iter(outs)
    return [next(made) if moves else None for moves in copies]


def sweep_bucket(bucket: FlatBucket, before: Moves = (), update: Update | None = None, after: Moves = (),
                 kernel_mode: str | None = None) -> bool:
    """:func:`~zo_scale.core.sweep.sweep_shard` of every parameter of the bucket in one kernel call; False
    (nothing done) where the kernel could not run."""
    return bucket_pass(bucket, 0, bucket.flat.numel(), before, update, after, (), kernel_mode) is not None


class CopyWindows:
    """The perturbed forward's copies (:func:`~zo_scale.core.sweep.perturbed_copies`) made for a window of
    consecutive parameters of a bucket at once, up to ``max_bytes`` of them (or one parameter), in one kernel
    call: the first use of a parameter makes its window's copies, landing the window's pending update in
    the same pass; two windows' copies are kept, the older dropped when a third is made (a module that
    still runs keeps its views). A parameter used after its window was dropped (a tied LM head, a final
    norm registered before the layers) gets its copies alone, not its whole window's again.

    ``update_of(bucket)``: the update to land on the bucket's parameters (None: copies only); ``landed``: the
    parameters it has landed on. Parameters outside intact buckets, or whose moves a bucket pass does not
    cover, are not in a window (:meth:`copies` gives None).
    """

    def __init__(self, buckets: Sequence[FlatBucket], groups: Sequence[Moves],
                 update_of: Callable[[FlatBucket], Update | None], kernel_mode: str | None,
                 max_bytes: int = COPY_WINDOW_BYTES) -> None:
        self.groups, self.kernel_mode = groups, kernel_mode
        self.landed: set[torch.Tensor] = set()  # the parameters whose update has landed
        # each parameter's window: (bucket, its elements [start, stop), its update, the parameter's place in it)
        self._where: dict[torch.Tensor, tuple[FlatBucket, int, int, Update | None, int]] = {}
        # the last two windows made, (bucket, start, copies), newest last: the modules of a layer that two windows
        # split may run out of their parameters' order (a pre-norm before the attention registered ahead of it)
        self._made: list[tuple[FlatBucket, int, list[torch.Tensor | None]]] = []
        self._dropped: set[tuple[int, int]] = set()  # windows made and dropped since: (id(bucket), start)
        for bucket in buckets:
            update = update_of(bucket)
            if not covers(groups, update, master=False) or not bucket.intact():
                continue
            params, starts, size = bucket.params, bucket.starts, bucket.flat.element_size()
            ends = [start + _padded(p.numel()) for p, start in zip(params, starts, strict=True)]
            first = 0  # the window's first parameter
            for k in range(len(params)):
                if k + 1 == len(params) or (ends[k + 1] - starts[first]) * size > max_bytes:
                    for j in range(first, k + 1):
                        self._where[params[j]] = (bucket, starts[first], ends[k], update, starts[j] - starts[first])
                    first = k + 1

    def copies(self, p: torch.Tensor) -> list[torch.Tensor] | None:
        """p's copies, flat (p's own data for a copy without moves); None where p is not in a window, or the
        kernel could not run (then the caller makes them one parameter at a time)."""
        if p not in self._where:
            return None
        bucket, start, stop, update, at = self._where[p]
        made = next((m for m in self._made if m[0] is bucket and m[1] == start), None)
        if made is None and (id(bucket), start) in self._dropped:
            return None  # used again after its window was dropped (a tied weight, a norm registered early): alone
        if made is None:
            outs = bucket_pass(bucket, start, stop, update=update, copies=self.groups, kernel_mode=self.kernel_mode)
            if outs is None:
                self._where = {q: w for q, w in self._where.items() if w[0] is not bucket}
                return None
            if update is not None:
                self.landed.update(q for q, w in self._where.items() if w[0] is bucket and w[1] == start)
            made = (bucket, start, outs)
            self._dropped.update((id(m[0]), m[1]) for m in self._made[:-1])
            self._made = [*self._made[-1:], made]
        flat = p.data.view(-1)
        return [flat if out is None else out[at : at + p.numel()] for out in made[2]]
