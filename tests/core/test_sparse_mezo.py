"""Sparse-MeZO's magnitude mask (MagnitudeSampler): z only where |theta| <= h, h each parameter's
(1 - sparsity) quantile of |theta| at the first step, fixed after; the points inside the forward."""

import pytest
import torch
import torch.nn.functional as F

import zo_scale
from zo_scale.core.directions import (
    BlockSampler,
    DenseDirection,
    LayerSubsetSampler,
    MagnitudeSampler,
    kth_magnitude,
)
from zo_scale.core.shards import whole_param_shard
from zo_scale.models.tiny import build_tiny_model, learnable_token_batch

pytestmark = pytest.mark.usefixtures("one_thread")
TARGET = torch.linspace(-0.1, 0.1, 40)  # inside the mask's region: the small weights' minimum stays small
IDS = learnable_token_batch(rows=4, length=24)


def losses(model, groups):
    """Mean next-token loss of each of ``groups`` stacked copies of IDS, shape (groups,)."""
    ids = IDS.repeat(groups, 1)
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(-1).view(groups, -1).mean(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_threshold_is_kthvalue_of_the_magnitudes_without_their_copy(dtype):
    """kth_magnitude (radix select over bit patterns, a chunk at a time) equals kthvalue of |x| in fp32 at
    every rank: zeros of both signs, ties, subnormals, chunks that split the tensor unevenly."""
    gen = torch.Generator().manual_seed(1)
    for n in (1, 5, 1000, 30011):
        x = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.02).to(dtype)
        x[: n // 7] = 0.0
        x[n // 7 : n // 5] = -0.0
        x[n // 5 : n // 4] = x[n // 4]  # ties
        x[n // 4 : n // 3] *= torch.finfo(dtype).tiny  # subnormals (and zeros where they round away)
        for k in {1, n // 3 + 1, n // 2 + 1, n - 1, n} - {0}:
            expected = x.double().abs().kthvalue(k).values.item()
            assert kth_magnitude(x, k, chunk=997) == expected, (n, k)


class Quadratic(torch.nn.Module):
    """L(w) = 1/2 sum_i a_i (w_i - c_i)^2, one loss per input row (the row group's, inside the forward)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(40, generator=gen))
        self.a = torch.linspace(0.5, 2.0, 40)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.a * (self.w - TARGET) ** 2).sum().expand(rows.shape[0])


def quadratic_step(model, opt):
    return opt.step(lambda k: model(torch.zeros(k, 1)))


def test_one_step_follows_the_equations_on_a_quadratic():
    model = Quadratic()
    w0 = model.w.detach().clone()
    sparsity, lr, eps = 0.75, 0.1, 1e-3
    opt = zo_scale.SparseMeZO(model.named_parameters(), lr=lr, eps=eps, sparsity=sparsity, model=model, seed=4,
                              kernel="eager")
    quadratic_step(model, opt)
    h = w0.abs().kthvalue(10).values  # (1 - 0.75) * 40 = the 10 smallest |w|
    mask = w0.abs() <= h
    assert int(mask.sum()) == 10
    shard = whole_param_shard(model.w, "w")
    z = DenseDirection(zo_scale.noise.derive_seed(4, 0, 0)).z(shard, 0, 40) * mask  # step 0, query 0
    loss = lambda w: float((0.5 * model.a * (w - TARGET) ** 2).sum())  # noqa: E731
    g = (loss(w0 + eps * z) - loss(w0 - eps * z)) / (2 * eps)
    assert opt.last_record.grads[0] == pytest.approx(g, rel=1e-4)
    assert g == pytest.approx(float((model.a * (w0 - TARGET) * z).sum()), rel=1e-3)  # the masked directional derivative
    moved = model.w.detach()
    assert torch.equal(moved[~mask], w0[~mask])  # the large weights never move
    assert torch.allclose(moved[mask], w0[mask] - lr * opt.last_record.grads[0] * z[mask], rtol=0, atol=1e-7)
    assert opt.sampler.thresholds == {shard.stream: float(h)}


def test_the_threshold_is_fixed_at_the_first_step_and_the_mask_follows_theta():
    model = Quadratic()
    w0 = model.w.detach().clone()
    opt = zo_scale.SparseMeZO(model.named_parameters(), lr=0.5, eps=1e-3, sparsity=0.5, model=model, kernel="eager")
    for _ in range(30):
        quadratic_step(model, opt)
    (h,) = opt.sampler.thresholds.values()
    assert h == float(w0.abs().kthvalue(20).values)
    mask = model.w.detach().abs() <= h  # the mask the next step perturbs: from theta_t, not theta_0
    assert not torch.equal(mask, w0.abs() <= h)
    shard = whole_param_shard(model.w, "w")
    (d,) = opt.sampler.directions(0, 30, 1)
    assert torch.equal(d.z(shard, 0, 40) != 0, mask)


def test_it_minimizes_the_quadratic_over_the_small_weights_and_leaves_the_large_ones():
    model = Quadratic()
    w0 = model.w.detach().clone()
    opt = zo_scale.SparseMeZO(model.named_parameters(), lr=0.02, eps=1e-3, sparsity=0.5, model=model)
    for _ in range(300):
        quadratic_step(model, opt)
    w = model.w.detach()
    (h,) = opt.sampler.thresholds.values()
    small, inside = w0.abs() <= h, w.abs() <= h  # a weight the noise pushes past h leaves the mask, and stays
    assert int((small & inside).sum()) >= 15
    part = lambda w, m: float((0.5 * model.a * (w - TARGET) ** 2)[m].sum())  # noqa: E731
    assert part(w, small & inside) < 0.05 * part(w0, small & inside)
    assert torch.equal(w[~small], w0[~small])


def test_the_in_place_step_is_refused():
    model = Quadratic()
    with pytest.raises(ValueError, match="perturb='in_forward'"):
        zo_scale.ZOOptimizer(model.named_parameters(), sampler=MagnitudeSampler(0.5))
    with pytest.raises(ValueError, match="perturb='in_forward'"):  # a sampler over it inherits what z reads
        zo_scale.ZOOptimizer(model.named_parameters(), sampler=LayerSubsetSampler(inner=MagnitudeSampler(0.5)))
    with pytest.raises(ValueError, match="sparsity"):
        MagnitudeSampler(1.0)


def test_a_sampler_over_the_mask_saves_and_checks_its_thresholds():
    saved = BlockSampler(inner=MagnitudeSampler(0.5, thresholds={7: 0.25})).state_dict()
    resumed = BlockSampler(inner=MagnitudeSampler(0.5))
    resumed.load_state_dict(saved)
    assert resumed.inner.thresholds == {7: 0.25}
    with pytest.raises(ValueError, match="sparsity 0.5"):
        BlockSampler(inner=MagnitudeSampler(0.75)).load_state_dict(saved)
    BlockSampler().load_state_dict({})  # a state saved before samplers kept their inner's


def tiny_llama_run(kernel, steps=3, state=None, model=None):
    model = model if model is not None else build_tiny_model("llama")
    opt = zo_scale.SparseMeZO(model.named_parameters(), lr=1e-2, eps=1e-3, model=model, seed=3, kernel=kernel,
                              lazy=True)
    if state is not None:
        opt.load_state_dict(state)
    for _ in range(steps):
        opt.step(lambda k: losses(model, k))
    opt.flush()
    return model, opt


def test_compiled_kernels_equal_the_eager_reference_bitwise():
    eager, _ = tiny_llama_run("eager")
    compiled, _ = tiny_llama_run("compiled")
    start = build_tiny_model("llama")
    for (n, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, s) for p, s in zip(eager.parameters(), start.parameters(), strict=True))


def test_a_resumed_run_keeps_the_first_runs_thresholds_bitwise():
    straight, _ = tiny_llama_run("eager", steps=4)
    half, opt = tiny_llama_run("eager", steps=2)
    state = opt.state_dict()
    assert len(state["zo"]["sampler"]["thresholds"]) == len(list(half.parameters()))
    resumed, _ = tiny_llama_run("eager", steps=2, state=state, model=half)
    for (n, p), q in zip(resumed.named_parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q), n
    other = MagnitudeSampler(0.5)
    with pytest.raises(ValueError, match="sparsity 0.75"):
        other.load_state_dict(state["zo"]["sampler"])
