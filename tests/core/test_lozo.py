"""LOZO and LOZO-M against their paper's equations, on quadratics where every quantity is known exactly."""

import torch

import zo_scale
from zo_scale.core.shards import whole_param_shard

TARGET_W, TARGET_B = torch.arange(30.0).view(6, 5) / 30, torch.linspace(-1, 1, 6)


def quadratic():
    """L = 1/2 ||W - A||^2 + 1/2 ||b - c||^2: the central difference is exactly grad L . z."""
    model = torch.nn.Linear(5, 6)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    return model, lambda: 0.5 * ((model.weight - TARGET_W).pow(2).sum() + (model.bias - TARGET_B).pow(2).sum())


def directions(opt, model, step):
    d = opt.sampler.directions(opt.seed, step, 1)[0]
    w, b = whole_param_shard(model.weight, "weight"), whole_param_shard(model.bias, "bias")
    return d, d.u_rows(w, 0, 6) @ d.v(w).T, d.z(b, 0, 6)


def test_lozo_perturbs_by_eps_u_vt_and_steps_along_g_u_vt_over_r():
    model, loss = quadratic()
    opt = zo_scale.LOZO(model.named_parameters(), lr=0.1, eps=1e-3, rank=2, nu=50)
    _, uv, zb = directions(opt, model, 0)
    grad_w, grad_b = -TARGET_W, -TARGET_B  # at W = 0, b = 0
    opt.step(loss)
    g = opt.last_record.grads[0]
    # the loss was measured at theta +- eps U V^T (not eps U V^T / sqrt(r)): g = <grad, U V^T> + <grad_b, z_b>
    expected = (grad_w * uv).sum() + (grad_b * zb).sum()
    assert abs(g - expected.item()) < 1e-3 * abs(expected.item())
    # the update: -lr g U V^T / r on the matrix, -lr g z on the bias (LOZO's code: dense MeZO step there)
    assert torch.allclose(model.weight.detach(), -0.1 * g * uv / 2, atol=1e-6)
    assert torch.allclose(model.bias.detach(), -0.1 * g * zb, atol=1e-6)


def test_lozo_estimate_is_unbiased_on_matrices():
    """E[<G, U V^T> U V^T / r] = G: the mean over many steps' estimates approaches the gradient (without
    the 1/r it would approach r G; with the old 1/sqrt(r) in z and in the update, also G but at another eps)."""
    model, _ = quadratic()
    opt = zo_scale.LOZO(model.named_parameters(), rank=3, nu=1)
    grad = -TARGET_W
    total = torch.zeros(6, 5)
    n = 3000
    for t in range(n):
        _, uv, _ = directions(opt, model, t)
        total += (grad * uv).sum() * uv / 3
    mean = total / n
    relative = (mean - grad).norm() / grad.norm()
    assert relative < 0.2, relative  # about 1/sqrt(n) times the estimator's spread (~sqrt(d) ~ 5.5)


def test_lozo_m_momentum_is_the_papers_average_in_the_factor():
    model, loss = quadratic()
    beta, lr, rank = 0.7, 0.05, 2
    opt = zo_scale.LOZOM(model.named_parameters(), lr=lr, eps=1e-3, rank=rank, nu=50, beta=beta)
    factor, bias = torch.zeros(6, rank), torch.zeros(6)  # the averages start at the first estimate
    for t in range(3):
        d, _, zb = directions(opt, model, t)
        u = d.u_rows(whole_param_shard(model.weight, "weight"), 0, 6)
        opt.step(loss)
        g = opt.last_record.grads[0]
        n_g = g / rank * u  # the factor of this step's estimate: g U / r
        decay = 0.0 if t == 0 else beta
        factor = decay * factor + (1 - decay) * n_g
        bias = decay * bias + (1 - decay) * g * zb  # 1-D: the same average, dense
        assert torch.allclose(opt.state[model.weight]["factor"], factor, atol=1e-6, rtol=1e-5), t
        assert torch.allclose(opt.state[model.bias]["momentum"], bias, atol=1e-6, rtol=1e-5), t


def test_lozo_m_carries_the_factor_into_a_new_v():
    model, loss = quadratic()
    opt = zo_scale.LOZOM(model.named_parameters(), lr=0.05, rank=2, nu=2, beta=0.9)
    weight = whole_param_shard(model.weight, "weight")
    for _ in range(2):
        opt.step(loss)
    before = opt.state[model.weight]["factor"].clone()
    old_v = opt.sampler.directions(opt.seed, 1, 1)[0].v(weight)
    d2 = opt.sampler.directions(opt.seed, 2, 1)[0]
    opt.step(loss)  # step 2 redraws V
    g = opt.last_record.grads[0]
    carried = before @ (old_v.T @ d2.v(weight)) / 5
    expected = 0.9 * carried + 0.1 * g / 2 * d2.u_rows(weight, 0, 6)
    assert torch.allclose(opt.state[model.weight]["factor"], expected, atol=1e-6, rtol=1e-5)
