r"""ZOOptimizer: zeroth-order optimization with the torch.optim contract.

One step with the two-point (central) estimator and q queries, for i = 1..q:

.. math::
    g_i = \frac{L(\theta + \epsilon z_i) - L(\theta - \epsilon z_i)}{2 \epsilon},
    \qquad \hat g = \frac{1}{q} \sum_i c_i g_i z_i,
    \qquad \theta \leftarrow \mathrm{rule}(\theta, \hat g)

and with the other estimators of :mod:`zo_scale.core.estimators` (one-sided, FZOO, forward gradient) their g_i.
Symbols map to arguments: :math:`\epsilon` = ``eps``, :math:`\eta` = ``lr`` (in the rule), q = ``queries``;
:math:`z_i` comes from ``sampler`` (dense normal by default), :math:`c_i` is its ``estimate_scale`` on each
parameter (1, or LOZO's 1/r on matrices), and the rule from ``rule`` (ZO-SGD by default).

``step(closure)``: ``closure()`` evaluates the loss of one fixed batch at the current parameters and
returns it (a float or a 0-dim tensor); ``step`` calls it under ``torch.no_grad()`` at each
perturbed point and returns the loss estimate at theta (the mean of the evaluated pairs). ``step``
never reads or writes ``.grad``.

.. note::
    The perturbation moves in place: +eps z, -2 eps z, and the restoring +eps z is fused with the
    update (and, with ``lazy=True``, with the next step's +eps z) in one pass per parameter: see
    :mod:`zo_scale.core.sweep`. In low precision the +eps/-2eps/+eps round trip does not return
    exactly to theta (bf16 drifts by about one rounding step per step).

.. note::
    With ``perturb="in_forward"`` the stored weights never move: ``closure(K)`` runs the model once
    over its batch stacked K times and returns the K row groups' losses, and each module runs row
    group k with a transient copy of its parameters at the k-th point (:mod:`zo_scale.core.perturbed_forward`).
    A step is then one forward over K times the rows and one update pass; weights in bf16 come back
    bit for bit when the update is zero. With ``lazy=True`` and a rule without per-element state
    ('sgd', 'sign') and no master copy, that update pass is the next forward itself: each module
    lands the pending update on its (gathered) parameters in the pass that makes their copies, and
    ``store_fn`` writes them back to where they are stored (under ZeRO-3: the rank's partition, its
    NVMe file). Parameters the forward did not reach are updated by a sweep after it. With LOZO's directions
    (and the 'sgd' or 'lozo-m' rule) a matrix's updates are not landed at all until V is redrawn: they are held
    as an m x r factor P, the forward reads theta = W - P V^T, and W is written once a window
    (:mod:`zo_scale.core.pending_window`).

.. note::
    With ``lazy=True`` the parameters between two steps sit at theta_t - eps z_t (central) with
    step t's update pending; call :meth:`flush` before evaluating or saving the model
    (``state_dict`` flushes by itself; where a flush folds LOZO's pending windows, the next step's record
    says so, for replay).
    A steady-state lazy step is two passes over the parameters.

``eps`` is one number for the whole model, not per group: the loss difference measures the sum of
all groups' moves, so per-group eps would not give per-group projected gradients.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from zo_scale.core import flat_buckets, noise
from zo_scale.core import kernel as sweep_kernel
from zo_scale.core.directions import (
    BlockDirection,
    DenseSampler,
    Direction,
    DirectionSampler,
    LowRankDirection,
    LowRankSampler,
)
from zo_scale.core.estimators import CentralCurvature, Estimator, ForwardGradient, make_estimator
from zo_scale.core.forward_grad import loss_and_directional_derivative
from zo_scale.core.pending_window import PendingWindows
from zo_scale.core.perturbed_forward import perturbed_forward
from zo_scale.core.shards import ParamShard, ShardSpan, whole_param_shard
from zo_scale.core.sweep import Moves, Update, on_shard, perturbed_copies, sweep_shard
from zo_scale.core.updates import SGD, DiagonalHessian, LozoMomentum, UpdateRule, make_rule

ESTIMATOR_DRAW = -5  # the tag of a step's seed for an estimator's random choices (samplers use -1 to -3)
# where the perturbed points live: the stored weights, moved in place, or transient copies inside the forward
PERTURB = ("in_place", "in_forward")

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """What one step did, enough to redo it without forwards (see :mod:`zo_scale.train.seedlog`).

    ``grads``: the projected gradients g_i (None for a skipped step); ``lrs``/``weight_decays``: per
    param group, as applied; ``conservative``: the multiple of the step taken (-1, 0 or +1).
    """

    step: int
    seed: int
    grads: list[float] | None
    lrs: list[float]
    weight_decays: list[float]
    loss: float
    conservative: int | None = None
    measured: list[float] | None = None  # the estimator's numbers beyond the g_i, for the rule (HiZOO's curvatures)
    # a flush before this step (an evaluation, a save) folded LOZO's pending windows into the weights, where they
    # are rounded: replay flushes at the same point
    folded: bool = False


@dataclass
class _Pending:
    """Work left for the next pass: a restore and (unless skipped) the update of the last step."""

    restore: list[tuple[Direction, float]]
    weights: list[tuple[Direction, float]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    weight_decays: list[float] = field(default_factory=list)
    measured: list[float] = field(default_factory=list)
    held: frozenset[torch.Tensor] = frozenset()  # matrices whose update is held in their pending window instead


class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order optimizer over param groups (see the module docstring for the equations).

    Args:
        params: parameters, named parameters (``model.named_parameters()``, preferred: a name
            fixes the parameter's noise stream across runs and wrappers) or param-group dicts.
        lr: learning rate eta (per group; schedulers may edit ``group["lr"]``).
        eps: perturbation scale epsilon (one for all groups).
        rule: an :class:`~zo_scale.core.updates.UpdateRule` or its name ('sgd', 'sign', 'momentum', 'adam').
        sampler: where directions come from (:mod:`zo_scale.core.directions`); dense normal by default.
        estimator: an :class:`~zo_scale.core.estimators.Estimator` or its name: 'central' (two-point, 2
            forwards a query), 'forward' (1 forward a query + 1 at theta), 'fzoo' (forward, normalized by the
            losses' spread; q >= 2) or 'jvp' (forward gradient: exact grad . z by forward-mode AD; more
            memory, see :mod:`zo_scale.core.forward_grad`; needs ``model``).
        queries: q, directions averaged per step.
        weight_decay: decoupled decay, applied to matrices only (not biases or norm weights).
        seed: run seed; step t, query i perturbs along directions seeded by (seed, t, i).
        lazy: defer each update into the next step's first pass (see the note above).
        conservative: ZO-SGD-Cons: after the estimate, also evaluate theta -/+ eta g_hat and keep the
            best of theta, theta - eta g_hat, theta + eta g_hat (L(theta) estimated by the mean of the
            evaluated pair: no extra forward; with perturb='in_forward' both trial points are one more
            closure(2)). Needs the 'sgd' rule, one lr for all groups, no weight decay.
        shard_fn: maps (param, name) to the local :class:`ParamShard` (a ZeRO-3 backend gives shards).
        loss_reduce: averages a 1-D tensor of this step's losses over data-parallel ranks (one
            collective per step, two with conservative=True); identity by default.
        model: the module the closure calls; estimator='jvp' and perturb='in_forward' need it.
        master_weights: keep an fp32 copy of each (local) shard, updated in fp32, from which the
            low-precision weights are set at every move (see :mod:`zo_scale.core.sweep`): no drift
            from the +/- eps round trip in bf16/fp16, for 4 extra bytes per trainable element.
        kernel: what runs each sweep, 'auto', 'compiled' or 'eager' (:mod:`zo_scale.core.kernel`).
        perturb: 'in_place' (move the stored weights to each point, one closure() per point) or
            'in_forward' (one closure(K) over K stacked row groups, weights never moved; see the note).
        store_fn: ``store_fn(param, name)`` writes a parameter's whole value, updated in ``param.data``
            inside the forward (lazy in_forward), to where the parameter is stored; None where
            ``param.data`` is the stored tensor (one process, replicated ranks). A ZeRO-3 backend gives one.
        writing: a context manager factory entered around every pass that writes the stored parameters
            (each sweep, and the forward's landing, whose stores the sweep after it closes): a backend that
            reads them on another stream (ZeRO-3's all-gathers run on DeepSpeed's) orders those reads
            after the writes, and the writes after reads in flight. None: one stream, nothing to order.
        pending_steps: N, with ``perturb='in_forward'``, ``lazy=True`` and a rule without per-element state
            ('sgd', 'sign'), no master copy: the stored weights are written every N steps instead of every step.
            In between, the forward lands the updates not yet stored on a transient copy of each parameter it
            reads (one sweep per update, as landing them step by step would: the same bits), and the stored
            value stays as it was: under offload (``store_fn``) a step reads the model and writes it once every
            N steps. Costs N sweeps of compute per parameter read at most. 1 (the default): every step stores.
        flat: store each param group's parameters (per device and dtype) as views of flat buckets
            (:mod:`zo_scale.core.flat_buckets`), so that a sweep is one kernel call per bucket instead of
            one per tensor, with equal results; the parameters stay the same objects, their ``.data`` moves.
            Only with whole parameters (the default ``shard_fn``), under ``kernel='compiled'`` or on an
            accelerator under 'auto' (on the CPU a bucket kernel is one more compile to save milliseconds).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        *,
        rule: UpdateRule | str = "sgd",
        sampler: DirectionSampler | None = None,
        estimator: Estimator | str = "central",
        queries: int = 1,
        weight_decay: float = 0.0,
        seed: int = 0,
        lazy: bool = False,
        conservative: bool = False,
        shard_fn: Callable[[torch.Tensor, str], ParamShard] = whole_param_shard,
        loss_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model: torch.nn.Module | None = None,
        master_weights: bool = False,
        kernel: str | None = None,
        perturb: str = "in_place",
        store_fn: Callable[[torch.Tensor, str], None] | None = None,
        flat: bool = True,
        writing: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
        pending_steps: int = 1,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps > 0.0:
            raise ValueError(f"Invalid perturbation scale eps: {eps} (must be > 0)")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        estimator = make_estimator(estimator) if isinstance(estimator, str) else estimator
        if queries < estimator.min_queries:
            raise ValueError(f"queries must be >= {estimator.min_queries} for the {estimator.name!r} estimator, "
                             f"got {queries}")
        if perturb not in PERTURB:
            raise ValueError(f"unknown perturb {perturb!r}; choose one of {PERTURB}")
        if perturb == "in_forward":
            if isinstance(estimator, ForwardGradient):
                raise ValueError("perturb='in_forward' needs a finite-difference estimator: 'jvp' evaluates no "
                                 "perturbed points")
            if model is None:
                raise ValueError("perturb='in_forward' needs model=<the module the closure calls>")
        if sampler is not None and sampler.reads_weights and perturb != "in_forward":
            raise ValueError(f"{type(sampler).__name__}'s z depends on theta itself (a magnitude mask), and the "
                             "in-place step holds theta + eps z at its second point: use perturb='in_forward'")
        self.kernel = sweep_kernel.resolve(kernel)
        self.rule = make_rule(rule) if isinstance(rule, str) else rule
        if isinstance(self.rule, DiagonalHessian) and not isinstance(estimator, CentralCurvature):
            raise ValueError("the HiZOO rule needs the loss's curvature along each direction: estimator='hizoo'")
        if isinstance(self.rule, DiagonalHessian) and perturb == "in_forward" and shard_fn is not whole_param_shard:
            raise ValueError("the HiZOO rule scales each perturbation by its Hessian, which a sharded optimizer "
                             "(ZeRO-3) keeps for its own shard only, while perturb='in_forward' perturbs the whole "
                             "gathered parameter: use perturb='in_place'")
        if isinstance(self.rule, LozoMomentum) and not isinstance(sampler, LowRankSampler):
            raise ValueError("the LOZO-M rule keeps momentum in the low-rank factor: it needs sampler=LowRankSampler")
        if conservative and master_weights:
            raise ValueError("conservative=True with master_weights=True is not supported: its trial moves along "
                             "the update are not perturbations the master copy could leave out")
        if conservative and not isinstance(self.rule, SGD):
            raise ValueError("conservative=True needs the 'sgd' rule (it compares moves along -/+ lr * g_hat)")
        if pending_steps < 1:
            raise ValueError(f"pending_steps must be >= 1, got {pending_steps}")
        if pending_steps > 1 and not (perturb == "in_forward" and lazy and not self.rule.buffers
                                      and not master_weights and not conservative):
            raise ValueError(f"pending_steps={pending_steps} lands updates inside the forward: it needs "
                             "perturb='in_forward', lazy=True, a rule without per-element state ('sgd', 'sign'), "
                             "no master weights and conservative=False")
        if pending_steps > 1 and isinstance(sampler, LowRankSampler):
            raise ValueError("pending_steps > 1 with LOZO's sampler: LOZO holds its matrices' updates in pending "
                             "windows already (written once every nu steps)")
        if conservative and isinstance(sampler, LowRankSampler):
            raise ValueError("conservative=True moves along the directions themselves: LOZO's estimate carries a "
                             "1/r on matrices that its trial moves would miss")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        if conservative and (len({g["lr"] for g in self.param_groups}) > 1
                             or any(g["weight_decay"] for g in self.param_groups)):
            raise ValueError("conservative=True needs one lr for all param groups and weight_decay=0")
        self.eps = eps
        self.sampler = sampler if sampler is not None else DenseSampler()
        self.estimator = estimator
        self.queries = queries
        self.seed = seed
        self.lazy = lazy
        self.conservative = conservative
        self.shard_fn = shard_fn
        self.loss_reduce = loss_reduce
        self.model = model
        self.master_weights = master_weights
        self.perturb = perturb
        self.store_fn = store_fn
        self.writing = writing or contextlib.nullcontext
        self.pending_steps = pending_steps
        self._offsets: dict[int, tuple[Direction, float]] = {}  # master_weights: perturbation the shards carry
        self.step_count = 0  # t: steps taken, skipped ones included
        self.skipped_steps = 0
        self.last_record: StepRecord | None = None
        # the last step's measured values, averaged over ranks, in the estimator's order (the loss at each point
        # it evaluated: an ES population's members; zeros in replay)
        self.last_losses: list[float] = []
        self._pending: _Pending | None = None
        # (pending_steps > 1) earlier steps' updates, oldest first, that forwards landed on transient copies only:
        # the stored weights lack them, theta_t = stored + these + the pending update
        self._unstored: list[_Pending] = []
        self._windows = PendingWindows()  # LOZO's updates held per matrix (pending_window)
        self._folded = False  # a flush folded windows since the last step: the next record says so
        self.buckets: list[flat_buckets.FlatBucket] = []
        if flat and shard_fn is whole_param_shard and any(
                flat_buckets.runs_compiled(self.kernel, p.device) for g in self.param_groups for p in g["params"]):
            self.buckets = flat_buckets.flatten([list(zip(g["params"], self._names(g, gi), strict=True))
                                                 for gi, g in enumerate(self.param_groups)])
        shards = self.local_shards()
        # where each shard sits never changes; kept so that checkpoints need not fetch the data (under
        # NVMe offload local_shards() reads and writes every partition)
        self.shard_spans: list[ShardSpan] = [s.span for s in shards]
        # each matrix's stream, full shape and the device its forward runs on, no data: where a held update's
        # factor is made (pending_window)
        self._layouts = {s.param: ParamShard(s.param, s.name, s.stream, torch.empty(0, device=s.param.device), 0,
                                             s.shape) for s in shards if len(s.shape) == 2}
        self._streams = frozenset(s.stream for s in shards)
        self.sampler.bind(shards)
        self.rule.bind(shards)
        for device in {s.flat.device for s in shards}:
            sweep_kernel.announce(self.kernel, device)

    # -- bookkeeping -------------------------------------------------------------------------
    def _names(self, group: dict[str, Any], gi: int) -> list[str]:
        if "param_names" in group:
            return group["param_names"]
        first = sum(len(g["params"]) for g in self.param_groups[:gi])
        return [f"param{first + j}" for j in range(len(group["params"]))]

    def _shards(self, skip: Container[torch.Tensor] = ()) -> Iterator[tuple[int, ParamShard]]:
        """(group index, local shard) of each parameter not in ``skip``, one at a time (rebuilt per call:
        .data may be swapped); a shard with a ``release`` hook (e.g. swapped in from NVMe) is released
        once the caller is done with it, before the next one is made."""
        for gi, group in enumerate(self.param_groups):
            for p, n in zip(group["params"], self._names(group, gi), strict=True):
                if p in skip:
                    continue
                shard = self.shard_fn(p, n)
                yield gi, shard
                if shard.release is not None:
                    shard.release()

    @property
    def per_element_keys(self) -> tuple[str, ...]:
        """Names of the state tensors that hold one fp32 value per element of a shard."""
        return (*self.rule.buffers, "master")

    def local_shards(self) -> list[ParamShard]:
        """Every parameter's local shard, in param-group order (the order of ``state_dict()['state']``).
        For their layout (offset, size, shape): a released shard's ``flat`` data is no longer valid."""
        return [shard for _, shard in self._shards()]

    def _state_for(self, shard: ParamShard) -> dict[str, torch.Tensor]:
        if not self.state[shard.param]:
            self.state[shard.param] = self.rule.init_state(shard)
        return self.state[shard.param]

    def _updates(self, pending: _Pending | None) -> list[Update | None]:
        """Each param group's share of a pending update (None where there is none: a skipped step)."""
        if pending is None or not pending.weights:
            return [None] * len(self.param_groups)
        return [Update(self.rule, pending.weights, lr, wd, pending.measured)
                for lr, wd in zip(pending.lrs, pending.weight_decays, strict=True)]

    def _sweep(self, before: Moves = (), pending_update: _Pending | None = None, after: Moves = (),
               skip: Container[torch.Tensor] = ()) -> None:
        offsets: Moves = ()
        if self.master_weights:
            for d, c in (*before, *after):
                total = self._offsets.get(id(d), (d, 0.0))[1] + c
                if total == 0.0:  # +eps, -2eps, +eps sums to exactly 0 in binary floating point
                    self._offsets.pop(id(d), None)
                else:
                    self._offsets[id(d)] = (d, total)
            offsets = list(self._offsets.values())
        updates = self._updates(pending_update)
        with self.writing():
            if not self.master_weights:
                skip = {*skip, *self._sweep_buckets(before, updates, after, skip)}
            for gi, shard in self._shards(skip):
                update = updates[gi]
                state = self._state_for(shard) if update or self.master_weights else None
                master = None
                if self.master_weights:
                    if "master" not in state:  # first sweep: the shard is still unperturbed
                        state["master"] = shard.flat.to(torch.float32, copy=True)
                    master = state["master"]
                sweep_shard(shard, before, update, after, state if update else None, master, offsets, self.kernel)

    def _sweep_buckets(self, before: Moves, updates: list[Update | None], after: Moves,
                       skip: Container[torch.Tensor]) -> set[torch.Tensor]:
        """Sweep each bucket whose parameters all take part and whose moves a bucket sweep covers, one
        kernel call each; returns the parameters swept (the rest go one by one). A bucket whose parameters
        were given other data since it was built is dropped, with a warning."""
        swept: set[torch.Tensor] = set()
        for bucket in list(self.buckets):
            update = updates[bucket.group]
            if any(p in skip for p in bucket.params) or not flat_buckets.covers((before, after), update, False):
                continue
            if not bucket.intact():
                log.warning("ZO sweep: parameters of a flat bucket (%s, ...) were given new data (e.g. module.to); "
                            "they are swept one tensor at a time from now on", bucket.names[0])
                self.buckets.remove(bucket)
                continue
            if flat_buckets.sweep_bucket(bucket, before, update, after, self.kernel):
                if update is not None:  # the step counts the per-tensor sweep advances, in one op
                    self._step_counts(bucket).add_(1)
                swept.update(bucket.params)
        return swept

    def _step_counts(self, bucket: flat_buckets.FlatBucket) -> torch.Tensor:
        """The bucket's parameters' step counts as one 1-D tensor whose elements are their states' 0-dim
        ``step`` (views), made (or remade, after ``load_state_dict``) where they are not."""
        states = [self.state[p] for p in bucket.params]
        if bucket.steps is None or not all(s.get("step") is v for s, v in zip(states, bucket.step_views, strict=True)):
            for p, name, state in zip(bucket.params, bucket.names, states, strict=True):
                if not state:
                    state.update(self.rule.init_state(whole_param_shard(p, name)))
            bucket.steps = torch.stack([s["step"] for s in states])
            bucket.step_views = list(bucket.steps.unbind())
            for state, view in zip(states, bucket.step_views, strict=True):
                state["step"] = view
        return bucket.steps

    def flush(self) -> None:
        """Apply the pending restore and update now, and fold the pending windows (a no-op unless ``lazy``). A fold
        rounds the weights where it happens: the next step's record says so (``folded``)."""
        self._folded |= self._land()

    def _land(self) -> bool:
        """:meth:`flush`; returns whether it folded windows."""
        pending, self._pending = self._pending, None
        older, self._unstored = self._unstored, []
        folds, self._windows = self._windows, PendingWindows()
        for update in older:  # one sweep each, in order: the bits of landing them step by step
            self._sweep(update.restore, update)
        if pending is not None or folds:
            self._sweep(pending.restore if pending else (), pending, [(folds, -1.0)] if folds else ())
        return bool(folds)

    @property
    def _holds(self) -> bool:
        """Whether LOZO's updates of matrices are held in pending windows (:mod:`~zo_scale.core.pending_window`):
        its sampler, the ZO-SGD rule or LOZO-M's, lazy, inside the forward (which reads the windows), no master
        copy."""
        return (self.lazy and self.perturb == "in_forward" and not self.master_weights
                and (type(self.rule) is SGD or isinstance(self.rule, LozoMomentum))
                and isinstance(self.sampler, LowRankSampler))

    def _holding(self, directions: list[Direction]) -> bool:
        """Whether this step's updates of matrices are held (:attr:`_holds`, along LOZO's directions)."""
        return self._holds and all(type(d) is LowRankDirection for d in directions)

    def _closing(self, directions: list[Direction], weight_decays: list[float]) -> PendingWindows:
        """The windows that fold this step (removed from the open ones): those whose V this step redraws or whose
        group decays weights (an update that is not a factor), all where the step holds no update."""
        if not self._holding(directions):
            return self._windows.close(lambda stream, v_seed: False)
        v_seed = directions[0].v_seed  # type: ignore[attr-defined]
        holdable = {self._layouts[p].stream for _, p in self._holdable(weight_decays)}
        return self._windows.close(lambda stream, window_v: stream in holdable and window_v == v_seed)

    def _holdable(self, weight_decays: list[float]) -> list[tuple[int, torch.Tensor]]:
        """(group index, matrix) of each matrix whose group decays no weights: its update is a factor to hold."""
        return [(gi, p) for gi, group in enumerate(self.param_groups) if not weight_decays[gi]
                for p in group["params"] if p in self._layouts]

    def _hold(self, weights: Moves, lrs: list[float], weight_decays: list[float]) -> frozenset[torch.Tensor]:
        """Each matrix's share of this step's update added to its window's factor, where its group decays no
        weights; returns those matrices (the update then skips them). The rule's state advances as the sweep
        would advance it (LOZO-M's momentum factor, the step count)."""
        v_seed = weights[0][0].v_seed  # type: ignore[attr-defined]
        held = self._holdable(weight_decays)
        for gi, p in held:
            layout, state = self._layouts[p], self._state_for(self._layouts[p])
            _, update = on_shard(self.rule, layout, weights, state)  # (U_i, w_i / r), or LOZO-M: (N, 1)
            self._windows.hold(layout, update, lrs[gi], v_seed)  # type: ignore[arg-type]
            state["step"] += 1
        return frozenset(p for _, p in held)

    # -- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None, *, replay: StepRecord | None = None) -> float:
        """One ZO step; returns the loss estimate at theta. ``closure()`` (in place) or ``closure(K)``
        (``perturb='in_forward'``: the K row groups' losses, shape (K,)). With ``replay`` (a logged record
        of this step) no closure is called: the same passes run with the logged scalars."""
        if (closure is None) == (replay is None):
            raise ValueError("step() needs a closure that returns the loss (or, to replay, a StepRecord)")
        if replay is not None and replay.step != self.step_count:
            raise ValueError(f"replay record is for step {replay.step}, optimizer is at step {self.step_count}")

        def evaluate() -> float:
            return 0.0 if closure is None else float(closure())  # a host sync per forward

        if replay is not None and replay.folded:
            self.flush()  # where the run's flush folded its windows (an evaluation, a save)
        if self._unstored and (self.perturb != "in_forward" or closure is None):
            self._land()  # replay: no forward to land them in
        folded, self._folded = self._folded, False
        t = self.step_count
        step_seed = noise.derive_seed(self.seed, t)
        directions = self.rule.perturbations(self.sampler.directions(self.seed, t, self.queries), self._state_for)
        estimator = self.estimator.for_step(noise.derive_seed(self.seed, t, ESTIMATOR_DRAW))
        wds = [g["weight_decay"] for g in self.param_groups] if replay is None else replay.weight_decays
        pending, self._pending = self._pending, None
        folds = self._closing(directions, wds)
        in_forward = self.perturb == "in_forward" and closure is not None
        in_forward_update = in_forward and self._lands_in_forward(pending)
        # these read theta itself (or a copy of it): land the update first, unless the forward does
        reads_theta = estimator.at_theta or not estimator.points or self.perturb == "in_forward"
        if reads_theta and pending is not None and not in_forward_update:
            self._sweep(pending.restore, pending, skip=pending.held)
            pending = None
        if folds and not in_forward:  # replay: no forward to fold them in
            self._sweep(after=[(folds, -1.0)])
            folds = PendingWindows()
        restore: list[tuple[Direction, float]] = []  # unless moved in place, theta never moves
        if isinstance(self.estimator, ForwardGradient):
            values = self._forward_gradients(closure, directions)
        elif self.perturb == "in_forward":
            values = self._row_group_losses(closure, estimator, directions, pending, folds)
        else:
            restore, values = self._finite_differences(evaluate, estimator, directions, pending)

        reduced = self.last_losses = self._reduce(values)
        grads = estimator.projected_grads(reduced, self.eps, self.queries) if replay is None else replay.grads
        measured = estimator.measured(reduced, self.eps, self.queries) if replay is None else replay.measured
        loss = estimator.loss_at_theta(reduced, self.queries)
        lrs = [g["lr"] for g in self.param_groups] if replay is None else replay.lrs
        record = StepRecord(t, step_seed, grads, lrs, wds, loss, measured=measured or None, folded=folded)
        self.step_count += 1
        self.last_record = record
        if grads is None:  # a non-finite loss: go back to theta, no update
            self.skipped_steps += 1
            self._sweep(restore)
            return loss
        weights = [(d, g / self.queries) for d, g in zip(directions, grads, strict=True)]
        if self.conservative:
            record.conservative = self._conservative(restore, weights, lrs[0], loss, closure, evaluate, replay)
            return loss
        held = self._hold(weights, lrs, wds) if self._holding(directions) else frozenset()
        if held:  # the update leaves them to their windows
            active = self._streams - {self._layouts[p].stream for p in held}
            weights = [(BlockDirection(d, active), w) for d, w in weights]
        self._pending = _Pending(restore, weights, lrs, wds, measured or [], held)
        if not self.lazy:
            self._land()
        return loss

    def _finite_differences(
        self, evaluate: Callable[[], float], estimator: Estimator, directions: list[Direction],
        pending: _Pending | None,
    ) -> tuple[list[tuple[Direction, float]], list[float]]:
        """Walk theta through the estimator's points along each direction, evaluating the loss at each.

        Returns the move that restores theta from the last point, and the losses: for 'central'
        [L(+z_1), L(-z_1), L(+z_2), ...]; for 'forward' [L(theta), L(+z_1), L(+z_2), ...]. The first
        move also applies ``pending`` (the previous step's restore and update): the lazy fusion.
        """
        points = estimator.points
        losses = [evaluate()] if estimator.at_theta else []
        at: tuple[Direction, float] | None = None  # (direction, offset) where theta sits now
        for d in directions:
            for j, point in enumerate(points):
                if j == 0:
                    restore = [(at[0], -at[1])] if at else (pending.restore if pending else [])
                    self._sweep(restore, pending if not at else None, [(d, point * self.eps)])
                else:
                    self._sweep(after=[(d, (point - points[j - 1]) * self.eps)])
                at = (d, point * self.eps)
                losses.append(evaluate())
        assert at is not None
        return [(at[0], -at[1])], losses

    def _lands_in_forward(self, pending: _Pending | None) -> bool:
        """Whether the forward can land this pending update on each gathered parameter: an elementwise rule
        without per-element state (whose shard of a partition would not cover the gathered parameter),
        and no fp32 master copy (which the update, not the weights, would have to receive)."""
        return pending is not None and bool(pending.weights) and not self.rule.buffers and not self.master_weights

    def _row_group_losses(self, closure: Callable[[int], Any] | None, estimator: Estimator,
                          directions: list[Direction], pending: _Pending | None = None,
                          folds: PendingWindows | None = None) -> list[float]:
        """The losses of every point of this step from one ``closure(K)`` over K stacked row groups, in the
        order of :meth:`_finite_differences` (placeholders in replay). One host sync for all of them.

        ``pending`` (the last step's update, see :meth:`_lands_in_forward`) lands inside the forward, and the
        windows in ``folds`` fold there: at a parameter's first use, on its gathered whole value, which
        ``store_fn`` then stores. Parameters the forward does not reach (or all, if the closure raises) get
        them from a sweep afterwards."""
        points = estimator.points
        groups: list[list[tuple[Direction, float]]] = [[]] if estimator.at_theta else []
        groups += [[(d, point * self.eps)] for d in directions for point in points]
        return self._stacked_losses(closure, groups, pending, folds)

    def _stacked_losses(self, closure: Callable[[int], Any] | None, groups: list[Moves],
                        pending: _Pending | None = None, folds: PendingWindows | None = None) -> list[float]:
        """The loss at theta + each group's moves, from one ``closure(K)`` over K = len(groups) stacked row
        groups (zeros in replay); ``pending`` and ``folds`` as in :meth:`_row_group_losses`."""
        if closure is None:
            return [0.0] * len(groups)
        with self._perturbed(groups, pending, folds):
            losses = torch.as_tensor(closure(len(groups))).detach()
        if losses.shape != (len(groups),):
            raise ValueError(f"with perturb='in_forward' closure(K) must return the K = {len(groups)} row groups' "
                             f"losses, shape ({len(groups)},); got shape {tuple(losses.shape)}")
        return losses.double().tolist()

    @contextlib.contextmanager
    def _perturbed(self, groups: list[Moves], pending: _Pending | None,
                   folds: PendingWindows | None = None) -> Iterator[None]:
        """While inside, the model's forward runs K = len(groups) row groups, group k at theta + groups[k]
        (:func:`~zo_scale.core.perturbed_forward.perturbed_forward`) less the open windows' held updates, and
        ``pending`` lands at each parameter's first use, on its gathered whole value, in the pass that makes its
        copies (the windows in ``folds`` fold there, in a pass of their own); ``store_fn`` then stores it.
        Parameters the forward does not reach (or all, if it raises) get it from a sweep on the way out.

        With ``pending_steps`` N > 1 the updates not yet stored (:attr:`_unstored`) land first, in order; while
        fewer than N are due, each use of a parameter lands them all on a transient copy instead, from which its
        copies are made, and nothing is stored (they stay due for the next forward)."""
        names = {p: n for gi, group in enumerate(self.param_groups)
                 for p, n in zip(group["params"], self._names(group, gi), strict=True)}
        assert self.model is not None
        if self._windows:  # theta = stored - P V^T on each matrix with an open window
            groups = [[*moves, (self._windows, -1.0)] for moves in groups]
        folds = folds if folds is not None else PendingWindows()
        folding = {p for p, layout in self._layouts.items() if layout.stream in folds.windows}
        group_of = {p: gi for gi, group in enumerate(self.param_groups) for p in group["params"]}
        due, self._unstored = [*self._unstored, *([pending] if pending is not None else [])], []
        if 0 < len(due) < self.pending_steps:  # not stored this step: read through transient copies
            self._unstored = due
            with self._deferred(names, group_of, groups, due):
                yield
            return
        pending, older = (due[-1], [self._updates(u) for u in due[:-1]]) if due else (None, [])
        held = pending.held if pending is not None else frozenset()
        updates = self._updates(pending)
        landed: set[torch.Tensor] = set()
        windows = flat_buckets.CopyWindows([] if older else self.buckets, groups,  # a window lands one update
                                           lambda bucket: updates[bucket.group], self.kernel,
                                           flat_buckets.COPY_WINDOW_BYTES)

        def catch_up(p: torch.nn.Parameter, whole: ParamShard) -> None:
            """The older due updates on p, one sweep each, before the pending one lands (pending_steps)."""
            for update in (u[group_of[p]] for u in older):
                if update is not None:
                    sweep_shard(whole, update=update, state=self._state_for(whole), kernel_mode=self.kernel)

        def pending_of(p: torch.nn.Parameter) -> Update | None:
            """The update still to land on p this step (None once landed, or where there is none: held in a window)."""
            return None if p in landed or p in windows.landed or p in held else updates[group_of[p]]

        def stored(p: torch.nn.Parameter, name: str) -> None:
            """p has its update: remember it, and write it back to where p is stored."""
            landed.add(p)
            if self.store_fn is not None:
                self.store_fn(p, name)

        def land(p: torch.nn.Parameter, name: str) -> None:
            """The pending update on p at its first use, or p's window folded, in a pass of its own: for a weight
            the forward reads without copies (LOZO's low-rank points, which no copy window covers) or copies a
            block at a time (landed block by block, a forward stopped between blocks would leave it half landed),
            and a window's fold before any copy of p is made."""
            update = pending_of(p)
            fold: Moves = [(folds, -1.0)] if p in folding and p not in landed else []
            if update is not None or fold:
                whole = whole_param_shard(p, name)
                catch_up(p, whole)
                sweep_shard(whole, update=update, after=fold, state=self._state_for(whole), kernel_mode=self.kernel)
                stored(p, name)

        def land_and_copy(p: torch.nn.Parameter, name: str, span: tuple[int, int] | None) -> list[torch.Tensor]:
            """The copies of p (of its elements in ``span``), the pending update landed on it in the same pass at
            its first use (a window of a flat bucket at a time where it can; :func:`land` first for a parameter
            copied a block at a time, which is over a window, so alone in its own)."""
            made = windows.copies(p) if span is None else None
            if made is not None:
                return made
            if span is not None or p in folding:
                land(p, name)
            whole = whole_param_shard(p, name)
            update = pending_of(p)
            if update is not None:
                catch_up(p, whole)
            shard = whole if span is None else whole.narrow(*span)
            copies = perturbed_copies(shard, groups, self.kernel, update, self._state_for(whole) if update else None)
            if update is not None:
                stored(p, name)
            return copies

        try:
            with perturbed_forward(self.model, names, groups, self.kernel, land_and_copy, land):
                yield
        finally:
            done, fold = landed | windows.landed, [(folds, -1.0)] if folds else []
            for update in due[:-1]:
                self._sweep(update.restore, update, skip=done)
            if pending is not None:  # held matrices have nothing to land, unless their windows fold
                self._sweep(pending.restore, pending, fold, skip=done | (held - folding))
            elif folds:
                self._sweep(after=fold, skip=set(names) - (folding - done))

    @contextlib.contextmanager
    def _deferred(self, names: dict[torch.Tensor, str], group_of: dict[torch.Tensor, int], groups: list[Moves],
                  due: list[_Pending]) -> Iterator[None]:
        """The perturbed forward at theta_t = stored + the ``due`` updates, none of them stored: each use of a
        parameter lands them on a transient copy of it (of its elements in a block's span), one sweep each as
        landing them step by step would (the rule's state advanced on a scratch copy), and makes its K copies from
        that; the stored value is only read."""
        updates = [self._updates(u) for u in due]

        def theta_t(p: torch.nn.Parameter, name: str, span: tuple[int, int] | None) -> list[torch.Tensor]:
            whole = whole_param_shard(p, name)
            shard = whole if span is None else whole.narrow(*span)
            current = ParamShard(p, name, shard.stream, shard.flat.clone(), shard.offset, shard.shape)
            scratch = {k: v.clone() for k, v in self._state_for(whole).items()}
            for update in (u[group_of[p]] for u in updates):
                if update is not None:
                    sweep_shard(current, update=update, state=scratch, kernel_mode=self.kernel)
            return perturbed_copies(current, groups, self.kernel)

        def land(p: torch.nn.Parameter, name: str) -> None:  # nothing is stored: every copy lands them itself
            del p, name

        assert self.model is not None and not self._windows  # LOZO holds its updates in windows instead
        with perturbed_forward(self.model, names, groups, self.kernel, theta_t, land):
            yield

    @contextlib.contextmanager
    def landing(self) -> Iterator[None]:
        """:meth:`flush` inside the forward run within: with ``perturb='in_forward'`` and an update that can
        land there (:meth:`_lands_in_forward`), each parameter gets the pending update at its first use in
        that forward, in the pass that reads it anyway, instead of in a sweep of its own (one read and
        write of the parameters fewer); otherwise (and where LOZO's windows are open: their held updates are
        folded) a flush on entry. The forward itself runs unperturbed,
        autograd on or off (a hybrid step's backprop pass, :class:`~zo_scale.train.hybrid.HybridOptimizer`)."""
        pending, self._pending = self._pending, None
        if self.perturb != "in_forward" or not self._lands_in_forward(pending) or self._windows:
            self._pending = pending
            self.flush()
            yield
            return
        with self._perturbed([[]], pending):
            yield

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """The model at theta_t for the forwards run within (an evaluation, greedy decoding), autograd off, with
        LOZO's open windows read through their correction as the step's forward reads them, not folded: an
        evaluation leaves the stored matrices, and so the run's trajectory and seed log, as they were. The
        pending update lands at each parameter's first use (:meth:`landing`). Without open windows, a flush on
        entry."""
        if not self._windows:
            self.flush()
            yield
            return
        pending, self._pending = self._pending, None
        if pending is not None and not self._lands_in_forward(pending):
            self._sweep(pending.restore, pending, skip=pending.held)
            pending = None
        with self._perturbed([[]], pending):
            yield

    def _forward_gradients(self, closure: Callable[[], Any] | None, directions: list[Direction]) -> list[float]:
        """[L(theta) per direction..., grad L . z_i per direction...] by forward-mode AD (zeros in replay)."""
        if closure is None:
            return [0.0] * (2 * len(directions))
        if self.model is None:
            raise ValueError("estimator='jvp' needs model=<the module the closure calls>")
        names = {p: n for n, p in self.model.named_parameters()}
        shards = self.local_shards()
        losses, derivatives = [], []
        for d in directions:
            tangents = {}
            for s in shards:
                if s.flat.numel() != s.full_numel:
                    raise ValueError("estimator='jvp' needs whole (unsharded) parameters")
                z = d.z(s, 0, s.full_numel)
                tangents[names[s.param]] = (torch.zeros_like(s.param) if z is None else z.view_as(s.param))
            loss, derivative = loss_and_directional_derivative(self.model, closure, tangents)
            losses.append(loss)
            derivatives.append(derivative)
        return losses + derivatives

    def _reduce(self, losses: list[float]) -> list[float]:
        if self.loss_reduce is None:
            return losses
        return self.loss_reduce(torch.tensor(losses, dtype=torch.float64)).tolist()

    def _conservative(self, restore: Moves, weights: Moves, lr: float, loss_theta: float,
                      closure: Callable[..., Any] | None, evaluate: Callable[[], float],
                      replay: StepRecord | None) -> int:
        """ZO-SGD-Cons: evaluate theta - lr g_hat and theta + lr g_hat, keep the best of those and theta.

        In place the weights walk to each trial point for a forward there; with ``perturb='in_forward'``
        one ``closure(2)`` evaluates both as row groups and theta stays put until the move chosen.
        Returns the multiple k of the SGD step taken: theta <- theta - k lr g_hat, k in {1, 0, -1}.
        """
        down = [(d, -lr * w) for d, w in weights]
        if self.perturb == "in_forward":
            loss_down, loss_up = self._stacked_losses(closure, [down, [(d, -c) for d, c in down]])
            at = 0  # where theta sits, as a multiple of the step
        else:
            self._sweep(restore, after=down)  # theta - lr g_hat
            loss_down = evaluate()
            self._sweep(after=[(d, -2 * c) for d, c in down])  # theta + lr g_hat
            loss_up = evaluate()
            at = -1
        if replay is not None:
            k = replay.conservative
        else:
            loss_down, loss_up = self._reduce([loss_down, loss_up])
            candidates = {1: loss_down, 0: loss_theta, -1: loss_up}
            k = min(candidates, key=lambda m: candidates[m] if math.isfinite(candidates[m]) else math.inf)
        if k != at:
            self._sweep(after=[(d, (k - at) * c) for d, c in down])
        return k

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus the ZO counters. Flushes a pending lazy update first."""
        self.flush()
        out = super().state_dict()
        out["zo"] = {"step_count": self.step_count, "skipped_steps": self.skipped_steps, "seed": self.seed,
                     "sampler": self.sampler.state_dict()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore groups, counters and buffers; buffers keep their saved (fp32) dtype.

        A buffer with elements goes where this optimizer's shard of its parameter lives (``shard_spans``),
        0-dim ones (step counts) to the CPU, as fresh state is made: under ZeRO-3 offload the parameter
        itself is a placeholder on the accelerator while its partition sits in CPU memory.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups, strict=True)
        ):
            raise ValueError("optimizer state_dict does not match these param groups (count or sizes differ)")
        self.state.clear()
        for index, buffers in state_dict["state"].items():
            span = self.shard_spans[int(index)]
            self.state[span.param] = {k: v.to(device=span.device if v.dim() else "cpu")
                                      if isinstance(v, torch.Tensor) else v for k, v in buffers.items()}
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        zo = state_dict["zo"]
        if zo["seed"] != self.seed:
            raise ValueError(f"checkpoint was written with seed {zo['seed']}, this optimizer has seed {self.seed}")
        self.step_count, self.skipped_steps = zo["step_count"], zo["skipped_steps"]
        self.sampler.load_state_dict(zo.get("sampler", {}))
        self._pending = None
        self._unstored = []
        self._windows = PendingWindows()
        self._folded = self._holds  # the saved weights had their windows folded: so had the run that wrote them
        self._offsets = {}
