r"""LOZO's updates held as a factor while V is fixed: a stored matrix is written once a window, not once a step.

LOZO (Chen et al., ICLR 2025, arXiv 2410.07698) redraws V every nu steps
(:class:`~zo_scale.core.directions.LowRankSampler`), and its ZO-SGD step on a matrix (m x n) is
theta <- theta - eta_s sum_i (w_i / r) U_i V^T (w_i = g_i / q). Within one V window the steps add up to a
factor:

.. math::
    \theta_t = W - P V^T, \qquad P = \sum_{s} \eta_s \sum_i \frac{w_{s,i}}{r} U_{s,i} \quad (m \times r,\ \text{fp32})

with W the stored matrix, untouched since the window opened. A layer reads theta_t without forming it:
x theta_t^T = x W^T - (x V) P^T, one more low-rank move (P, V) with coefficient -1 in every row group of the
perturbed forward (:mod:`~zo_scale.core.lowrank_forward`); a module that copies its weight instead gets it in
the copies. W is written only when its window *folds* (W <- round(W - P V^T), one pass): when V is redrawn (at
the matrix's first use in that step's forward, where it is read anyway), when the optimizer flushes (before an
evaluation or a save), and where the update can no longer be held (its group's weight decay turned on). A
window of nu steps reads W nu times and writes it once, where landing each update reads and writes it every
step. LOZO-M's momentum factor (:class:`~zo_scale.core.updates.LozoMomentum`) is the same idea for the
momentum; the weights' side holds ZO-SGD's updates and LOZO-M's alike (each an m x r factor times V^T).

Where it departs from landing every update: the stored matrix is rounded once a window instead of once a
step, and the layer adds the fp32 correction to its product. The trajectory follows the per-step one to
rounding, not bit for bit (``tests/core/test_pending_window.py``); it is a function of the logged scalars and
of the fold points, which the seed log records (``StepRecord.folded``), so replay and resume reproduce it
bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from zo_scale.core.directions import Direction, FactorDirection, LowRankDirection
from zo_scale.core.shards import ParamShard


class PendingWindows(Direction):
    """z = P V^T on each matrix with an open window (keyed by its noise stream), zero on every other parameter:
    the parameters sit at theta = stored - z. One object for all matrices, so a step's moves hold one more
    entry, not one per matrix."""

    seed = 0

    def __init__(self) -> None:
        self.windows: dict[int, FactorDirection] = {}  # stream -> (P, V)
        self.v_seeds: dict[int, int] = {}  # stream -> the seed of its window's V

    def __bool__(self) -> bool:
        return bool(self.windows)

    def on(self, shard: ParamShard) -> FactorDirection | None:
        """The window's (P, V) on this matrix, on the shard's device (None: no window there)."""
        d = self.windows.get(shard.stream)
        if d is None or d.factor.device == shard.flat.device:
            return d
        device = shard.flat.device  # e.g. an offloaded partition on the host, the window where the forward runs
        return FactorDirection(d.factor.to(device), d.right.to(device), d.stream)

    def z(self, shard: ParamShard, start: int, count: int) -> torch.Tensor | None:
        d = self.on(shard)
        return None if d is None else d.z(shard, start, count)

    def hold(self, layout: ParamShard, update: Sequence[tuple[LowRankDirection | FactorDirection, float]], lr: float,
             v_seed: int) -> None:
        r"""P += lr sum_j c_j L_j for an update u = sum_j c_j L_j V^T of ``layout``'s matrix (``update``: (d, c_j)
        with d's ``u_rows`` L_j and ``v`` V: LOZO's directions with c_j = w_i / r, or LOZO-M's momentum factor
        with 1; ``layout``: the parameter's stream, full shape and device, where U and V are generated), opening
        its window at V, whose seed is ``v_seed``. It must be the window's V: close a window before V changes."""
        rows = layout.shape[0]
        window = self.windows.get(layout.stream)
        if window is None:
            first = update[0][0].v(layout)
            factor = torch.zeros(rows, first.shape[1], dtype=torch.float32, device=layout.flat.device)
            window = self.windows[layout.stream] = FactorDirection(factor, first, layout.stream)
            self.v_seeds[layout.stream] = v_seed
        if self.v_seeds[layout.stream] != v_seed:
            raise RuntimeError(f"{layout.name!r}: an update along V seed {v_seed} held in the window of V seed "
                               f"{self.v_seeds[layout.stream]}, which should have folded first")
        for d, c in update:
            window.factor.add_(d.u_rows(layout, 0, rows), alpha=lr * c)

    def close(self, keep: Callable[[int, int], bool]) -> PendingWindows:
        """Remove the windows for which ``keep(stream, v_seed)`` is false and return them (to fold)."""
        closed = PendingWindows()
        for stream in [s for s in self.windows if not keep(s, self.v_seeds[s])]:
            closed.windows[stream] = self.windows.pop(stream)
            closed.v_seeds[stream] = self.v_seeds.pop(stream)
        return closed
