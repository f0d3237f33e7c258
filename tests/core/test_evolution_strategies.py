"""The ES estimator (estimator='es'): fitness shaping over the population and the antithetic update, against
their equations on functions known exactly, and a step that raises a reward."""

import pytest
import torch

from zo_scale import ZOOptimizer
from zo_scale.core.estimators import EvolutionStrategies, make_estimator, shaped
from zo_scale.core.shards import whole_param_shard

TARGET = torch.linspace(-1, 1, 40)


def test_z_scores_and_centred_ranks():
    values = [3.0, 1.0, 2.0, 2.0]
    mean, std = 2.0, (0.5**0.5)
    assert shaped(values, "zscore") == pytest.approx([(v - mean) / std for v in values])
    # ranks 3, 0, then the tie of ranks 1 and 2 shares 1.5: r / (n - 1) - 1/2
    assert shaped(values, "rank") == pytest.approx([0.5, -0.5, 0.0, 0.0])
    assert shaped(values, "none") == values
    assert shaped([1.0, 1.0], "zscore") == [0.0, 0.0] and shaped([1.0, 1.0], "rank") == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown fitness shaping 'sigmoid'"):
        EvolutionStrategies(fitness="sigmoid")


@pytest.mark.parametrize("fitness", ["zscore", "rank"])
def test_an_es_step_moves_along_the_shaped_antithetic_differences(fitness):
    """theta <- theta - lr / q sum_i (f(+z_i) - f(-z_i)) / (2 sigma) z_i, f shaped over all 2q losses."""
    theta = torch.nn.Parameter(torch.zeros(40))

    def loss():
        return 0.5 * (theta - TARGET).pow(2).sum()

    lr, eps, q = 0.05, 1e-2, 3
    opt = ZOOptimizer([("theta", theta)], lr=lr, eps=eps, queries=q, estimator=EvolutionStrategies(fitness))
    shard = whole_param_shard(theta, "theta")
    zs = [d.z(shard, 0, 40) for d in opt.sampler.directions(opt.seed, 0, q)]
    with torch.no_grad():
        losses = [0.5 * (sign * eps * z - TARGET).pow(2).sum().item() for z in zs for sign in (1, -1)]
    f = shaped(losses, fitness)
    expected = -lr / q * sum((f[2 * i] - f[2 * i + 1]) / (2 * eps) * z for i, z in enumerate(zs))
    returned = opt.step(loss)
    assert returned == pytest.approx(sum(losses) / len(losses))  # the population's mean raw loss
    assert opt.last_record.grads == pytest.approx([(f[2 * i] - f[2 * i + 1]) / (2 * eps) for i in range(q)])
    assert torch.allclose(theta.detach(), expected, atol=1e-6)


def climb(scale, steps=40):
    """ES on the reward -scale |theta - TARGET|^2 (the loss its negative): the weights, the rewards before and after."""
    theta = torch.nn.Parameter(torch.zeros(40))

    def reward():
        return -scale * (theta - TARGET).pow(2).sum()

    opt = ZOOptimizer([("theta", theta)], lr=2e-3, eps=1e-2, queries=8, estimator="es")
    start = reward().item()
    for _ in range(steps):
        opt.step(lambda: -reward())
    return theta.detach(), start, reward().item()


def test_es_climbs_a_reward_whatever_its_scale():
    """Shaped fitness makes the run the same for the reward times 1000 (to the losses' fp32 rounding), and the
    reward rises from -14 to above -1."""
    (a, start, end), (b, _, _) = climb(1.0), climb(1000.0)
    assert torch.allclose(a, b, rtol=0, atol=1e-4)
    assert start < -10 and end > -1
    assert make_estimator("es") == EvolutionStrategies("zscore")
