r"""Linear and embedding layers at K low-rank points without copies of their weight: LOZO's perturbation
inside the matmul and the lookup.

LOZO (Chen et al., ICLR 2025, arXiv 2410.07698) perturbs a matrix W (out x in) along z = U V^T, U (out x r)
and V (in x r) standard normal (:class:`~zo_scale.core.directions.LowRankDirection`). For a layer used as
x W^T, the point W + c U V^T needs no copy of W:

.. math::
    y_k = x_k W^T + b_k + \sum_{(d, c) \in P_k} c\, (x_k V_d) U_d^T

so one product over all K row groups reads W once, and each group adds two thin products (r columns:
2 r / in of the layer's FLOPs more per direction, 0.5% at r = 2, in = 768). EGGROLL ("Evolution
Strategies at the Hyperscale", 2025) evaluates rank-r perturbations inside batched inference the same way.
The bias b_k is the group's perturbed copy of the bias (dense: it is 1-D). An embedding table E (rows x
dim) at E + c U V^T looks up E[i] + c U[i] V^T: only the looked-up rows of U are generated. A matrix whose
updates are held pending (:mod:`~zo_scale.core.pending_window`) sits at W - P V^T: one more such move, (P, V)
with c = -1, in every group.

Where this departs from the copies path (:func:`~zo_scale.core.sweep.perturbed_copies`): that path rounds
W + c z to the weight's dtype and multiplies; this one adds the fp32 correction to the product, and the
bias after it (an embedding: to the looked-up rows); in bf16 / fp16 the product is rounded before the
correction is added, one rounding more than ``F.linear`` (one product over all groups, in the weight's
dtype, is what reads W once). The tests bound its distance to the layer at the exact point by the copies
path's plus a few roundings of the output; the losses agree to that, not bit for bit
(``tests/core/test_lowrank_forward.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zo_scale.core.directions import FactorDirection, LowRankDirection
from zo_scale.core.pending_window import PendingWindows
from zo_scale.core.shards import ParamShard
from zo_scale.core.sweep import Moves


def low_rank_only(groups: Sequence[Moves]) -> bool:
    """Whether the groups move at all, and every move is along a LOZO direction (on a matrix: z = U V^T) or the
    pending windows of held updates (:mod:`~zo_scale.core.pending_window`: z = P V^T). (No move at all: the
    copies path reads the weight itself, the plain layer's arithmetic.)"""
    moves = [d for group in groups for d, _ in group]
    return bool(moves) and all(type(d) is LowRankDirection or isinstance(d, PendingWindows) for d in moves)


def _factored(moves: Moves, weight: ParamShard) -> list[tuple[LowRankDirection | FactorDirection, float]]:
    """The moves that act on this matrix, each as its factors (``u_rows``, ``u_at``, ``v``)."""
    on = [(d.on(weight), c) for d, c in moves]
    return [(d, c) for d, c in on if d is not None]  # type: ignore[misc]


def low_rank_linear(x: torch.Tensor, out: torch.Tensor, weight: ParamShard, biases: Sequence[torch.Tensor | None],
                    groups: Sequence[Moves]) -> None:
    """``out`` (R x out) = each row group's y_k above, for ``x`` (R x in) stacked in K = len(groups) groups of
    R / K rows; ``weight``: the whole matrix's shard (its data is W); ``biases[k]``: group k's bias (flat),
    or None. Needs :func:`low_rank_only`.

    The moves that share a V (a step's directions and the pending window: one V a window) share its product:
    x V is computed once for all R rows, each group's left factors are summed first, C_k = sum_d c_d U_d
    (out x r), and one batched product adds every group's (x_k V) C_k^T, and its bias (as one more column of
    ones), to the output: one pass over it, in fp32."""
    torch.mm(x, weight.flat.view(weight.shape).t(), out=out)
    count, size = len(groups), len(x) // len(groups)
    lefts: dict[int, tuple[torch.Tensor, list[torch.Tensor | None]]] = {}  # id(V) -> (V, each group's C_k)
    factors: dict[int, torch.Tensor] = {}  # each direction's U (+eps and -eps groups share it)
    for k, moves in enumerate(groups):
        for d, c in _factored(moves, weight):
            if id(d) not in factors:
                factors[id(d)] = d.u_rows(weight, 0, weight.shape[0])
            v = d.v(weight)
            combined = lefts.setdefault(id(v), (v, [None] * count))[1]
            combined[k] = c * factors[id(d)] if combined[k] is None else combined[k].add_(factors[id(d)], alpha=c)
    acc = out.float()  # fp32 rows: the same tensor, no copy
    by_group = acc.view(count, size, -1)
    xs = x.float()
    bias = None if biases[0] is None else torch.stack([b.float() for b in biases])  # (K, out)
    for v, combined in lefts.values():
        left = (xs @ v).view(count, size, -1)  # (K, R / K, r)
        right = torch.stack([torch.zeros(out.shape[1], v.shape[1], device=v.device) if c is None else c
                             for c in combined])  # (K, out, r)
        if bias is not None:  # the bias as one more rank: a column of ones times it
            left = torch.cat([left, left.new_ones(count, size, 1)], 2)
            right = torch.cat([right, bias.unsqueeze(2)], 2)
            bias = None
        by_group.baddbmm_(left, right.transpose(1, 2))
    if bias is not None:  # no move on this matrix (the pending windows of other matrices only)
        by_group += bias.unsqueeze(1)
    if acc is not out:
        out.copy_(acc)


def low_rank_embedding(ids: torch.Tensor, weight: ParamShard, groups: Sequence[Moves]) -> torch.Tensor:
    """``F.embedding`` of ``ids`` (R x ...) stacked in K = len(groups) groups of R / K rows, group k's rows
    looked up in E + sum_(d, c) c U_d V_d^T (``weight``: the whole table's shard), shape (*ids.shape, dim).
    Needs :func:`low_rank_only`."""
    out = torch.nn.functional.embedding(ids, weight.flat.view(weight.shape))
    size = len(ids) // len(groups)
    for k, moves in enumerate(groups):
        rows = out[k * size : (k + 1) * size]
        acc = rows.float()
        for d, c in _factored(moves, weight):
            acc += c * (d.u_at(weight, ids[k * size : (k + 1) * size]) @ d.v(weight).t())
        if acc is not rows:
            rows.copy_(acc)
    return out
