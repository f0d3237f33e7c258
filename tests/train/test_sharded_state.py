"""Optimizer state in per-rank slice files: saved on W ranks, loaded on any W', each rank reading its part."""

import pytest
import torch

import zo_scale
from zo_scale.backends.runtime import Runtime
from zo_scale.core.shards import ParamShard, stream_id
from zo_scale.train import sharded_state

SHAPES = {"w": (7, 5), "b": (9,)}


class Rank(Runtime):
    """One rank's view, for writing and reading files as rank ``rank`` of ``world_size`` would."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size


def optimizer(flat: dict[str, torch.Tensor], rank: int, world: int, rule: str = "adam") -> zo_scale.ZOOptimizer:
    """A ZO optimizer over rank ``rank``'s ZeRO-3-style partitions (ceil(numel / world) elements each) of
    ``flat``'s parameters: what each rank of a W-rank run holds."""
    params = [(n, torch.nn.Parameter(torch.empty(SHAPES[n], device="meta"))) for n in SHAPES]

    def shard_fn(p, name):
        n = -(-flat[name].numel() // world)
        lo, hi = min(rank * n, flat[name].numel()), min((rank + 1) * n, flat[name].numel())
        return ParamShard(p, name, stream_id(name), flat[name][lo:hi], lo, p.shape)

    return zo_scale.ZOOptimizer(params, lr=1e-2, eps=1e-2, rule=rule, seed=4, shard_fn=shard_fn, master_weights=True)


def trained(world: int) -> tuple[dict[str, torch.Tensor], list[zo_scale.ZOOptimizer]]:
    """Weights and the W ranks' optimizers after 3 steps: rank 0 evaluates the loss (of the whole weights,
    with only its partitions perturbed: not a real W-rank run, but state that differs across ranks),
    the others replay its record."""
    torch.manual_seed(0)
    flat = {n: torch.randn(torch.Size(s).numel()) for n, s in SHAPES.items()}
    opts = [optimizer(flat, r, world) for r in range(world)]
    loss = lambda: sum((v - 1).pow(2).sum() for v in flat.values())  # noqa: E731
    for _ in range(3):
        records = []
        for opt in opts:  # the same step on each rank's partitions; the loss is of the full weights
            opt.step(replay=records[0]) if records else (opt.step(loss), records.append(opt.last_record))
    return flat, opts


@pytest.mark.parametrize(("saved_on", "loaded_on"), [(1, 1), (2, 3), (3, 1), (1, 2)])
def test_state_saved_on_w_ranks_loads_onto_any_partitioning(tmp_path, saved_on, loaded_on):
    flat, opts = trained(saved_on)
    for r, opt in enumerate(opts):
        sharded_state.save(opt, Rank(r, saved_on), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["optimizer.pt", *(sharded_state.slices_file(r) for r in range(saved_on))])
    # the full buffers, joined from the saving ranks' own state in memory
    reference = {i: {key: torch.cat([opt.state_dict()["state"][i][key] for opt in opts])
                     for key in ("exp_avg", "exp_avg_sq", "master")} for i in range(len(SHAPES))}
    for r in range(loaded_on):
        opt = optimizer(flat, r, loaded_on)
        sharded_state.load(opt, tmp_path)
        for i, shard in enumerate(opt.local_shards()):
            state = opt.state[shard.param]
            for key in ("exp_avg", "exp_avg_sq", "master"):
                want = reference[i][key][shard.offset : shard.offset + shard.flat.numel()]
                assert torch.equal(state[key], want), (r, i, key)
            assert int(state["step"]) == 3
        assert opt.step_count == 3


def test_missing_slices_are_named_not_zero_filled(tmp_path):
    _, opts = trained(2)
    for r, opt in enumerate(opts):
        sharded_state.save(opt, Rank(r, 2), tmp_path)
    (tmp_path / sharded_state.slices_file(1)).unlink()  # a rank's file lost
    with pytest.raises(ValueError, match="do not cover"):
        sharded_state.load(optimizer(trained(1)[0], 0, 1), tmp_path)


def test_a_state_dict_with_full_buffers_inline_still_loads(tmp_path):
    """optimizer.pt from before the slice files (a single-process state_dict) loads sliced."""
    flat, (opt,) = trained(1)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    other = optimizer(flat, 1, 2)
    sharded_state.load(other, tmp_path)
    shard = other.local_shards()[0]
    full = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(other.state[shard.param]["exp_avg"], full[shard.offset : shard.offset + shard.flat.numel()])


def test_slices_every_rank_saved_whole_load_once(tmp_path):
    """A parameter every rank holds whole (a ZeRO-3 persistent one, trained replicated) is saved whole by
    each rank: the overlapping slices load, neither refused nor counted twice."""
    flat, (opt,) = trained(1)
    for r in range(2):
        sharded_state.save(opt, Rank(r, 2), tmp_path)
    loaded = optimizer(flat, 0, 1)
    sharded_state.load(loaded, tmp_path)
    for shard, saved in zip(loaded.local_shards(), opt.local_shards(), strict=True):
        assert torch.equal(loaded.state[shard.param]["exp_avg"], opt.state[saved.param]["exp_avg"])
