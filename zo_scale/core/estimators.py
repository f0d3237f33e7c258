r"""Estimators: where a step evaluates the loss along its q directions, and how those losses become the
projected gradients :math:`g_i` of the estimate :math:`\hat g = \frac{1}{q} \sum_i c_i g_i z_i`.

The samplers of :mod:`zo_scale.core.directions` say *what* to perturb; an estimator says *how*:

- :class:`Central` (two-point, MeZO):
  :math:`g_i = \frac{L(\theta + \epsilon z_i) - L(\theta - \epsilon z_i)}{2\epsilon}`; 2 forwards a query.
  The loss reported at theta is the mean of the pairs (= L(theta) + O(eps^2)).
- :class:`CentralCurvature` ('hizoo'): central, plus L(theta) for the curvature along each z_i (HiZOO).
- :class:`EvolutionStrategies` ('es'): central over a population of q antithetic pairs, each member's loss
  replaced by its shaped fitness over the population (z-scored, or centred ranks) first.
- :class:`Unbiased` ('unbiased'): a randomly truncated telescoping series of central differences at
  radii eps rho^n: no O(eps^2) bias, 4 or 6 forwards a query (see the class).
- :class:`Forward` (one-sided): :math:`g_i = \frac{L(\theta + \epsilon z_i) - L(\theta)}{\epsilon}`; 1 forward a
  query and 1 at theta.
- :class:`NormalizedForward` ('fzoo': FZOO's estimator, Dang et al. 2025, arXiv 2506.09034): one-sided,
  every g_i divided by the spread of the q perturbed losses,
  :math:`g_i = \frac{L(\theta + \epsilon z_i) - L(\theta)}{\sigma}`, :math:`\sigma` their standard
  deviation (see the class).
- :class:`ForwardGradient` ('jvp'): :math:`g_i = \nabla L \cdot z_i` exactly, by forward-mode AD
  (:mod:`zo_scale.core.forward_grad`); evaluates no perturbed point.

``values`` is what the step measured, in the order the optimizer evaluates: L(theta) first where
``at_theta``, then each direction's ``points`` (multiples of eps) in turn.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


class Estimator:
    """Points to evaluate per direction (in units of eps) and the projected gradients from their losses."""

    name: str = ""
    at_theta: bool = False  # L(theta) itself is evaluated, before the directions' points
    points: tuple[float, ...] = ()
    min_queries: int = 1

    def projected_grads(self, values: Sequence[float], eps: float, queries: int) -> list[float] | None:
        """g_1..g_q from the measured values; None where one is not finite (the step is skipped)."""
        raise NotImplementedError

    def loss_at_theta(self, values: Sequence[float], queries: int) -> float:
        """The step's estimate of L(theta), as logged."""
        return values[0] if self.at_theta else sum(values) / len(values)

    def measured(self, values: Sequence[float], eps: float, queries: int) -> list[float]:
        """What the update rule gets beyond the g_i (HiZOO: the curvature along each direction); none here."""
        del values, eps, queries
        return []

    def forwards(self, queries: int) -> int:
        """Forward passes a step takes (over one batch, or its row groups under perturb='in_forward'); the
        most a step can take where the number is drawn per step."""
        return int(self.at_theta) + len(self.points) * queries

    def for_step(self, seed: int) -> Estimator:
        """The estimator one step uses, drawn from ``seed`` where it is random (the unbiased estimator's
        truncation), else itself."""
        del seed
        return self


def _finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(x) for x in values)


@dataclass(frozen=True)
class Central(Estimator):
    name = "central"
    points = (1.0, -1.0)

    def projected_grads(self, values: Sequence[float], eps: float, queries: int) -> list[float] | None:
        if not _finite(values):
            return None
        return [(lp - lm) / (2 * eps) for lp, lm in zip(values[0::2], values[1::2], strict=True)]


@dataclass(frozen=True)
class CentralCurvature(Central):
    r"""'hizoo': central differences and L(theta) itself, 3 forwards a query: the g_i of :class:`Central`
    and, for HiZOO's Hessian (:class:`~zo_scale.core.updates.DiagonalHessian`), the loss's curvature along each
    direction, :math:`c_i = |L(\theta + \epsilon z_i) + L(\theta - \epsilon z_i) - 2 L(\theta)| / (2 \epsilon^2)`
    (= :math:`|z_i^T \nabla^2 L\, z_i| / 2` + O(eps^2) on a smooth loss)."""

    name = "hizoo"
    at_theta = True

    def projected_grads(self, values: Sequence[float], eps: float, queries: int) -> list[float] | None:
        return super().projected_grads(values[1:], eps, queries) if _finite(values) else None

    def measured(self, values: Sequence[float], eps: float, queries: int) -> list[float]:
        at = values[0]
        return [abs(lp + lm - 2 * at) / (2 * eps * eps) for lp, lm in zip(values[1::2], values[2::2], strict=True)]


FITNESS = ("zscore", "rank", "none")


def shaped(values: Sequence[float], fitness: str) -> list[float]:
    """Fitness shaping of a population's values: ``zscore`` (v - mean) / std (population std; all 0 where
    std is 0), ``rank`` centred ranks r / (n - 1) - 1/2 in [-1/2, 1/2] (tied values share their mean rank),
    ``none`` the values themselves."""
    n = len(values)
    if fitness == "none":
        return list(values)
    if fitness == "zscore":
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
        return [0.0] * n if std == 0.0 else [(v - mean) / std for v in values]
    if fitness != "rank":
        raise ValueError(f"unknown fitness shaping {fitness!r}; choose one of {FITNESS}")
    if n == 1:
        return [0.0]
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    start = 0
    while start < n:  # a run of ties [start, stop) shares the mean of its ranks
        stop = start
        while stop < n and values[order[stop]] == values[order[start]]:
            stop += 1
        for i in order[start:stop]:
            ranks[i] = (start + stop - 1) / 2
        start = stop
    return [r / (n - 1) - 0.5 for r in ranks]


@dataclass(frozen=True)
class EvolutionStrategies(Central):
    r"""'es': evolution strategies over a population of N = 2q members theta +- sigma z_i (sigma = eps), each
    member's loss (a negative reward, :mod:`zo_scale.train.objectives`) replaced by its fitness f, shaped over
    the whole population (:func:`shaped`), then the central difference:

    .. math:: g_i = \frac{f(\theta + \sigma z_i) - f(\theta - \sigma z_i)}{2 \sigma}, \qquad
        \hat g = \frac{1}{q} \sum_i g_i z_i = \frac{1}{N \sigma} \sum_m f_m \varepsilon_m
        \quad (\varepsilon_m = \pm z_i),

    the update of OpenAI-ES (Salimans et al. 2017, arXiv 1703.03864: antithetic pairs, centred ranks) and of
    "Evolution Strategies at Scale" (Qiu et al., ICML 2026: z-scored rewards, the default here). Departures:
    es-at-scale draws N independent members where this draws antithetic pairs (N even); its step is
    alpha / N sum_m R_m eps_m with the 1/sigma folded into alpha, here the lr multiplies the 1/(N sigma) form.
    Each member is one row group of the perturbed forward, so a population is one batched generation. The
    logged g_i are the shaped differences: replay needs nothing else. The loss at theta is the population's
    mean raw loss.
    """

    name = "es"
    fitness: str = "zscore"

    def __post_init__(self) -> None:
        if self.fitness not in FITNESS:
            raise ValueError(f"unknown fitness shaping {self.fitness!r}; choose one of {FITNESS}")

    def projected_grads(self, values: Sequence[float], eps: float, queries: int) -> list[float] | None:
        return super().projected_grads(shaped(values, self.fitness), eps, queries) if _finite(values) else None


@dataclass(frozen=True)
class Unbiased(Estimator):
    r"""'unbiased': an unbiased estimate of the directional derivative (Ma & Huang, "On the Optimal
    Construction of Unbiased Gradient Estimators for Zeroth-Order Optimization", NeurIPS 2025, arXiv
    2510.19953): the derivative as a telescoping series of central differences at radii
    :math:`\mu_n = \epsilon \rho^n` shrinking to 0, one term drawn at random and reweighted,

    .. math:: D_n = \frac{L(\theta + \mu_n z) - L(\theta - \mu_n z)}{2 \mu_n}, \qquad
        g = D_0 + \frac{D_N - D_{N-1}}{p_N}, \qquad P(N = n) = p_n = (1 - c)\, c^{\,n-1},\ n \ge 1,

    so that :math:`E[g] = D_0 + \sum_{n \ge 1} (D_n - D_{n-1}) = \lim_n D_n = \nabla L \cdot z` exactly:
    no O(eps^2) bias, where the central estimate has it. The variance is finite when
    :math:`c > \rho^4` (a central difference's error is O(mu^2), so :math:`(D_n - D_{n-1})^2 / p_n \sim
    (\rho^4 / c)^n`); defaults rho = c = 1/2. Cost: 4 forwards a query when N = 1 (radii mu_0, mu_1), 6 when
    N >= 2 (mu_0, mu_{N-1}, mu_N): 2 (2 (1 - c) + 3 c) = 5 on average at c = 1/2. One N per step, from the
    step's seed (replays draw the same). Departure: this is the single-term randomized truncation with a
    geometric N; the paper derives optimal sampling distributions and radii for four constructions of
    its family, which this does not reproduce. In fp32 keep eps * rho^N well above the loss's rounding.
    """

    name = "unbiased"
    points = (1.0, -1.0, 0.5, -0.5, 0.25, -0.25)  # the most a step evaluates: rho = 1/2, N >= 2 (planning)
    ratio: float = 0.5
    carry_on: float = 0.5
    max_terms: int = 24  # N is capped (P(N > 24) = c^24 ~ 6e-8 at c = 1/2): mu_N stays a usable radius

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0 or not self.ratio**4 < self.carry_on < 1.0:
            raise ValueError(f"the unbiased estimator needs 0 < rho < 1 and rho^4 < c < 1 (finite variance), got "
                             f"rho={self.ratio}, c={self.carry_on}")

    def for_step(self, seed: int) -> Estimator:
        draw, n = random.Random(seed), 1
        while n < self.max_terms and draw.random() < self.carry_on:
            n += 1
        return TelescopeTerm(n, (1 - self.carry_on) * self.carry_on ** (n - 1), self.ratio)


@dataclass(frozen=True)
class TelescopeTerm(Estimator):
    """One step of :class:`Unbiased`: the radii mu_0, mu_(N-1), mu_N (mu_0, mu_1 for N = 1) and p_N."""

    terms: int
    probability: float
    ratio: float

    @property
    def radii(self) -> tuple[float, ...]:  # in units of eps
        n = self.terms
        return (1.0, self.ratio) if n == 1 else (1.0, self.ratio ** (n - 1), self.ratio**n)

    @property
    def points(self) -> tuple[float, ...]:  # type: ignore[override]
        return tuple(x for r in self.radii for x in (r, -r))

    def projected_grads(self, values: Sequence[float], eps: float, queries: int) -> list[float] | None:
        if not _finite(values):
            return None
        radii, per_query = self.radii, 2 * len(self.radii)
        grads = []
        for i in range(queries):
            pairs = values[i * per_query : (i + 1) * per_query]
            d = [(pairs[2 * k] - pairs[2 * k + 1]) / (2 * eps * r) for k, r in enumerate(radii)]
            grads.append(d[0] + (d[-1] - d[-2]) / self.probability)
        return grads

    def loss_at_theta(self, values: Sequence[float], queries: int) -> float:
        per_query = 2 * len(self.radii)
        pairs = [x for i in range(queries) for x in values[i * per_query : i * per_query + 2]]
        return sum(pairs) / len(pairs)  # the eps pairs, as the central estimator's


@dataclass(frozen=True)
class Forward(Estimator):
    name = "forward"
    at_theta = True
    points = (1.0,)

    def projected_grads(self, values: Sequence[float], eps: float, queries: int) -> list[float] | None:
        if not _finite(values):
            return None
        return [(x - values[0]) / eps for x in values[1:]]


@dataclass(frozen=True)
class NormalizedForward(Forward):
    r"""FZOO's step (Dang et al., "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language Models
    towards Adam-Scale Speed", 2025, arXiv 2506.09034): N = q one-sided perturbations (Rademacher in the
    paper: ``sampler=DenseSampler('rademacher')``), each difference divided by the standard deviation of
    the N perturbed losses,

    .. math:: \hat g = \frac{1}{N} \sum_i \frac{L(\theta + \epsilon u_i) - L(\theta)}{\sigma} u_i,
        \qquad \sigma = \mathrm{std}(L(\theta + \epsilon u_1), \dots, L(\theta + \epsilon u_N)),

    a normalized step: :math:`\sigma \approx \epsilon \lVert \nabla L \rVert`, so the step length is about
    lr whatever the gradient's scale. That makes its lr another scale than ZO-SGD's: on SmolLM2-135M / SST-2
    its step at one lr is about 45x shorter (``benchmarks/fzoo_curvature.py``), and it learns at lr 1e-3
    where ZO-SGD does at 3e-5. Departures from the paper, following its code so that its learning
    rates carry over: no 1/eps (the paper's :math:`\eta` is lr * eps), sigma is the population standard
    deviation (the paper divides by N - 1). L(theta) is evaluated first (the code evaluates it after the
    N points: the same numbers). Where sigma is 0 (all N losses equal) the step does not move.
    N forwards + 1 a step; under ``perturb='in_forward'`` all N + 1 are one batched forward.
    """

    name = "fzoo"
    min_queries = 2

    def projected_grads(self, values: Sequence[float], eps: float, queries: int) -> list[float] | None:
        if not _finite(values):
            return None
        perturbed = values[1:]
        mean = sum(perturbed) / len(perturbed)
        sigma = math.sqrt(sum((x - mean) ** 2 for x in perturbed) / len(perturbed))
        if sigma == 0.0:
            return [0.0] * len(perturbed)
        return [(x - values[0]) / sigma for x in perturbed]


@dataclass(frozen=True)
class ForwardGradient(Estimator):
    """'jvp': values are [L(theta) per direction..., grad L . z_i per direction...]."""

    name = "jvp"

    def projected_grads(self, values: Sequence[float], eps: float, queries: int) -> list[float] | None:
        return list(values[queries:]) if _finite(values) else None

    def loss_at_theta(self, values: Sequence[float], queries: int) -> float:
        return sum(values[:queries]) / queries

    def forwards(self, queries: int) -> int:
        return queries  # each a forward with its tangent (about 2-3x a plain forward's compute)


ESTIMATORS: dict[str, type[Estimator]] = {
    e.name: e for e in (Central, CentralCurvature, EvolutionStrategies, Unbiased, Forward, NormalizedForward,
                        ForwardGradient)
}


def make_estimator(name: str) -> Estimator:
    """An estimator by name: a key of ``ESTIMATORS``."""
    try:
        return ESTIMATORS[name]()
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}") from None
