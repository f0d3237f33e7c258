"""ARDD (AcceleratedDirectional): its one-buffer form follows the paper's three sequences x, y, w step by
step, binds n to the trained elements, and minimizes a convex quadratic."""

import pytest
import torch

import zo_scale
from zo_scale.core.directions import DenseDirection
from zo_scale.core.shards import whole_param_shard

N = 30
A = torch.linspace(0.5, 2.0, N, dtype=torch.float64)
TARGET = torch.linspace(-1.0, 1.0, N, dtype=torch.float64)


def quadratic():
    w = torch.nn.Parameter(torch.zeros(N))
    return w, (lambda: (0.5 * A * (w.double() - TARGET) ** 2).sum())


def test_the_steps_follow_the_papers_three_sequences():
    """x_{k+1} = tau_k w_k + (1 - tau_k) y_k, y_{k+1} = x_{k+1} - lr g z, w_{k+1} = w_k - a_{k+1} lr g z
    (g z = n t e), tau_k = 2 / (k + 2), a_{k+1} = (k + 2) / (48 n); x_0 = y_0 = w_0. n = 4 here (not 30)
    so that the mirror step is not negligible."""
    param, loss = quadratic()
    lr, n = 0.05, 4
    opt = zo_scale.ARDD([("w", param)], lr=lr, eps=1e-3, dimension=n, seed=2, kernel="eager")
    shard = whole_param_shard(param, "w")
    x = y = w = param.detach().double().clone()
    for k in range(6):
        opt.step(loss)
        z = DenseDirection(zo_scale.noise.derive_seed(2, k, 0)).z(shard, 0, N).double()
        step = opt.last_record.grads[0] * z
        y = x - lr * step
        w = w - (k + 2) / (48 * n) * lr * step
        tau = 2 / (k + 3)
        x = tau * w + (1 - tau) * y
        assert torch.allclose(param.detach().double(), x, rtol=0, atol=1e-6), k
    assert not torch.allclose(w, torch.zeros(N, dtype=torch.float64), atol=1e-3)  # the mirror did move


def test_n_is_the_number_of_trained_elements_by_default():
    model = torch.nn.Linear(5, 3)
    opt = zo_scale.ARDD(model.named_parameters(), lr=1e-3)
    assert opt.rule.n == 5 * 3 + 3
    with pytest.raises(ValueError, match="dimension"):
        zo_scale.ARDD(model.named_parameters(), dimension=0)


def test_it_minimizes_a_convex_quadratic():
    param, loss = quadratic()
    opt = zo_scale.ARDD([("w", param)], lr=0.02, eps=1e-3)
    before = float(loss())
    for _ in range(500):
        opt.step(loss)
    assert float(loss()) < 0.05 * before
