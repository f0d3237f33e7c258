"""FZOO's estimator, M-SignSGD and LeZO's layer subsets against their equations, on functions known exactly."""

import math

import pytest
import torch

import zo_scale
from zo_scale import ZOOptimizer
from zo_scale.core.estimators import Central, Forward, NormalizedForward
from zo_scale.core.shards import whole_param_shard

TARGET = torch.linspace(-1, 1, 40)


def quadratic(scale=1.0):
    theta = torch.nn.Parameter(torch.zeros(40))
    return theta, lambda: scale * 0.5 * (theta - TARGET).pow(2).sum()


def test_fzoo_step_divides_each_difference_by_the_std_of_the_perturbed_losses():
    theta, loss = quadratic()
    lr, eps, n = 0.05, 1e-2, 4
    opt = zo_scale.FZOO([("theta", theta)], lr=lr, eps=eps, n=n)
    shard = whole_param_shard(theta, "theta")
    zs = [d.z(shard, 0, 40) for d in opt.sampler.directions(opt.seed, 0, n)]
    assert all(set(z.unique().tolist()) == {-1.0, 1.0} for z in zs)  # Rademacher, as the paper
    with torch.no_grad():
        at = loss().item()
        perturbed = [0.5 * (eps * z - TARGET).pow(2).sum().item() for z in zs]
    mean = sum(perturbed) / n
    sigma = math.sqrt(sum((x - mean) ** 2 for x in perturbed) / n)  # population std, as FZOO's code
    expected = -lr / n * sum((x - at) / sigma * z for x, z in zip(perturbed, zs, strict=True))
    returned = opt.step(loss)
    assert returned == pytest.approx(at)  # the loss at theta itself
    assert torch.allclose(theta.detach(), expected, atol=1e-5)


def test_fzoo_is_a_normalized_step_invariant_to_the_scale_of_the_loss():
    """g_i / sigma does not change when the loss is multiplied by a constant (ZO-SGD's step would, 1000x)."""
    runs = []
    for scale in (1.0, 1000.0):
        theta, loss = quadratic(scale)
        opt = zo_scale.FZOO([("theta", theta)], lr=0.05, eps=1e-2, n=4)
        for _ in range(5):
            opt.step(loss)
        runs.append(theta.detach().clone())
    assert torch.allclose(runs[0], runs[1], atol=1e-4)
    assert runs[0].abs().max() > 1e-3  # it moved


def test_fzoo_needs_two_perturbations_and_skips_a_zero_spread():
    theta, _ = quadratic()
    with pytest.raises(ValueError, match="queries must be >= 2 for the 'fzoo' estimator"):
        ZOOptimizer([theta], estimator="fzoo", queries=1)
    opt = zo_scale.FZOO([("theta", theta)], lr=0.1, n=3)
    opt.step(lambda: torch.tensor(1.0))  # a flat loss: sigma = 0, no step (not a division by zero)
    assert opt.last_record.grads == [0.0, 0.0, 0.0] and theta.detach().abs().max() == 0


def test_estimators_count_their_forwards():
    assert Central().forwards(3) == 6 and Forward().forwards(3) == 4 and NormalizedForward().forwards(8) == 9


def test_sign_momentum_steps_along_the_sign_of_the_average():
    theta, loss = quadratic()
    beta, lr = 0.8, 0.01
    opt = zo_scale.ZOSignSGD([("theta", theta)], lr=lr, eps=1e-3, momentum=beta)
    shard = whole_param_shard(theta, "theta")
    m = torch.zeros(40)
    for t in range(3):
        before = theta.detach().clone()
        z = opt.sampler.directions(opt.seed, t, 1)[0].z(shard, 0, 40)
        opt.step(loss)
        m = beta * m + (1 - beta) * opt.last_record.grads[0] * z
        assert torch.allclose(opt.state[theta]["momentum"], m, atol=1e-6, rtol=1e-5)
        assert torch.allclose(theta.detach(), before - lr * torch.sign(m), atol=1e-6)


def layered_model(n_layers=8):
    """Parameters named as a decoder's: an embedding, n layers of two weights each, a head."""
    names = ["embed.weight"] + [f"model.layers.{i}.{w}" for i in range(n_layers) for w in ("q", "v")]
    return [(n, torch.nn.Parameter(torch.zeros(6))) for n in [*names, "lm_head.weight"]]


def test_lezo_perturbs_a_random_subset_of_layers_and_always_the_rest():
    params = layered_model()
    opt = zo_scale.LeZO(params, lr=0.1, layers=0.25, queries=2)
    chosen = [opt.sampler.chosen(opt.seed, t) for t in range(20)]
    assert all(len(c) == 2 and len(set(c)) == 2 for c in chosen)  # ceil(0.25 * 8) layers, without replacement
    assert len({tuple(c) for c in chosen}) > 5  # drawn anew each step
    assert opt.sampler.chosen(opt.seed, 3) == zo_scale.LeZO(layered_model(), layers=0.25).sampler.chosen(opt.seed, 3)
    opt.step(lambda: sum(((p - 1) ** 2).sum() for _, p in params))
    moved = {n for n, p in params if p.detach().abs().max() > 0}
    layers = {f"model.layers.{i}.{w}" for i in chosen[0] for w in ("q", "v")}
    assert moved == {"embed.weight", "lm_head.weight"} | layers  # both queries share the step's subset
    with pytest.raises(ValueError, match="fraction of transformer layers"):
        zo_scale.LeZO(layered_model(), layers=0.0)


A = torch.linspace(0.5, 4.0, 40)  # the diagonal Hessian of the quadratic below


def curved():
    theta = torch.nn.Parameter(torch.zeros(40))
    return theta, lambda: 0.5 * (A * (theta - TARGET).pow(2)).sum()


def test_hizoo_steps_follow_its_equations_with_the_old_hessian_in_the_perturbation():
    theta, loss = curved()
    lr, eps, alpha = 0.01, 1e-2, 0.3
    opt = zo_scale.HiZOO([("theta", theta)], lr=lr, eps=eps, alpha=alpha)
    shard = whole_param_shard(theta, "theta")
    h = torch.ones(40)
    for t in range(2):
        z = opt.sampler.directions(opt.seed, t, 1)[0].z(shard, 0, 40)  # the sampler's z ~ N(0, I)
        at = theta.detach().clone()
        perturbation = z / h.sqrt()  # H^{-1/2} z with the H before this step
        grad = A * (at - TARGET)
        g = (grad * perturbation).sum().item()  # (L+ - L-) / (2 eps): exact on a quadratic
        c = (A * perturbation.pow(2)).sum().item() / 2  # |L+ + L- - 2 L| / (2 eps^2): exact too
        h = (1 - alpha) * h + alpha * c * h * z.pow(2)
        opt.step(loss)
        assert opt.last_record.grads[0] == pytest.approx(g, rel=1e-3)
        assert opt.last_record.measured[0] == pytest.approx(c, rel=1e-3)
        assert torch.allclose(opt.state[theta]["hessian"], h, rtol=1e-3)
        assert torch.allclose(theta.detach(), at - lr * g * z / h.sqrt(), atol=1e-5), t  # the new H in the step


def test_hizoo_needs_its_estimator():
    theta, _ = curved()
    with pytest.raises(ValueError, match="estimator='hizoo'"):
        ZOOptimizer([theta], rule="hizoo")


def test_the_unbiased_estimator_removes_the_central_differences_bias():
    """Along one direction, L(theta + mu z) = exp(mu): the derivative is 1, the central difference at
    eps = 0.5 is sinh(0.5) / 0.5 = 1.042; the mean of the randomly truncated series is 1."""
    eps = 0.5
    central = Central().projected_grads([math.exp(eps), math.exp(-eps)], eps, 1)[0]
    assert central == pytest.approx(math.sinh(eps) / eps) and central - 1 > 0.04
    unbiased, draws, total, seen = zo_scale.Unbiased(), 20000, 0.0, set()
    for seed in range(draws):
        step = unbiased.for_step(seed)
        values = [math.exp(x * eps) for x in step.points]
        total += step.projected_grads(values, eps, 1)[0]
        seen.add(step.terms)
    assert abs(total / draws - 1.0) < 0.004, total / draws
    assert {1, 2, 3, 4} <= seen  # N geometric: P(N = n) = 2^-n
    assert zo_scale.Unbiased().forwards(2) == 12  # the most a step takes (N >= 2: three radii)
    with pytest.raises(ValueError, match="rho\\^4 < c"):
        zo_scale.Unbiased(ratio=0.9, carry_on=0.5)
