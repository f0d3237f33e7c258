import copy
import math

import pytest
import torch

import zo_scale
from zo_scale import ZOOptimizer
from zo_scale.core.shards import ParamShard, stream_id


def regression():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    x = torch.randn(128, 8)
    y = torch.sin(x[:, :2]) + 0.5 * x[:, 2:4]
    return model, (lambda: (model(x) - y).pow(2).mean())


OPTIMIZERS = {
    "zo-sgd": lambda p: zo_scale.ZOSGD(p, lr=0.02, eps=1e-3),
    "zo-sgd-momentum": lambda p: zo_scale.ZOSGD(p, lr=0.005, momentum=0.9),
    "zo-sign": lambda p: zo_scale.ZOSignSGD(p, lr=2e-3),
    "zo-adam": lambda p: zo_scale.ZOAdam(p, lr=0.01),
    "zo-cons": lambda p: zo_scale.ZOConservative(p, lr=0.02),
    "forward-q4": lambda p: zo_scale.ZOSGD(p, lr=0.02, estimator="forward", queries=4),
    "rademacher": lambda p: ZOOptimizer(p, lr=0.02, sampler=zo_scale.DenseSampler("rademacher")),
    "lozo": lambda p: zo_scale.LOZO(p, lr=0.02, rank=2, nu=20),
    "lozo-m": lambda p: zo_scale.LOZOM(p, lr=0.005, rank=2, nu=20),
    "sparse": lambda p: zo_scale.SparseZO(p, lr=0.04, sparsity=0.5, resample_every=5),
    "block": lambda p: zo_scale.BlockZO(p, lr=0.02, queries=2),
    "adam-lazy-wd": lambda p: zo_scale.ZOAdam(p, lr=0.01, lazy=True, weight_decay=0.01),
    "sign-momentum": lambda p: zo_scale.ZOSignSGD(p, lr=2e-3, momentum=0.9),
    "fzoo": lambda p: zo_scale.FZOO(p, lr=2e-3, n=4),
    "lezo": lambda p: zo_scale.LeZO(p, lr=0.02),
    "hizoo": lambda p: zo_scale.HiZOO(p, lr=0.02, alpha=0.01),
    "unbiased": lambda p: ZOOptimizer(p, lr=0.02, estimator="unbiased"),
    "ardd": lambda p: zo_scale.ARDD(p, lr=0.02),
}
# The forward gradient needs the module: bound per test below.
JVP = "forward-gradient"


def make(name, model):
    if name == JVP:
        return zo_scale.ZOSGD(model.named_parameters(), lr=0.02, estimator="jvp", model=model)
    return OPTIMIZERS[name](model.named_parameters())


@pytest.mark.parametrize("name", [*sorted(OPTIMIZERS), JVP])
def test_every_rule_reduces_the_loss(name):
    model, loss = regression()
    opt = make(name, model)
    before = loss().item()
    for _ in range(400):
        opt.step(loss)
    opt.flush()
    assert loss().item() < 0.7 * before, (before, loss().item())


def test_central_estimate_is_unbiased_on_a_quadratic():
    """E[g z z^T] grad = grad for z ~ N(0, I); the central difference is exact on a quadratic."""
    torch.manual_seed(1)
    d = 12
    a = torch.randn(d, d, dtype=torch.float64)
    hessian = a @ a.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.randn(d, dtype=torch.float64))
    true_grad = hessian @ theta.detach() - b
    opt = zo_scale.ZOSGD([("theta", theta)], lr=1.0, eps=1e-2)
    start = theta.detach().clone()
    total = torch.zeros(d, dtype=torch.float64)
    n = 4000
    for _ in range(n):
        opt.step(lambda: 0.5 * theta @ hessian @ theta - b @ theta)
        total += start - theta.detach()  # this step's g_hat (lr = 1)
        theta.data.copy_(start)
    rel_err = ((total / n - true_grad).norm() / true_grad.norm()).item()
    assert rel_err < 0.15  # std of the mean ~ sqrt((d + 1) / n) = 0.06


def test_hyperparameters_are_checked_on_construction():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        zo_scale.ZOSGD(p, lr=-1)
    with pytest.raises(ValueError, match="eps: 0"):
        zo_scale.ZOSGD(p, eps=0)
    with pytest.raises(ValueError, match="unknown estimator 'backward'"):
        ZOOptimizer(p, estimator="backward")
    with pytest.raises(ValueError, match="unknown update rule 'lion'"):
        ZOOptimizer(p, rule="lion")
    with pytest.raises(ValueError, match="conservative"):
        ZOOptimizer(p, rule="adam", conservative=True)
    with pytest.raises(ValueError, match="sparsity"):
        zo_scale.SparseZO(p, sparsity=1.0)


def test_non_finite_loss_skips_the_step_and_restores_theta():
    model, loss = regression()
    opt = zo_scale.ZOSGD(model.named_parameters(), lr=0.02)
    before = copy.deepcopy(model.state_dict())
    assert math.isnan(opt.step(lambda: torch.tensor(float("nan"))))
    assert opt.skipped_steps == 1 and opt.last_record.grads is None and opt.step_count == 1
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-6), k  # +eps, -2 eps, +eps: float rounding only
    opt.step(loss)
    assert opt.skipped_steps == 1 and opt.last_record.grads is not None


@pytest.mark.parametrize("name", ["zo-sgd", "zo-adam", "adam-lazy-wd", "zo-cons", "lozo", "lozo-m", "sign-momentum",
                                  "fzoo", "hizoo", "unbiased", "ardd"])
def test_resume_from_state_dict_continues_the_same_trajectory_bitwise(name):
    straight, straight_loss = regression()
    opt = OPTIMIZERS[name](straight.named_parameters())
    for _ in range(10):
        opt.step(straight_loss)
    opt.flush()

    model, loss = regression()
    first = OPTIMIZERS[name](model.named_parameters())
    for _ in range(5):
        first.step(loss)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": first.state_dict()})

    resumed_model, resumed_loss = regression()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = OPTIMIZERS[name](resumed_model.named_parameters())
    resumed.load_state_dict(checkpoint["opt"])
    assert resumed.step_count == 5
    for _ in range(5):
        resumed.step(resumed_loss)
    resumed.flush()
    for p, q in zip(resumed_model.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["zo-sgd", "zo-adam", "zo-cons", "block", "fzoo", "lozo", "hizoo", "unbiased"])
def test_replay_of_the_step_records_rebuilds_the_weights_bitwise(name):
    model, loss = regression()
    initial = copy.deepcopy(model.state_dict())
    opt = OPTIMIZERS[name](model.named_parameters())
    records = []
    for _ in range(8):
        opt.step(loss)
        records.append(opt.last_record)
    opt.flush()

    rebuilt, _ = regression()
    rebuilt.load_state_dict(initial)
    replayer = OPTIMIZERS[name](rebuilt.named_parameters())
    for record in records:
        replayer.step(replay=record)
    replayer.flush()
    for p, q in zip(rebuilt.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_a_mismatched_seed():
    model, loss = regression()
    opt = zo_scale.ZOSGD(model.named_parameters(), seed=1)
    opt.step(loss)
    with pytest.raises(ValueError, match="seed 1"):
        zo_scale.ZOSGD(model.named_parameters(), seed=2).load_state_dict(opt.state_dict())


def test_lozo_m_keeps_momentum_in_the_factor_and_carries_it_across_v_changes():
    model, loss = regression()
    opt = zo_scale.LOZOM(model.named_parameters(), lr=0.005, rank=3, nu=4)
    for _ in range(5):  # crosses a V redraw at step 4
        opt.step(loss)
    weight, bias = model[0].weight, model[0].bias
    assert opt.state[weight]["factor"].shape == (16, 3) and "momentum" not in opt.state[weight]
    assert opt.state[bias]["momentum"].shape == (16,)
    with pytest.raises(ValueError, match="LowRankSampler"):
        ZOOptimizer(model.parameters(), rule="lozo-m")


def test_forward_gradient_is_the_exact_directional_derivative():
    model, loss = regression()
    opt = zo_scale.ZOSGD(model.named_parameters(), lr=1.0, estimator="jvp", model=model)
    before = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(loss(), list(model.parameters()))
    opt.step(loss)
    moves = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]  # = g z, z regenerated
    g = opt.last_record.grads[0]
    z = [m / g for m in moves]
    expected = sum((gr * zi).sum() for gr, zi in zip(grads, z, strict=True)).item()
    assert abs(g - expected) < 1e-4 * max(1.0, abs(expected))


def test_loaded_buffers_live_where_the_shard_lives_not_where_the_parameter_is():
    """ZeRO-3 offload, simulated: the parameter is a placeholder on another device (meta here, CUDA under
    zero.Init) and its partition sits in CPU memory. Loaded per-element state goes beside the partition,
    and the resumed run continues bit for bit."""
    def optimizer(backing):
        placeholder = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
        shard_fn = lambda p, n: ParamShard(p, n, stream_id(n), backing, 0, p.shape)  # noqa: E731
        return ZOOptimizer([("w", placeholder)], lr=0.1, eps=1e-2, rule="momentum", seed=1, shard_fn=shard_fn)

    def closure(backing):
        return lambda: (backing - 1).pow(2).sum()

    full, resumed = torch.zeros(12), torch.zeros(12)
    a = optimizer(full)
    for _ in range(2):
        a.step(closure(full))
    saved = copy.deepcopy(a.state_dict())
    resumed.copy_(full)
    b = optimizer(resumed)
    b.load_state_dict(saved)
    (state,) = b.state.values()
    assert state["momentum"].device == torch.device("cpu") and state["step"].device == torch.device("cpu")
    for opt, backing in ((a, full), (b, resumed)):
        opt.step(closure(backing))
    assert torch.equal(full, resumed) and full.abs().max() > 0
