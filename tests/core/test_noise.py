import pytest
import torch

from zo_scale.core import noise


@pytest.mark.parametrize("kind", noise.KINDS)
def test_any_slice_equals_the_same_elements_of_the_whole(kind):
    whole = noise.generate(kind, seed=3, stream=7, start=0, count=300_001)
    for a, b in [(0, 5), (5, 70), (65_535, 65_541), (123_457, 300_001), (299_999, 300_001), (1, 200_000)]:
        assert torch.equal(whole[a:b], noise.generate(kind, 3, 7, a, b - a)), (a, b)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_zero3_style_shards_concatenate_to_the_single_process_noise(world):
    numel = 10_007
    per_rank = -(-numel // world)  # ZeRO-3 pads the flat parameter to world * per_rank
    shards = [noise.normal(1, 2, r * per_rank, min(per_rank, numel - r * per_rank)) for r in range(world)]
    assert torch.equal(torch.cat(shards), noise.normal(1, 2, 0, numel))


def test_normal_statistics():
    z = noise.normal(seed=0, stream=0, start=0, count=2_000_000).double()
    assert abs(z.mean().item()) < 3e-3
    assert abs(z.var().item() - 1.0) < 5e-3
    assert abs((z.pow(4).mean() / z.var().pow(2)).item() - 3.0) < 0.05  # Gaussian kurtosis
    assert abs((z > 1.0).double().mean().item() - 0.158655) < 2e-3


def test_rademacher_statistics():
    z = noise.rademacher(seed=0, stream=0, start=0, count=1_000_000)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5e-3


def test_streams_and_seeds_are_independent():
    a = noise.normal(0, 0, 0, 100_000)
    for other in (noise.normal(1, 0, 0, 100_000), noise.normal(0, 1, 0, 100_000)):
        assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1].item()) < 0.02


def test_dtype_and_add_noise_match_generate():
    z = noise.normal(5, 9, 100, 200_000)
    out = torch.ones(200_000)
    noise.add_noise_(out, "normal", 5, 9, 100, alpha=0.5)
    assert torch.equal(out, torch.ones(200_000) + 0.5 * z)
    assert noise.normal(5, 9, 0, 10, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown noise kind 'uniform'"):
        noise.generate("uniform", 0, 0, 0, 10)
    with pytest.raises(ValueError, match="start and count"):
        noise.normal(0, 0, -1, 10)
