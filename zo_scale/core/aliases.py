"""The named ZO optimizers of the literature, each a ZOOptimizer with one rule and one sampler.

=================  ====================================  =====================================
name               rule                                  sampler
=================  ====================================  =====================================
ZOSGD              SGD (Momentum if momentum > 0)        dense normal (MeZO)
ZOSignSGD          Sign (SignMomentum if momentum > 0)   dense normal
ZOAdam             Adam                                  dense normal
ZOConservative     SGD, conservative=True                dense normal
LOZO               SGD                                   low-rank U V^T, V lazy
LOZOM              LozoMomentum (momentum in factor)     low-rank U V^T, V lazy
SparseZO           SGD                                   sparse Bernoulli mask
SparseMeZO         SGD, perturb='in_forward'             mask of the small weights, |theta| <= h
BlockZO            SGD                                   one block (layer) per query
LeZO               SGD                                   a random subset of layers per step
FZOO               SGD, estimator 'fzoo' (N one-sided)   dense Rademacher
HiZOO              DiagonalHessian, estimator 'hizoo'    dense normal, scaled by H^-1/2
ARDD               AcceleratedDirectional                dense normal
=================  ====================================  =====================================

Any other combination is ``ZOOptimizer(params, rule=..., sampler=...)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from zo_scale.core.directions import (
    BlockSampler,
    DenseSampler,
    LayerSubsetSampler,
    LowRankSampler,
    MagnitudeSampler,
    ScaledSampler,
    SparseSampler,
)
from zo_scale.core.optimizer import ZOOptimizer
from zo_scale.core.updates import (
    SGD,
    AcceleratedDirectional,
    Adam,
    DiagonalHessian,
    LozoMomentum,
    Momentum,
    Sign,
    SignMomentum,
)


class ZOSGD(ZOOptimizer):
    """ZO-SGD (MeZO); with ``momentum`` > 0, ZO-SGD-MMT (m <- beta m + g_hat, theta <- theta - lr m)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, momentum: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(params, lr, eps, rule=Momentum(momentum) if momentum else SGD(), **kwargs)


class ZOSignSGD(ZOOptimizer):
    """ZO-SGD-Sign: theta <- theta - lr sign(g_hat); with ``momentum`` > 0, M-SignSGD (the sign of an average)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, momentum: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(params, lr, eps, rule=SignMomentum(momentum) if momentum else Sign(), **kwargs)


class ZOAdam(ZOOptimizer):
    """ZO-Adam: Adam's moments over g_hat; buffers only for the parameters given."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, eps: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8, **kwargs: Any) -> None:
        super().__init__(params, lr, eps, rule=Adam(betas[0], betas[1], adam_eps), **kwargs)


class ZOConservative(ZOOptimizer):
    """ZO-SGD-Cons: keep the best of theta, theta - lr g_hat, theta + lr g_hat (2 extra forwards; with
    perturb='in_forward' one more forward over the batch stacked twice)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(params, lr, eps, rule=SGD(), conservative=True, **kwargs)


class LOZO(ZOOptimizer):
    """LOZO: low-rank perturbations U V^T (rank r) on matrices, V redrawn every ``nu`` steps."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, rank: int = 2, nu: int = 50,
                 **kwargs: Any) -> None:
        super().__init__(params, lr, eps, sampler=LowRankSampler(rank, nu), **kwargs)


class LOZOM(ZOOptimizer):
    """LOZO-M: LOZO with momentum kept in the m x r factor (see :class:`~zo_scale.core.updates.LozoMomentum`)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, rank: int = 2, nu: int = 50,
                 beta: float = 0.9, **kwargs: Any) -> None:
        super().__init__(params, lr, eps, rule=LozoMomentum(beta), sampler=LowRankSampler(rank, nu), **kwargs)


class SparseZO(ZOOptimizer):
    """Sparse ZO: perturb each element with probability 1 - sparsity, mask redrawn every ``resample_every`` steps."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, sparsity: float = 0.75,
                 resample_every: int = 1, **kwargs: Any) -> None:
        super().__init__(params, lr, eps, sampler=SparseSampler(sparsity, resample_every), **kwargs)


class SparseMeZO(ZOOptimizer):
    """Sparse-MeZO: perturb and update only the weights with |theta| <= h, h the (1 - sparsity) quantile of each
    parameter's |theta| at the first step (:class:`~zo_scale.core.directions.MagnitudeSampler`). The mask
    reads theta, so the points live inside the forward: ``closure(K)`` over K stacked row groups, and
    ``model`` is the module it calls."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, sparsity: float = 0.75,
                 *, model: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(params, lr, eps, sampler=MagnitudeSampler(sparsity), model=model, perturb="in_forward",
                         **kwargs)


class BlockZO(ZOOptimizer):
    """Block-wise ZO: each query perturbs one transformer layer (or the non-layer rest), cycling."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(params, lr, eps, sampler=BlockSampler(), **kwargs)


class LeZO(ZOOptimizer):
    """LeZO: each step perturbs a random ``layers`` fraction of the transformer layers and every parameter
    outside them (see :class:`~zo_scale.core.directions.LayerSubsetSampler`)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, layers: float = 0.25,
                 **kwargs: Any) -> None:
        super().__init__(params, lr, eps, sampler=LayerSubsetSampler(layers), **kwargs)


class FZOO(ZOOptimizer):
    """FZOO: n one-sided Rademacher perturbations a step, normalized by the std of their losses
    (:class:`~zo_scale.core.estimators.NormalizedForward`); n + 1 forwards a step. Defaults are its code's."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-5, eps: float = 1e-3, n: int = 8,
                 **kwargs: Any) -> None:
        super().__init__(params, lr, eps, sampler=DenseSampler("rademacher"), estimator="fzoo", queries=n, **kwargs)


class HiZOO(ZOOptimizer):
    """HiZOO: ZO-SGD preconditioned by a diagonal Hessian estimated from one more forward at theta, 3 forwards
    a step (see :class:`~zo_scale.core.updates.DiagonalHessian`)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, alpha: float = 1e-6,
                 **kwargs: Any) -> None:
        super().__init__(params, lr, eps, rule=DiagonalHessian(alpha), estimator="hizoo", **kwargs)


class ARDD(ZOOptimizer):
    """ARDD: the accelerated random directional derivative method, a gradient step and a mirror step
    linearly coupled (:class:`~zo_scale.core.updates.AcceleratedDirectional`); ``lr`` is its 1/(2 L n).
    ``dimension``: the paper's n (None: the number of trained elements)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, dimension: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(params, lr, eps, rule=AcceleratedDirectional(dimension), **kwargs)


class ZOFineTuner(ZOOptimizer):
    """ZO Fine-tuner: ZO-SGD along z_p = c s_p u_p, one learned scale s_p per parameter tensor
    (:class:`~zo_scale.core.directions.ScaledSampler`; the scales from
    :class:`~zo_scale.core.learned_scales.ScaleLearner`, by parameter name)."""

    def __init__(self, params: Iterable[Any], scales: dict[str, float], lr: float = 1e-6, eps: float = 1e-3,
                 **kwargs: Any) -> None:
        super().__init__(params, lr, eps, sampler=ScaledSampler(scales), **kwargs)
