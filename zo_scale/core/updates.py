r"""Update rules: how a ZO gradient estimate moves the parameters.

The estimate is never a dense tensor: it is :math:`\hat g = \sum_i w_i z_i` with scalars
:math:`w_i` (the projected gradients divided by q) and directions :math:`z_i` regenerated from seeds.
A rule turns :math:`\hat g` into a step direction u, elementwise, and the sweep applies

.. math:: \theta \leftarrow \theta - \eta\,(u + \lambda \theta)

(:math:`\eta` = ``lr``, :math:`\lambda` = ``weight_decay``, decoupled, matrices only; for ZO-SGD this
is MeZO's own expression). A rule sees one chunk of one parameter, or a whole shard inside one
compiled kernel (:mod:`zo_scale.core.kernel`), with the matching slices of its state; it is written
as pure tensor expressions in fp32 so both see the same operations:

- :class:`SGD` (ZO-SGD, MeZO): :math:`u = \hat g`
- :class:`Sign` (ZO-SGD-Sign): :math:`u = \mathrm{sign}(\hat g)`
- :class:`SignMomentum` (M-SignSGD): :math:`m \leftarrow \beta m + (1-\beta)\hat g,\ u = \mathrm{sign}(m)`
- :class:`Momentum` (ZO-SGD-MMT): :math:`m \leftarrow \beta m + \hat g,\ u = m`
- :class:`LozoMomentum` (LOZO-M): :math:`m \leftarrow \beta m + (1-\beta)\hat g`, kept low-rank
- :class:`DiagonalHessian` (HiZOO): a diagonal Hessian from one more forward, :math:`u = H^{-1/2} z\,g` (see the class)
- :class:`AcceleratedDirectional` (ARDD): linear coupling of a gradient step and a mirror step (see the class)
- :class:`Adam` (ZO-Adam): :math:`m \leftarrow \beta_1 m + (1-\beta_1)\hat g,\
  v \leftarrow \beta_2 v + (1-\beta_2)\hat g^2,\
  u = \hat m / (\sqrt{\hat v} + \epsilon_{adam})` with bias-corrected
  :math:`\hat m, \hat v`; its step count is kept per parameter, as torch.optim.Adam does.

State buffers are fp32 whatever the parameter dtype, and are created only for the parameters the
optimizer trains. ``m`` starts at zero (so the first momentum step equals an SGD step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from zo_scale.core.directions import Direction, FactorDirection, LowRankDirection, PreconditionedDirection, sqrt64
from zo_scale.core.shards import ParamShard


def estimate(zs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """g_hat = sum_i w_i z_i, summed in this order on every path (eager chunks and the compiled kernel)."""
    g = zs[0] * weights[0]
    for z, w in zip(zs[1:], weights[1:], strict=True):
        g = g + z * w
    return g


class UpdateRule:
    """``direction`` maps g_hat to the step direction u; ``buffers`` names its per-element state."""

    buffers: tuple[str, ...] = ()

    def bind(self, shards: Sequence[ParamShard]) -> None:
        """Sees every local shard once, before the first step (the dimension, for a rule whose constants need it)."""
        del shards

    def init_state(self, shard: ParamShard) -> dict[str, torch.Tensor]:
        """Fresh state for one shard: a 0-dim step count and an fp32 zero buffer per name in ``buffers``."""
        state = {"step": torch.tensor(0.0)}
        for b in self.buffers:
            state[b] = torch.zeros(shard.flat.numel(), dtype=torch.float32, device=shard.flat.device)
        return state

    def prepare(
        self, shard: ParamShard, weights: Sequence[tuple[Direction, float]], state: dict[str, torch.Tensor]
    ) -> list[tuple[Direction, float]] | None:
        """Optionally state this shard's u as a sum of weighted directions of the rule's own (then the
        sweep applies u = sum_k c_k z_k instead of ``direction``). Called once per shard and step."""
        del shard, weights, state
        return None

    def scalars(self, step: int, measured: Sequence[float] = ()) -> tuple[float, ...]:
        """The step-dependent numbers ``direction`` needs (e.g. Adam's bias corrections), for ``step`` >= 1;
        ``measured``: what the estimator measured beyond the projected gradients (HiZOO's curvatures)."""
        del step, measured
        return ()

    def perturbations(self, directions: list[Direction],
                      state_of: Callable[[ParamShard], dict[str, torch.Tensor]]) -> list[Direction]:
        """The directions the step perturbs along, from the sampler's (HiZOO scales them by its state)."""
        del state_of
        return directions

    def step_direction(
        self, zs: Sequence[torch.Tensor], weights: Sequence[float], state: dict[str, torch.Tensor],
        scalars: Sequence[float],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """u from the update's directions (fp32 z_i of one chunk or shard) and weights w_i: by default
        ``direction`` of g_hat (:func:`estimate`)."""
        return self.direction(estimate(zs, weights), state, scalars)

    def direction(
        self, g: torch.Tensor, state: dict[str, torch.Tensor], scalars: Sequence[float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """u for the fp32 estimate ``g`` (one chunk or shard), and the new values of the state buffers."""
        raise NotImplementedError


@dataclass
class SGD(UpdateRule):
    def direction(
        self, g: torch.Tensor, state: dict[str, torch.Tensor], scalars: Sequence[float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return g, {}


@dataclass
class Sign(UpdateRule):
    def direction(
        self, g: torch.Tensor, state: dict[str, torch.Tensor], scalars: Sequence[float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.sign(g), {}


@dataclass
class Momentum(UpdateRule):
    beta: float = 0.9
    buffers = ("momentum",)

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"momentum beta must be in [0, 1), got {self.beta}")

    def direction(
        self, g: torch.Tensor, state: dict[str, torch.Tensor], scalars: Sequence[float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = state["momentum"] * self.beta + g
        return m, {"momentum": m}


@dataclass
class SignMomentum(Momentum):
    r"""M-SignSGD (signum): the sign of an average,
    :math:`m \leftarrow \beta m + (1 - \beta)\hat g,\ u = \mathrm{sign}(m)`.

    For heavy-tailed gradient noise (Kornilov et al., arXiv 2502.07923, the sign methods the MIPT study
    cites): the average shrinks the noise's tails and the sign bounds every step at lr per element,
    where ZO-SGD-Sign (:class:`Sign`) takes the sign of one noisy estimate. ``beta`` is a tuned constant
    here (the paper derives 1 - beta from the horizon and the noise's moments); m starts at zero.
    """

    def direction(
        self, g: torch.Tensor, state: dict[str, torch.Tensor], scalars: Sequence[float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = state["momentum"] * self.beta + g * (1 - self.beta)
        return torch.sign(m), {"momentum": m}


@dataclass
class Adam(UpdateRule):
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    buffers = ("exp_avg", "exp_avg_sq")

    def __post_init__(self) -> None:
        for name, b in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Adam {name} must be in [0, 1), got {b}")
        if self.eps <= 0:
            raise ValueError(f"Adam eps must be > 0, got {self.eps}")

    def scalars(self, step: int, measured: Sequence[float] = ()) -> tuple[float, ...]:
        # bias corrections as reciprocals: inductor turns a division by a scalar into this product
        # anyway, so the eager reference multiplies too
        return (1 / (1 - self.beta1**step), 1 / (1 - self.beta2**step))

    def direction(
        self, g: torch.Tensor, state: dict[str, torch.Tensor], scalars: Sequence[float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        correction1, correction2 = scalars
        m = state["exp_avg"] * self.beta1 + g * (1 - self.beta1)
        v = state["exp_avg_sq"] * self.beta2 + g * g * (1 - self.beta2)
        # sqrt through fp64: correctly rounded on every path (eager fp32 sqrt on CPU is not, inductor's is)
        root = sqrt64(v * correction2)
        u = (m * correction1) / (root + self.eps)
        return u, {"exp_avg": m, "exp_avg_sq": v}


@dataclass
class LozoMomentum(Momentum):
    r"""LOZO-M (Chen et al., ICLR 2025, arXiv 2410.07698): momentum as an average, kept in the m x r factor
    of the low-rank estimate (needs ``LowRankSampler``).

    The estimate on a 2-D weight is :math:`\hat g = N_g V^T` with :math:`N_g = \frac{1}{r}\sum_i w_i U_i`
    (w_i = g_i / q), so the momentum stays in that form:

    .. math:: N \leftarrow \beta N + (1 - \beta) N_g, \qquad \theta \leftarrow \theta - \eta N V^T

    m x r floats instead of m x n. When V is redrawn (every nu steps), N is first carried into the new
    basis, :math:`N \leftarrow N V_{old}^T V_{new} / n` (the paper's projection; E[V^T V] = n I). Other
    parameters (1-D, dense z) keep :math:`m \leftarrow \beta m + (1 - \beta) \hat g`. As in LOZO's code,
    the first step starts the average at the first estimate (N = N_g), not at zero.
    """

    buffers = ("momentum",)

    def scalars(self, step: int, measured: Sequence[float] = ()) -> tuple[float, ...]:
        return (0.0, 1.0) if step == 1 else (self.beta, 1.0 - self.beta)

    def direction(
        self, g: torch.Tensor, state: dict[str, torch.Tensor], scalars: Sequence[float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        decay, gain = scalars
        m = state["momentum"] * decay + g * gain
        return m, {"momentum": m}

    def init_state(self, shard: ParamShard) -> dict[str, torch.Tensor]:
        if len(shard.shape) != 2:
            return super().init_state(shard)
        return {"step": torch.tensor(0.0), "v_seed": torch.tensor(-1, dtype=torch.int64),
                "factor": torch.zeros(shard.shape[0], 0, device=shard.flat.device)}

    def prepare(
        self, shard: ParamShard, weights: Sequence[tuple[Direction, float]], state: dict[str, torch.Tensor]
    ) -> list[tuple[Direction, float]] | None:
        if len(shard.shape) != 2:
            return None
        weights = [(d.on(shard), w) for d, w in weights]  # e.g. an update that leaves held matrices out
        weights = [(d, w) for d, w in weights if d is not None]
        if not weights:
            return []
        directions = [d for d, _ in weights]
        if not all(isinstance(d, LowRankDirection) for d in directions):
            raise TypeError("LOZO-M needs low-rank directions: use sampler=LowRankSampler(...)")
        current: LowRankDirection = directions[0]  # type: ignore[assignment]
        m, rank = shard.shape[0], current.rank
        decay, gain = self.scalars(int(state["step"]) + 1)
        factor = state["factor"]
        if factor.shape[1] != rank:
            factor = torch.zeros(m, rank, dtype=torch.float32, device=shard.flat.device)
        elif int(state["v_seed"]) != current.v_seed:
            old_v = LowRankDirection(0, int(state["v_seed"]), rank).v(shard)
            factor = factor @ (old_v.T @ current.v(shard)) / shard.shape[1]
        factor.mul_(decay)
        for d, w in weights:  # w carries the 1/r (the sweep applied estimate_scale)
            factor.add_(d.u_rows(shard, 0, m), alpha=w * gain)  # type: ignore[attr-defined]
        state["factor"], state["v_seed"] = factor, torch.tensor(current.v_seed)
        return [(FactorDirection(factor, current.v(shard), shard.stream), 1.0)]


@dataclass
class DiagonalHessian(UpdateRule):
    r"""HiZOO (Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order
    Optimizer", ICLR 2025, arXiv 2402.15173): a diagonal Hessian H per element (``hessian``, H_0 = 1) from
    the one extra forward at theta, and perturbations and steps scaled by :math:`H^{-1/2}`. With the
    'hizoo' estimator (:class:`~zo_scale.core.estimators.CentralCurvature`), for z ~ N(0, I):

    .. math::
        L_\pm = L(\theta \pm \epsilon H^{-1/2} z), \qquad
        c = \frac{|L_+ + L_- - 2 L(\theta)|}{2 \epsilon^2}, \\
        H \leftarrow (1 - \alpha) H + \alpha\, c\, H z^2, \qquad
        \theta \leftarrow \theta - \eta\, \frac{L_+ - L_-}{2 \epsilon} H^{-1/2} z

    with the updated H in the step and the previous one in the perturbation, as in its code (the paper
    writes the H update with the outer product :math:`\Sigma^{-1/2} z z^T \Sigma^{-1/2}`; the code, and
    this, keep its diagonal). With q queries, the mean of the q terms. H is fp32 here (the code keeps it
    in the model's dtype). 3 forwards a step. ``alpha``: the code's default 0 is MeZO; its examples
    use 1e-8 to 1e-6 for OPT-scale models.
    """

    alpha: float = 1e-6
    buffers = ("hessian",)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"HiZOO alpha (the Hessian's smoothing) must be in [0, 1), got {self.alpha}")

    def init_state(self, shard: ParamShard) -> dict[str, torch.Tensor]:
        state = super().init_state(shard)
        state["hessian"].fill_(1.0)
        return state

    def scalars(self, step: int, measured: Sequence[float] = ()) -> tuple[float, ...]:
        if not measured:
            raise ValueError("the HiZOO rule needs the loss's curvature along each direction: estimator='hizoo'")
        return (self.alpha, *(c / len(measured) for c in measured))

    def perturbations(self, directions: list[Direction],
                      state_of: Callable[[ParamShard], dict[str, torch.Tensor]]) -> list[Direction]:
        return [PreconditionedDirection(d, lambda shard: state_of(shard)["hessian"]) for d in directions]

    def step_direction(
        self, zs: Sequence[torch.Tensor], weights: Sequence[float], state: dict[str, torch.Tensor],
        scalars: Sequence[float],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # zs are the perturbations H^{-1/2} z, so H z^2 = H^2 zs^2 and H_new^{-1/2} z = zs sqrt(H / H_new)
        alpha, curvatures = scalars[0], scalars[1:]
        h = state["hessian"]
        seen = curvatures[0] * zs[0] * zs[0]
        for c, z in zip(curvatures[1:], zs[1:], strict=True):
            seen = seen + c * z * z
        h_new = h * (1 - alpha) + alpha * seen * h * h
        return estimate(zs, weights) * (sqrt64(h) / sqrt64(h_new)), {"hessian": h_new}


@dataclass
class AcceleratedDirectional(UpdateRule):
    r"""ARDD, the accelerated random directional derivative method (Dvurechensky, Gorbunov, Gasnikov, "An
    accelerated directional derivative method for smooth stochastic convex optimization", EJOR 2021,
    arXiv 1804.02394), Euclidean prox. The paper's three sequences, with e uniform on the unit sphere and
    t = <grad f(x_{k+1}), e> (here from the finite difference):

    .. math::
        x_{k+1} = \tau_k w_k + (1 - \tau_k) y_k, \qquad
        y_{k+1} = x_{k+1} - \tfrac{1}{2L} t e, \qquad
        w_{k+1} = w_k - \alpha_{k+1} n t e, \\
        \alpha_{k+1} = \frac{k + 2}{96 n^2 L}, \qquad \tau_k = \frac{2}{k + 2}, \qquad x_0 = y_0 = w_0.

    The loss is evaluated at x (the stored weights). With z = sqrt(n) e the estimate g_hat = g z is
    n t e, so with lr = 1/(2 L n) the gradient step is lr g_hat and the mirror step alpha g_hat =
    a lr g_hat, a = (k + 2) / (48 n). y is never stored: only v = (w - x) / lr, per element (4 bytes),
    zero at the start, and one ZO step is

    .. math::
        \theta \leftarrow \theta - \eta\,u, \quad u = -\tau v + (\tau a + 1 - \tau)\,\hat g, \qquad
        v \leftarrow (1 - \tau)\,(v + (1 - a)\,\hat g), \qquad \tau = \tau_{k+1} = \frac{2}{k + 3}

    (substitute y_{k+1} and w_{k+1} into x_{k+2}), k the parameter's step count (per parameter, as Adam's).

    Where this departs from the paper: z is the sampler's (Gaussian or Rademacher: sqrt(n) e only on
    average or in norm, not uniform on the sphere); the weights are x_k, the paper returns y_N
    (one more gradient step from x_N); v is kept in units of lr, so an lr schedule also rescales it.
    Weight decay (decoupled) shrinks x only, not w. ``dimension``: the paper's n, by default the number of
    trained elements (:meth:`bind`). With it, at n = 1e8 the mirror step a lr is 4e-10 (k = 0) to 2e-7
    (k = 1000) of the gradient step: w stays at the start and the coupling draws x back toward it by
    tau_k (2/3, 1/2, 2/5, ...), a fading anchor; a smaller ``dimension`` lets the mirror move.
    """

    dimension: int | None = None
    n: int | None = None  # the n in use: ``dimension``, or the trained elements once bound
    buffers = ("mirror_offset",)

    def __post_init__(self) -> None:
        if self.dimension is not None and self.dimension < 1:
            raise ValueError(f"ARDD's dimension n must be >= 1, got {self.dimension}")

    def bind(self, shards: Sequence[ParamShard]) -> None:
        self.n = self.dimension or sum(shard.full_numel for shard in shards)

    def scalars(self, step: int, measured: Sequence[float] = ()) -> tuple[float, ...]:
        if self.n is None:
            raise RuntimeError("AcceleratedDirectional.bind(shards) must run before the first step")
        k = step - 1  # the paper's k: this update makes y_{k+1}, w_{k+1} and x_{k+2}
        return 2.0 / (k + 3), (k + 2) / (48.0 * self.n)

    def direction(
        self, g: torch.Tensor, state: dict[str, torch.Tensor], scalars: Sequence[float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tau, a = scalars
        v = state["mirror_offset"]
        u = g * (tau * a + 1 - tau) - v * tau
        return u, {"mirror_offset": (v + g * (1 - a)) * (1 - tau)}


RULES = {"sgd": SGD, "sign": Sign, "sign-momentum": SignMomentum, "momentum": Momentum, "adam": Adam,
         "lozo-m": LozoMomentum, "hizoo": DiagonalHessian, "ardd": AcceleratedDirectional}


def make_rule(name: str, **kwargs: float) -> UpdateRule:
    """An update rule by name (a key of ``RULES``) with its hyperparameters."""
    try:
        cls = RULES[name]
    except KeyError:
        raise ValueError(f"unknown update rule {name!r}; choose one of {sorted(RULES)}") from None
    return cls(**kwargs)
