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


def test_the_16_bit_table_index_is_uniform_chi_square():
    """Each normal is Q[16 bits of the hash]: the 65,536 indices must be equally likely."""
    z = noise.normal(seed=4, stream=2, start=0, count=1 << 22)  # 64 draws per index on average
    index = torch.searchsorted(noise.table("normal", torch.float32, z.device), z)
    counts = torch.bincount(index, minlength=65536).double()
    expected = z.numel() / 65536
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    dof = 65535
    assert abs(chi2 - dof) < 5 * (2 * dof) ** 0.5, chi2  # chi-square(dof) has sd sqrt(2 dof)


def test_normal_tails_follow_the_gaussian_and_stop_at_the_table_ends():
    z = noise.normal(seed=5, stream=0, start=0, count=4_000_000)
    for k, p in ((2.0, 0.0455), (3.0, 0.0027)):  # P(|z| > k) of N(0, 1)
        assert abs((z.abs() > k).double().mean().item() - p) < 4 * (p * (1 - p) / z.numel()) ** 0.5, k
    table = noise.table("normal", torch.float32, z.device)
    assert z.abs().max().item() <= table.abs().max().item() < 4.4  # 16-bit quantiles end at 4.3 sigma


@pytest.mark.parametrize("kind", noise.KINDS)
def test_neighbours_and_offsets_are_uncorrelated(kind):
    """Lanes of one hash word (lags 1-3 for normals, 1-63 for signs) and far offsets look independent."""
    z = noise.generate(kind, seed=6, stream=3, start=0, count=1 << 21).double()
    bound = 5 / z.numel() ** 0.5  # 5 sigma of a correlation estimate
    for lag in (1, 2, 3, 4, 63, 64, 65_536):
        r = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
        assert abs(r) < bound, (lag, r)
    shifted = noise.generate(kind, seed=6, stream=3, start=1 << 40, count=1 << 21).double()
    assert abs(torch.corrcoef(torch.stack([z, shifted]))[0, 1].item()) < bound


def test_keys_of_equals_stream_key_elementwise():
    streams = [0, 1, 12345, (1 << 63) - 1, 0x5DEECE66D]
    for seed in (0, 7, (1 << 63) - 25):
        keys = noise.keys_of(noise.seed_key(seed), torch.tensor(streams, dtype=torch.int64))
        assert keys.tolist() == [noise.stream_key(seed, s) for s in streams]
