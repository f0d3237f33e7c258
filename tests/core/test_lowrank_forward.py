"""LOZO's points inside the matmul and the lookup (zo_scale.core.lowrank_forward): a Linear or Embedding at K
low-rank points from its stored weight plus each group's correction, without copies of the weight."""

import pytest
import torch
import torch.nn.functional as F
from test_perturbed_forward import losses  # the K row groups' LM losses of one fixed batch

import zo_scale
from zo_scale.core import optimizer as optimizer_module
from zo_scale.core.directions import LowRankDirection
from zo_scale.core.lowrank_forward import low_rank_embedding, low_rank_linear, low_rank_only
from zo_scale.core.shards import whole_param_shard
from zo_scale.models.tiny import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_linear_at_low_rank_points_is_its_product_plus_each_groups_correction(dtype):
    """y_k = x_k W^T + b_k + c_k (x_k V) U^T against the layer at the exact point W + c_k U V^T (fp64): within
    the copies path's error (which rounds W + c_k U V^T to the weight's dtype first) and a few roundings of the
    output (in bf16 the product is rounded before the correction is added; 3.7 eps at most over 40 seeds).
    A correction of the wrong sign would be off by 2 c |x z|, about 0.2."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40).to(dtype)
    x = torch.randn(3 * 10, 48, generator=gen).to(dtype)  # 3 groups of 10 rows
    shard = whole_param_shard(layer.weight, "layer.weight")
    d = LowRankDirection(seed=5, v_seed=6, rank=2)
    groups = [[(d, 1e-2)], [(d, -1e-2)], []]
    assert low_rank_only(groups) and not low_rank_only([[(zo_scale.core.directions.DenseDirection(1), 1e-2)]])
    assert not low_rank_only([[]])  # no move: the plain layer, by the copies path (the weight itself)
    out = torch.empty(30, 40, dtype=dtype)
    low_rank_linear(x, out, shard, [layer.bias] * 3, groups)
    z = d.z(shard, 0, shard.full_numel).view(40, 48).double()  # U V^T, as the copies path makes it
    for k, c in enumerate((1e-2, -1e-2, 0.0)):
        rows = slice(10 * k, 10 * (k + 1))
        exact = F.linear(x[rows].double(), layer.weight.double() + c * z, layer.bias.double())
        copied = F.linear(x[rows], (layer.weight.double() + c * z).to(dtype), layer.bias)
        error, copy_error = (out[rows].double() - exact).abs().max(), (copied.double() - exact).abs().max()
        assert error <= copy_error + 4 * torch.finfo(dtype).eps * exact.abs().max(), (k, error, copy_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_embedding_at_low_rank_points_looks_up_its_rows_plus_their_correction(dtype):
    """E[i] + c_k U[i] V^T for each group's ids: U's rows at the ids are U's (u_at = u_rows), and the lookup is
    the exact point's (fp64) within the copies path's error and a rounding."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 24).to(dtype)
    shard = whole_param_shard(table.weight, "embed.weight")
    d = LowRankDirection(seed=5, v_seed=6, rank=3)
    ids = torch.randint(0, 50, (2 * 4, 7), generator=gen)  # 2 groups of 4 rows
    assert torch.equal(d.u_at(shard, ids), d.u_rows(shard, 0, 50)[ids])
    out = low_rank_embedding(ids, shard, [[(d, 1e-2)], [(d, -1e-2)]])
    z = d.z(shard, 0, shard.full_numel).view(50, 24).double()
    for k, c in enumerate((1e-2, -1e-2)):
        rows = slice(4 * k, 4 * (k + 1))
        exact = F.embedding(ids[rows], table.weight.double() + c * z)
        copied = F.embedding(ids[rows], (table.weight.double() + c * z).to(dtype))
        error, copy_error = (out[rows].double() - exact).abs().max(), (copied.double() - exact).abs().max()
        assert out.dtype == dtype and error <= copy_error + torch.finfo(dtype).eps * exact.abs().max(), k


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_lozo_in_forward_copies_no_linear_weight_and_follows_the_in_place_step(arch, monkeypatch):
    """LOZO with perturb='in_forward', lazy: no Linear or Embedding weight is copied (1-D parameters are, and
    OPT's learned positions, a subclass with its own forward), each 1-D parameter's update is stored once a step,
    a matrix's once a window (pending_window), and losses, projected gradients and weights follow the
    in-place LOZO step (the reference) to rounding."""
    def run(perturb):
        model = build_tiny_model(arch)
        stored = []
        opt = zo_scale.LOZO(model.named_parameters(), lr=1e-3, eps=1e-3, rank=2, nu=2, seed=3, lazy=True,
                            perturb=perturb, model=model if perturb == "in_forward" else None,
                            store_fn=lambda p, n: stored.append(n))
        records = []
        for _ in range(4):
            loss = opt.step((lambda g: losses(model, g)) if perturb == "in_forward" else (lambda: losses(model, 1)[0]))
            records += [loss, *opt.last_record.grads]  # one query: loss, g alternate
        opt.flush()
        return model, records, stored

    copied = set()
    real = optimizer_module.perturbed_copies

    def perturbed_copies(shard, *args):
        copied.add(shard.name)
        return real(shard, *args)

    monkeypatch.setattr(optimizer_module, "perturbed_copies", perturbed_copies)
    model, records, stored = run("in_forward")
    reference, expected, _ = run("in_place")
    plain = {f"{n}.weight" for n, m in model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Embedding)}
    assert len(plain) > 10 and not copied & plain
    assert copied == {n for n, p in model.named_parameters() if n not in plain}
    assert all(p.dim() == 1 for n, p in model.named_parameters() if n in copied) == (arch == "llama")
    # steps 2-4 each land the last update once per 1-D parameter; a matrix's updates are held in its window, which
    # folds once, in step 3's forward (V redrawn: nu = 2)
    assert sorted(stored) == sorted(n for n, p in model.named_parameters() for _ in range(1 if p.dim() == 2 else 3))
    # a projected gradient divides a difference of losses by 2 eps: their rounding (1e-7 of 5.5) is 1e-3 of it
    assert records[::2] == pytest.approx(expected[::2], rel=1e-5)
    assert records[1::2] == pytest.approx(expected[1::2], abs=1e-3 * max(map(abs, expected[1::2])))
    moved = max((p - q).abs().max().item() for p, q in zip(reference.parameters(), build_tiny_model(arch).parameters(),
                                                            strict=True))
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-3 * moved), n
