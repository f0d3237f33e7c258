"""The fused (and lazy) step equals the published MeZO step: 4 separate passes, z regenerated each time."""

import copy

import pytest
import torch

from zo_scale import ZOSGD
from zo_scale.core import noise
from zo_scale.core.shards import stream_id


def model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    return model, (lambda m: (m(x) - y).pow(2).mean())


def reference_mezo_steps(model, loss_fn, steps, lr, eps, seed, queries, weight_decay):
    """MeZO as published: +eps z, -2 eps z, +eps z, then the update, each a full pass with full-size z,
    in MeZO's own expressions (theta + s * z * eps; theta - lr * (g z + wd theta)); q queries average."""
    params = list(model.named_parameters())

    def move(direction_seed, scale):
        for name, p in params:
            z = noise.normal(direction_seed, stream_id(name), 0, p.numel()).view_as(p)
            p.data = p.data + scale / eps * z * eps

    for t in range(steps):
        seeds = [noise.derive_seed(seed, t, i) for i in range(queries)]
        grads = []
        with torch.no_grad():
            for s in seeds:
                move(s, eps)
                lp = loss_fn(model).item()
                move(s, -2 * eps)
                lm = loss_fn(model).item()
                move(s, eps)
                grads.append((lp - lm) / (2 * eps))
            for name, p in params:
                zs = [noise.normal(s, stream_id(name), 0, p.numel()).view_as(p) for s in seeds]
                g_hat = zs[0] * (grads[0] / queries)
                for z, g in zip(zs[1:], grads[1:], strict=True):
                    g_hat = g_hat + z * (g / queries)
                decay = weight_decay if p.ndim >= 2 else 0.0
                p.data = p.data - lr * (g_hat + decay * p.data)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("queries,weight_decay", [(1, 0.0), (3, 0.1)])
def test_fused_step_equals_the_four_pass_reference_bitwise(lazy, queries, weight_decay):
    model, loss_fn = model_and_batch()
    reference = copy.deepcopy(model)
    opt = ZOSGD(model.named_parameters(), lr=1e-2, eps=1e-3, queries=queries, weight_decay=weight_decay,
                seed=11, lazy=lazy)
    for _ in range(6):
        opt.step(lambda: loss_fn(model))
    opt.flush()
    reference_mezo_steps(reference, loss_fn, 6, 1e-2, 1e-3, 11, queries, weight_decay)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(next(model.parameters()), next(model_and_batch()[0].parameters()))  # it moved


def test_lazy_step_leaves_the_update_pending_until_flush():
    model, loss_fn = model_and_batch()
    eager_model = copy.deepcopy(model)
    lazy = ZOSGD(model.named_parameters(), lr=1e-2, lazy=True)
    eager = ZOSGD(eager_model.named_parameters(), lr=1e-2)
    lazy.step(lambda: loss_fn(model))
    eager.step(lambda: loss_fn(eager_model))
    w, w_eager = model[0].weight, eager_model[0].weight
    assert not torch.equal(w, w_eager)  # sits at theta - eps z with the update pending
    lazy.flush()
    assert torch.equal(w, w_eager)
