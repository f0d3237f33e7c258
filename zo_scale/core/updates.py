r"""Update rules: how a ZO gradient estimate moves the parameters.

The estimate is never a dense tensor: it is :math:`\hat g = \sum_i w_i z_i` with scalars
:math:`w_i` (the projected gradients divided by q) and directions :math:`z_i` regenerated from seeds.
A rule sees one chunk of one parameter at a time, with the matching chunks of its state, so the
optimizer can fuse it with the restore and perturbation passes (:mod:`zo_scale.core.sweep`).

Symbols: :math:`\eta` = ``lr``, :math:`\lambda` = ``weight_decay`` (decoupled; matrices only).
Every rule first applies :math:`\theta \leftarrow \theta (1 - \eta\lambda)`, then:

- :class:`SGD` (ZO-SGD, MeZO): :math:`\theta \leftarrow \theta - \eta \hat g`
- :class:`Sign` (ZO-SGD-Sign): :math:`\theta \leftarrow \theta - \eta\,\mathrm{sign}(\hat g)`
- :class:`Momentum` (ZO-SGD-MMT): :math:`m \leftarrow \beta m + \hat g,\ \theta \leftarrow \theta - \eta m`
- :class:`Adam` (ZO-Adam): :math:`m \leftarrow \beta_1 m + (1-\beta_1)\hat g,\
  v \leftarrow \beta_2 v + (1-\beta_2)\hat g^2,\
  \theta \leftarrow \theta - \eta\,\hat m / (\sqrt{\hat v} + \epsilon_{adam})` with bias-corrected
  :math:`\hat m, \hat v`; its step count is kept per parameter, as torch.optim.Adam does.

State buffers are fp32 whatever the parameter dtype, and are created only for the parameters the
optimizer trains. ``m`` starts at zero (so the first momentum step equals an SGD step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

WeightedZ = Sequence[tuple[torch.Tensor, float]]  # [(z_i chunk, w_i)]: g_hat = sum_i w_i * z_i


def _ghat(zs: WeightedZ) -> torch.Tensor:
    """sum_i w_i z_i in fp32, shape of one chunk."""
    z0, w0 = zs[0]
    out = z0.float() * w0
    for z, w in zs[1:]:
        out.add_(z.float(), alpha=w)
    return out


def _decay_(theta: torch.Tensor, lr: float, weight_decay: float) -> None:
    if weight_decay:
        theta.mul_(1.0 - lr * weight_decay)


class UpdateRule:
    """``apply_`` updates one chunk of a parameter in place; ``buffers`` names its per-element state."""

    buffers: tuple[str, ...] = ()

    def apply_(
        self, theta: torch.Tensor, zs: WeightedZ, state: dict[str, torch.Tensor], lr: float, weight_decay: float,
        step: int,
    ) -> None:
        raise NotImplementedError


@dataclass
class SGD(UpdateRule):
    def apply_(
        self, theta: torch.Tensor, zs: WeightedZ, state: dict[str, torch.Tensor], lr: float, weight_decay: float,
        step: int,
    ) -> None:
        del state, step
        _decay_(theta, lr, weight_decay)
        for z, w in zs:  # theta -= lr * w_i * z_i, in the parameter dtype, as MeZO does
            theta.add_(z, alpha=-lr * w)


@dataclass
class Sign(UpdateRule):
    def apply_(
        self, theta: torch.Tensor, zs: WeightedZ, state: dict[str, torch.Tensor], lr: float, weight_decay: float,
        step: int,
    ) -> None:
        del state, step
        _decay_(theta, lr, weight_decay)
        theta.add_(_ghat(zs).sign_().to(theta.dtype), alpha=-lr)


@dataclass
class Momentum(UpdateRule):
    beta: float = 0.9
    buffers = ("momentum",)

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"momentum beta must be in [0, 1), got {self.beta}")

    def apply_(
        self, theta: torch.Tensor, zs: WeightedZ, state: dict[str, torch.Tensor], lr: float, weight_decay: float,
        step: int,
    ) -> None:
        del step
        m = state["momentum"]
        m.mul_(self.beta).add_(_ghat(zs))
        _decay_(theta, lr, weight_decay)
        theta.add_(m.to(theta.dtype), alpha=-lr)


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

    def apply_(
        self, theta: torch.Tensor, zs: WeightedZ, state: dict[str, torch.Tensor], lr: float, weight_decay: float,
        step: int,
    ) -> None:
        g = _ghat(zs)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        m_hat_scale = 1.0 / (1 - self.beta1**step)
        v_hat = v / (1 - self.beta2**step)
        _decay_(theta, lr, weight_decay)
        theta.add_((m * m_hat_scale / (v_hat.sqrt_() + self.eps)).to(theta.dtype), alpha=-lr)


RULES = {"sgd": SGD, "sign": Sign, "momentum": Momentum, "adam": Adam}


def make_rule(name: str, **kwargs: float) -> UpdateRule:
    """An update rule by name ('sgd', 'sign', 'momentum', 'adam') with its hyperparameters."""
    try:
        cls = RULES[name]
    except KeyError:
        raise ValueError(f"unknown update rule {name!r}; choose one of {sorted(RULES)}") from None
    return cls(**kwargs)
