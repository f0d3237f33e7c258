import pytest
import torch

from zo_scale.core.directions import (
    BlockSampler,
    DenseSampler,
    LowRankSampler,
    SparseSampler,
    block_of,
    kept,
    mask_threshold,
)
from zo_scale.core.shards import canonical_name, stream_id, whole_param_shard


def full_z(direction, shard):
    return direction.z(shard, 0, shard.full_numel)


@pytest.mark.parametrize(
    "sampler", [DenseSampler(), DenseSampler("rademacher"), SparseSampler(0.6), LowRankSampler(rank=3)]
)
def test_direction_slices_are_exact(sampler):
    w = torch.zeros(300, 257)
    shard = whole_param_shard(w, "layers.0.w")
    d = sampler.directions(seed=1, step=4, q=1)[0]
    z = full_z(d, shard)
    for a, b in [(0, 1), (256, 260), (1000, 30_000), (77_000, 77_100)]:
        assert torch.equal(z[a:b], d.z(shard, a, b - a))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75, 0.99])
def test_sparse_mask_keeps_each_element_with_probability_1_minus_sparsity(sparsity):
    n = 1 << 20
    mask = kept(torch.arange(n), key=12345, threshold=mask_threshold(sparsity))
    p = 1 - sparsity
    assert abs(int(mask.sum()) - p * n) <= 5 * (n * p * (1 - p)) ** 0.5 + 1e-9  # binomial: within 5 sigma
    if 0 < sparsity:  # independent neighbours: P(both kept) = p^2
        both = int((mask[1:] & mask[:-1]).sum())
        assert abs(both - p * p * (n - 1)) <= 5 * (n * p * p * (1 - p * p)) ** 0.5
    other = kept(torch.arange(n), key=54321, threshold=mask_threshold(sparsity))
    if 0 < sparsity:  # another key (stream or resample): another mask, overlapping by chance only
        assert abs(int((mask & other).sum()) - p * p * n) <= 5 * (n * p * p * (1 - p * p)) ** 0.5


def test_sparse_mask_is_resampled_on_schedule_and_differs_across_tensors():
    w, b = whole_param_shard(torch.zeros(123, 45), "w"), whole_param_shard(torch.zeros(123 * 45), "b")
    sampler = SparseSampler(sparsity=0.7, resample_every=3)
    masks = [full_z(sampler.directions(0, t, 1)[0], w) != 0 for t in range(4)]
    n = 123 * 45
    assert all(abs(int(m.sum()) - 0.3 * n) < 5 * (n * 0.21) ** 0.5 for m in masks)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])
    assert not torch.equal(masks[2], masks[3])
    assert not torch.equal(masks[0].view(-1), full_z(sampler.directions(0, 0, 1)[0], b) != 0)


def test_lozo_perturbation_is_rank_r_with_lazy_v():
    shard = whole_param_shard(torch.zeros(64, 48), "w")
    bias = whole_param_shard(torch.zeros(48), "b")
    sampler = LowRankSampler(rank=3, resample_every=5)
    d0, d1, d5 = (sampler.directions(0, t, 1)[0] for t in (0, 1, 5))
    assert torch.linalg.matrix_rank(full_z(d0, shard).view(64, 48)).item() == 3
    assert torch.equal(d0.v(shard), d1.v(shard))  # V kept for nu steps
    assert not torch.equal(d0.v(shard), d5.v(shard))
    assert not torch.equal(d0.u_rows(shard, 0, 64), d1.u_rows(shard, 0, 64))  # U new every step
    assert full_z(d0, bias).count_nonzero() == 48  # 1-D parameters: dense normal
    # LOZO's perturbation is U V^T itself, its estimate carries the paper's 1/r
    u, v = d0.u_rows(shard, 0, 64), d0.v(shard)
    assert torch.allclose(full_z(d0, shard).view(64, 48), u @ v.T, atol=1e-5)
    assert d0.estimate_scale(shard) == 1 / 3 and d0.estimate_scale(bias) == 1.0


def test_block_sampler_cycles_through_layers_then_the_rest():
    names = ["embed.weight", "model.layers.0.q.weight", "model.layers.0.k.weight", "model.layers.1.q.weight",
             "lm_head.w"]
    shards = [whole_param_shard(torch.zeros(4), n) for n in names]
    sampler = BlockSampler()
    sampler.bind(shards)
    assert sampler.block_names == ["layer 0", "layer 1", "rest"]
    active = [[s.name for s in shards if d.z(s, 0, 4) is not None] for d in sampler.directions(0, 1, 2)]
    # step 1 with q=2 runs queries 2 and 3 of the cycle: 'rest', then 'layer 0'
    assert active == [["embed.weight", "lm_head.w"], ["model.layers.0.q.weight", "model.layers.0.k.weight"]]
    assert block_of("model.decoder.layers.11.fc1.weight") == "layer 11"


def test_stream_ids_ignore_wrapper_prefixes():
    assert canonical_name("module.base_model.model.model.layers.0.q.weight") == "model.layers.0.q.weight"
    assert stream_id("module._orig_mod.x.weight") == stream_id("x.weight") != stream_id("y.weight")
