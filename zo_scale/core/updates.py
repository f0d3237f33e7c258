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
- :class:`Momentum` (ZO-SGD-MMT): :math:`m \leftarrow \beta m + \hat g,\ u = m`
- :class:`Adam` (ZO-Adam): :math:`m \leftarrow \beta_1 m + (1-\beta_1)\hat g,\
  v \leftarrow \beta_2 v + (1-\beta_2)\hat g^2,\
  u = \hat m / (\sqrt{\hat v} + \epsilon_{adam})` with bias-corrected
  :math:`\hat m, \hat v`; its step count is kept per parameter, as torch.optim.Adam does.

State buffers are fp32 whatever the parameter dtype, and are created only for the parameters the
optimizer trains. ``m`` starts at zero (so the first momentum step equals an SGD step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zo_scale.core.directions import Direction, FactorDirection, LowRankDirection
from zo_scale.core.shards import ParamShard


class UpdateRule:
    """``direction`` maps g_hat to the step direction u; ``buffers`` names its per-element state."""

    buffers: tuple[str, ...] = ()

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

    def scalars(self, step: int) -> tuple[float, ...]:
        """The step-dependent numbers ``direction`` needs (e.g. Adam's bias corrections), for ``step`` >= 1."""
        del step
        return ()

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

    def scalars(self, step: int) -> tuple[float, ...]:
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
        root = torch.sqrt((v * correction2).double()).float()
        u = (m * correction1) / (root + self.eps)
        return u, {"exp_avg": m, "exp_avg_sq": v}


@dataclass
class LozoMomentum(Momentum):
    r"""LOZO-M: momentum kept in the m x r factor of the low-rank estimate (needs ``LowRankSampler``).

    With z_i = U_i V^T / sqrt(r), g_hat = (sum_i w_i U_i) V^T / sqrt(r), so for a 2-D weight the
    momentum stays in that form: :math:`M \leftarrow \beta M + \sum_i w_i U_i`,
    :math:`\theta \leftarrow \theta - \eta M V^T / \sqrt{r}`: m x r floats instead of m x n.
    When V is redrawn (every nu steps), M is carried into the new basis, M <- M V_old^T V_new / n,
    the least-squares fit of M V_old^T by M' V_new^T for V_new^T V_new ~ n I. Other parameters (1-D,
    dense z) use plain momentum.
    """

    buffers = ("momentum",)

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
        directions = [d for d, _ in weights]
        if not all(isinstance(d, LowRankDirection) for d in directions):
            raise TypeError("LOZO-M needs low-rank directions: use sampler=LowRankSampler(...)")
        current: LowRankDirection = directions[0]  # type: ignore[assignment]
        m, rank = shard.shape[0], current.rank
        factor = state["factor"]
        if factor.shape[1] != rank:
            factor = torch.zeros(m, rank, dtype=torch.float32, device=shard.flat.device)
        elif int(state["v_seed"]) != current.v_seed:
            old_v = LowRankDirection(0, int(state["v_seed"]), rank).v(shard)
            factor = factor @ (old_v.T @ current.v(shard)) / shard.shape[1]
        factor.mul_(self.beta)
        for d, w in weights:
            factor.add_(d.u_rows(shard, 0, m), alpha=w)  # type: ignore[attr-defined]
        state["factor"], state["v_seed"] = factor, torch.tensor(current.v_seed)
        return [(FactorDirection(factor, current.v(shard), shard.stream), 1.0)]


RULES = {"sgd": SGD, "sign": Sign, "momentum": Momentum, "adam": Adam, "lozo-m": LozoMomentum}


def make_rule(name: str, **kwargs: float) -> UpdateRule:
    """An update rule by name ('sgd', 'sign', 'momentum', 'adam') with its hyperparameters."""
    try:
        cls = RULES[name]
    except KeyError:
        raise ValueError(f"unknown update rule {name!r}; choose one of {sorted(RULES)}") from None
    return cls(**kwargs)
