r"""One forward for all of a step's perturbed points: the batch stacked K times, row group k at theta + P_k.

The in-place ZO step moves the stored weights (+eps z, -2 eps z, back) and runs one forward per point,
so every forward streams the whole model (a ZeRO-3 all-gather, a PCIe upload under offload) and the
stored weights carry every rounding of the round trip. Here the stored weights never move. The
closure runs the model once over K copies of its batch, stacked along dim 0, and every module that
owns a perturbed parameter runs row group k (rows [k R / K, (k + 1) R / K) of its input, R rows in
all) with a transient copy of that parameter,

.. math::
    \theta_k = \mathrm{round}\Big(\theta + \sum_{(d, c) \in P_k} c\, z_d\Big),

made by the sweep kernel (:func:`zo_scale.core.sweep.perturbed_copy`) on the parameter's device just
before the group runs and freed just after. For the central estimator with q queries K = 2q
(P_{2i} = {(z_i, +eps)}, P_{2i+1} = {(z_i, -eps)}); for the forward estimator K = q + 1 (P_0 = {}).
ZO2 (Wang et al. 2025, "ZO2: Scalable Zeroth-Order Fine-Tuning for Extremely Large Language Models
with Limited GPU Memory") runs its two branches on each uploaded block the same way; it keeps the two
branches as separate batched calls per block, as this does per module.

Where it holds: every row of a causal LM's batch is computed independently of the other rows, so
group k's rows see exactly the model at theta_k. That ends where a module mixes rows: batch-norm in
training mode, MoE routers with a capacity that drops tokens batch-wide, anything that reads batch
statistics; and it assumes that a module uses only the parameters it owns (a forward that reads a
sibling's weight, e.g. ``F.linear(x, self.other.weight)``, would see the unperturbed one). The models
zo-scale ships (OPT, LLaMA, Mistral, SmolLM2 shapes) are checked against the in-place step in
``tests/core/test_perturbed_forward.py``. Tied weights (embedding / LM head) are one parameter with one
noise stream: every use gets the same z.

Cost per module and step: K module calls on R / K rows each (the same FLOPs as one call on R rows);
one pass over its parameters that reads theta once, generates each z once and writes the K copies,
which stay alive while the module runs (K times its parameters, transiently); with the optimizer's
lazy update, the same pass lands the last step's update on theta first (and writes theta). An
``nn.Linear`` writes each group's rows straight into one output tensor; other modules' group outputs
are concatenated.
Activations are those of a forward over K times the batch.

A huge matrix (a plain ``nn.Linear`` or ``nn.Embedding`` weight over :data:`BLOCKED_BYTES`, 512 MiB:
Llama-3-8B's 1 GB and LLaMA-70B's 2.1 GB embedding and head in bf16) is copied a block of rows at a time,
the K copies of a block together within a copy window
(:data:`~zo_scale.core.flat_buckets.COPY_WINDOW_BYTES`, 128 MiB), so its copies never hold K times the
matrix (4.2 GB at K = 2); the optimizer lands a pending update on such a matrix in
a pass of its own before the first block (one read and write of it more). An embedding looks up each
group's ids in the block that holds them (the values of the whole copy's lookup); a linear layer computes
each block of its output features by a product of its own, which BLAS may round differently in the last
bits of the outputs from one product over all of them (the copies, and the weights, are the same bits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from zo_scale.core import flat_buckets
from zo_scale.core.lowrank_forward import low_rank_embedding, low_rank_linear, low_rank_only
from zo_scale.core.shards import whole_param_shard
from zo_scale.core.sweep import Moves, perturbed_copies

# a plain Linear / Embedding weight over this many bytes is copied a block of rows at a time; at least a copy window
# (flat_buckets.COPY_WINDOW_BYTES), so such a weight is alone in its window
BLOCKED_BYTES = 1 << 29
Lander = Callable[[torch.nn.Parameter, str], None]  # (param, name): land a pending update on the stored value
# (param, name, span) -> its K flat copies: of elements [start, stop) of the flattened parameter for a span
# (start, stop), of all of it for None
CopyMaker = Callable[[torch.nn.Parameter, str, tuple[int, int] | None], list[torch.Tensor]]


def _rows(args: Sequence[Any], kwargs: dict[str, Any]) -> int | None:
    """Dim 0 of the first tensor argument: the stacked rows every tensor of that length is split by."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _split(value: Any, rows: int, groups: int, k: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        size = rows // groups
        return value[k * size : (k + 1) * size]
    return value


def _merge(outputs: list[Any], name: str) -> Any:
    """The row groups' outputs joined back along dim 0 (tensors, and tuples / lists / dicts of them)."""
    first = outputs[0]
    if len(outputs) == 1:  # one group (the whole batch): nothing to join
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs, 0)
    if first is None:
        return None
    if isinstance(first, tuple | list):
        return type(first)(_merge([o[i] for o in outputs], name) for i in range(len(first)))
    if isinstance(first, dict):
        return type(first)({key: _merge([o[key] for o in outputs], name) for key in first})
    raise TypeError(f"module {name!r} returned a {type(first).__name__}: the perturbed forward can only join tensors "
                    "(and tuples, lists, dicts of them) from its row groups; use perturb='in_place' for this model")


def _linear_rows(plain_linear: bool, module: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any]
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a plain ``nn.Linear`` (``plain_linear``: that class, its forward not wrapped by anyone else)
    called on one input with autograd off: (input, output) as 2-D row matrices (the input made contiguous: a
    causal LM's head gets a slice of the positions, the last one when decoding), the output allocated once for
    all groups; None for any other module or call (``out=`` kernels record no graph)."""
    if not plain_linear or kwargs or len(args) != 1 or torch.is_grad_enabled():
        return None
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    x = x.contiguous().view(-1, x.shape[-1])
    return x, x.new_empty(x.shape[0], module.out_features)


def _linear_into(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """``out = F.linear(x, weight, bias)`` written into ``out``, by the kernel F.linear itself runs for a
    contiguous input (addmm with the bias, else mm), so the values are the same bit for bit."""
    if module.bias is not None:
        torch.addmm(module.bias, x, module.weight.t(), out=out)
    else:
        torch.mm(x, module.weight.t(), out=out)


def _row_blocks(module: torch.nn.Module, groups: int) -> list[tuple[int, int]] | None:
    """Blocks of rows [a, b) of a module's 2-D ``weight`` over :data:`BLOCKED_BYTES`, each small enough that its
    ``groups`` copies together fit in a copy window; None for a weight copied whole."""
    weight = module.weight
    over = max(BLOCKED_BYTES, flat_buckets.COPY_WINDOW_BYTES)  # alone in its window if it has one
    if weight.dim() != 2 or weight.numel() * weight.element_size() <= over:
        return None
    row_bytes = weight.shape[1] * weight.element_size()
    rows = max(1, flat_buckets.COPY_WINDOW_BYTES // (groups * row_bytes))
    return [(a, min(a + rows, weight.shape[0])) for a in range(0, weight.shape[0], rows)]


class _GroupedForward:
    """A module's forward, run once per row group with that group's perturbed copies of its parameters."""

    def __init__(self, module: torch.nn.Module, name: str, forward: Callable[..., Any],
                 params: list[tuple[torch.nn.Parameter, str]], moves: Sequence[Moves], make_copies: CopyMaker,
                 land: Lander, plain: bool) -> None:
        self.module, self.name, self.forward = module, name, forward
        self.params, self.moves, self.groups = params, moves, len(moves)
        self.make_copies, self.land = make_copies, land
        # its class's own forward, unwrapped: a Linear's groups skip forward() (F.linear's kernel, into one
        # output), a huge Linear or Embedding weight is copied a block of rows at a time
        self.plain_linear = plain and type(module) is torch.nn.Linear
        self.plain_embedding = plain and type(module) is torch.nn.Embedding and module.max_norm is None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rows, groups = _rows(args, kwargs), self.groups
        if rows is None or rows % groups:
            raise ValueError(f"module {self.name!r} got {'no tensor input' if rows is None else f'{rows} rows'}: the "
                             f"perturbed forward splits dim 0 of its input into {groups} row groups, so the closure "
                             f"must stack its batch {groups} times along dim 0")
        linear = _linear_rows(self.plain_linear, self.module, args, kwargs)
        embedding = self.plain_embedding and len(args) == 1 and not kwargs and not torch.is_grad_enabled()
        weight = self.module.weight if (linear is not None or embedding) else None
        if weight is not None and any(p is weight for p, _ in self.params):
            if low_rank_only(self.moves):
                return self._low_rank(linear, args[0])
            blocks = _row_blocks(self.module, groups)
            if blocks is not None:
                return self._by_row_blocks(blocks, linear, args[0])
        params = [p for p, _ in self.params]
        stored = [p.data for p in params]  # under ZeRO-3: the gathered whole parameter
        # every group's copy of each parameter in one pass over it (z generated once for all groups)
        copies = [self.make_copies(p, n, None) for p, n in self.params]
        outputs = []
        try:
            for k in range(groups):
                for p, data, copy in zip(params, stored, copies, strict=True):
                    p.data = copy[k].view(data.shape)
                if linear is not None:  # straight into its rows of the output: no join
                    _linear_into(self.module, *(t.narrow(0, k * len(t) // groups, len(t) // groups) for t in linear))
                else:
                    outputs.append(self.forward(*(_split(a, rows, groups, k) for a in args),
                                                **{key: _split(v, rows, groups, k) for key, v in kwargs.items()}))
        finally:
            for p, data in zip(params, stored, strict=True):
                p.data = data
        return linear[1].view(*args[0].shape[:-1], -1) if linear is not None else _merge(outputs, self.name)

    def _low_rank(self, linear: tuple[torch.Tensor, torch.Tensor] | None, x: torch.Tensor) -> torch.Tensor:
        """A plain Linear (``linear``: its input and output rows) or Embedding (ids ``x``) whose weight every
        group moves along LOZO directions only: one product (lookup) over all groups with the stored weight,
        each group's low-rank correction added (:mod:`~zo_scale.core.lowrank_forward`); no copies of the
        weight, its pending update landed on it first."""
        weight = self.module.weight
        name = next(n for p, n in self.params if p is weight)
        self.land(weight, name)
        shard = whole_param_shard(weight, name)
        if linear is None:
            return low_rank_embedding(x, shard, self.moves)
        low_rank_linear(*linear, shard, self._biases(), self.moves)
        return linear[1].view(*x.shape[:-1], -1)

    def _biases(self) -> list[torch.Tensor | None]:
        """Each group's bias (flat): its copy where the bias is perturbed, else the module's own (or None)."""
        bias = getattr(self.module, "bias", None)
        name = next((n for p, n in self.params if p is bias), None)
        return self.make_copies(bias, name, None) if name is not None else [bias] * self.groups

    def _by_row_blocks(self, blocks: list[tuple[int, int]], linear: tuple[torch.Tensor, torch.Tensor] | None,
                       x: torch.Tensor) -> torch.Tensor:
        """The groups' outputs of a plain Linear (``linear``: its input and output rows) or Embedding (input
        ``x``: ids) whose weight is copied a block of rows at a time: each block's K copies made once, each
        group's outputs that depend on those rows (its output features; its ids in the block) from them."""
        weight, groups = self.module.weight, self.groups
        name = next(n for p, n in self.params if p is weight)
        width = weight.shape[1]
        biases = self._biases()
        size = len(x) // groups
        out = linear[1] if linear is not None else weight.new_empty(*x.shape, width)
        for a, b in blocks:
            copies = self.make_copies(weight, name, (a * width, b * width))
            for k in range(groups):
                block = copies[k].view(b - a, width)
                if linear is not None:
                    xs = linear[0][k * len(linear[0]) // groups : (k + 1) * len(linear[0]) // groups]
                    part = xs @ block.t() if biases[k] is None else torch.addmm(biases[k].view(-1)[a:b], xs, block.t())
                    out[k * len(xs) : (k + 1) * len(xs), a:b] = part
                else:
                    ids, rows = x[k * size : (k + 1) * size], out[k * size : (k + 1) * size]
                    hit = (ids >= a) & (ids < b)
                    rows[hit] = block[ids[hit] - a]
        return out.view(*x.shape[:-1], -1) if linear is not None else out


@contextlib.contextmanager
def perturbed_forward(model: torch.nn.Module, names: dict[torch.Tensor, str], groups: Sequence[Moves],
                      kernel_mode: str | None = None, make_copies: CopyMaker | None = None,
                      land: Lander | None = None) -> Iterator[None]:
    """While inside, every forward of ``model`` runs K = len(groups) row groups, group k at theta + groups[k].

    ``names``: each perturbed parameter and its name (which fixes its noise stream). A parameter's
    data is read when its module runs, so a ZeRO-3 parameter is seen whole, after DeepSpeed's gather.
    Only modules that own one of them directly are wrapped; the others run as they are. A parameter
    that no module of ``model`` owns (e.g. a quantized weight's scale, an attribute of the weight)
    cannot be reached this way: a ValueError names it.

    ``make_copies(param, name, span)``: the K copies at every use of a perturbed parameter, with its
    (gathered) data in ``param.data``, each flat, of its elements [start, stop) for a ``span`` (a huge
    weight's block of rows) or of all of them for None; by default :func:`~zo_scale.core.sweep.perturbed_copies`
    at ``groups`` with ``kernel_mode``. It may write ``param.data`` first (the optimizer lands its pending
    update there, in the same pass where it copies the whole parameter:
    :class:`~zo_scale.core.optimizer.ZOOptimizer`).

    A plain Linear or Embedding whose weight every group moves along LOZO's low-rank directions makes no
    copies of it (:mod:`~zo_scale.core.lowrank_forward`): ``land(param, name)`` is called instead, before the
    weight is read, to land a pending update on it (by default nothing is pending).
    """
    if land is None:
        def land(p: torch.nn.Parameter, name: str) -> None:
            del p, name
    if make_copies is None:
        def make_copies(p: torch.nn.Parameter, name: str, span: tuple[int, int] | None) -> list[torch.Tensor]:
            whole = whole_param_shard(p, name)
            return perturbed_copies(whole if span is None else whole.narrow(*span), groups, kernel_mode)
    wrapped: list[tuple[torch.nn.Module, bool, Any]] = []
    owned: set[torch.Tensor] = set()
    try:
        for name, module in model.named_modules():
            own = [(p, names[p]) for p in module.parameters(recurse=False) if p in names]
            if not own:
                continue
            owned.update(p for p, _ in own)
            had = "forward" in module.__dict__  # e.g. an accelerate hook's wrapper: keep it, restore it after
            wrapped.append((module, had, module.__dict__.get("forward")))
            module.forward = _GroupedForward(module, name, module.forward, own, groups, make_copies, land,
                                             plain=not had)
        missing = [n for p, n in names.items() if p not in owned]
        if missing:
            raise ValueError(f"the perturbed forward perturbs the parameters modules own, and no module of the model "
                             f"owns {missing[:3]}{' ...' if len(missing) > 3 else ''}; use perturb='in_place'")
        yield
    finally:
        for module, had, previous in reversed(wrapped):
            if had:
                module.forward = previous
            else:
                del module.forward
