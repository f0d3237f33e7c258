"""ZO Fine-tuner: z_p = c s_p u_p per tensor (ScaledSampler), and the meta-training of s (ScaleLearner)."""

import pytest
import torch

import zo_scale
from zo_scale.core import noise
from zo_scale.core.directions import DenseDirection, ScaledSampler
from zo_scale.core.learned_scales import ScaleLearner
from zo_scale.core.shards import whole_param_shard


class TwoBlocks(torch.nn.Module):
    """L = |a - 1|^2 / 2 (30 elements); b (10 elements) does not enter the loss."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(30, dtype=dtype))
        self.b = torch.nn.Parameter(torch.zeros(10, dtype=dtype))

    def loss(self):
        return 0.5 * (self.a - 1).pow(2).sum() + 0.0 * self.b.sum()


def test_z_is_c_s_u_with_sum_d_cs2_equal_to_d():
    model = TwoBlocks()
    shards = [whole_param_shard(p, n) for n, p in model.named_parameters()]
    sampler = ScaledSampler({"a": 2.0, "b": 0.5, "not.trained": 9.0})
    sampler.bind(shards)
    c = (40 / (30 * 4 + 10 * 0.25)) ** 0.5
    assert sampler.by_stream[shards[0].stream] == pytest.approx(2 * c) and sampler.by_stream[shards[1].stream] == \
        pytest.approx(0.5 * c)
    assert sum(sh.full_numel * sampler.by_stream[sh.stream] ** 2 for sh in shards) == pytest.approx(40)
    direction = sampler.directions(5, 3, 1)[0]
    for sh in shards:
        u = DenseDirection(noise.derive_seed(5, 3, 0)).z(sh, 0, sh.full_numel)
        assert torch.equal(direction.z(sh, 0, sh.full_numel), (u.float() * sampler.by_stream[sh.stream]).double())


def test_one_step_moves_along_the_scaled_z_by_the_projected_gradient():
    model = TwoBlocks()
    scales = {"a": 3.0, "b": 0.2}
    opt = zo_scale.ZOFineTuner(model.named_parameters(), scales, lr=0.1, eps=1e-3, seed=4, kernel="eager")
    opt.step(model.loss)
    sampler = ScaledSampler(scales)
    sampler.bind([whole_param_shard(p, n) for n, p in TwoBlocks().named_parameters()])
    z = {n: DenseDirection(noise.derive_seed(4, 0, 0)).z(whole_param_shard(p, n), 0, p.numel()).double()
         * sampler.by_stream[whole_param_shard(p, n).stream] for n, p in TwoBlocks().named_parameters()}
    lp, lm = 0.5 * (1e-3 * z["a"] - 1).pow(2).sum(), 0.5 * (-1e-3 * z["a"] - 1).pow(2).sum()
    g = (lp - lm) / 2e-3
    # z = c s u is formed in fp32 (the noise has 16-bit quantiles), then widened to the weights' fp64
    assert torch.allclose(model.a, -0.1 * g * z["a"], rtol=1e-6, atol=0)
    assert torch.allclose(model.b, -0.1 * g * z["b"], rtol=1e-6, atol=0)
    assert not torch.allclose(model.a, -0.1 * g * z["a"] / sampler.by_stream[whole_param_shard(model.a, "a").stream],
                              rtol=1e-2)  # not along the unscaled u


def test_missing_bad_and_changed_scales_are_refused():
    shards = [whole_param_shard(p, n) for n, p in TwoBlocks().named_parameters()]
    with pytest.raises(ValueError, match="none for 1 trained tensor.*'b'"):
        ScaledSampler({"a": 1.0}).bind(shards)
    with pytest.raises(ValueError, match="positive and finite"):
        ScaledSampler({"a": 1.0, "b": 0.0}).bind(shards)
    saved = ScaledSampler({"a": 1.0, "b": 2.0}).state_dict()
    with pytest.raises(ValueError, match="other perturbation scales"):
        ScaledSampler({"a": 1.0, "b": 3.0}).load_state_dict(saved)
    ScaledSampler({"a": 1.0, "b": 2.0}).load_state_dict(saved)


def test_the_meta_gradient_is_autograd_through_theta_prime():
    """d L(theta') / d log s_p with theta' = theta - eta g c s u, g and c held fixed: the learner's closed form."""
    model = TwoBlocks()
    with torch.no_grad():
        model.a.copy_(torch.linspace(-1, 2, 30, dtype=torch.float64))
    learner = ScaleLearner(model.named_parameters(), eps=1e-3, zo_lr=0.05, lr=1e-2, base_lr=0.0, seed=2)
    with torch.no_grad():
        learner.log_scales.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64))
    cs = learner._normalized()
    u = [learner._u(i, noise.derive_seed(2, 0)) for i in range(2)]
    theta = [p.detach().clone() for _, p in learner.named]
    at = lambda k: 0.5 * (theta[0] + k * cs[0] * u[0] - 1).pow(2).sum()  # noqa: E731
    learner.meta_optimizer.step = lambda: None  # keep the gradient the step computes
    g = learner.step(model.loss)["grad"]  # its points are rounded through fp32 (add_noise_): its own g
    assert g == pytest.approx(float((at(1e-3) - at(-1e-3)) / 2e-3), rel=1e-3)
    log_s = learner.log_scales.detach().clone().requires_grad_(True)
    c = float(cs[0] / log_s[0].detach().exp())  # the normalization, held fixed
    a_prime = theta[0] - 0.05 * g * c * log_s[0].exp() * u[0]
    (0.5 * (a_prime - 1).pow(2).sum()).backward()
    assert learner.log_scales.grad[0].item() == pytest.approx(log_s.grad[0].item(), rel=1e-6)
    assert learner.log_scales.grad[1].item() == 0.0  # b is not in the loss: theta' moving b changes nothing


def test_it_learns_to_perturb_the_tensor_the_loss_depends_on():
    model = TwoBlocks()
    learner = ScaleLearner(model.named_parameters(), eps=1e-3, zo_lr=0.01, lr=0.05, base_lr=0.0, seed=0)
    for _ in range(60):
        learner.step(model.loss)
    scales = learner.scales()
    assert scales["a"] > 1.0 > scales["b"] and scales["a"] / scales["b"] > 3
    assert 30 * scales["a"] ** 2 + 10 * scales["b"] ** 2 == pytest.approx(40)
    # with those scales ZO-SGD gets further in 20 steps than with plain Gaussian noise
    finals = {}
    for name, s in {"learned": scales, "plain": {"a": 1.0, "b": 1.0}}.items():
        m = TwoBlocks()
        opt = zo_scale.ZOFineTuner(m.named_parameters(), s, lr=0.01, seed=9)
        for _ in range(20):
            opt.step(m.loss)
        finals[name] = float(m.loss().detach())
    assert finals["learned"] < finals["plain"]


def test_the_base_trajectory_restarts_from_the_start():
    model = TwoBlocks()
    learner = ScaleLearner(model.named_parameters(), zo_lr=0.01, base_lr=0.1, restart_every=3, seed=1)
    learner.step(model.loss)
    assert not torch.equal(model.a, torch.zeros(30, dtype=torch.float64))  # the first-order step moved it
    learner.step(model.loss)
    learner.step(model.loss)
    assert torch.equal(model.a, torch.zeros(30, dtype=torch.float64))
    assert torch.equal(model.b, torch.zeros(10, dtype=torch.float64))
