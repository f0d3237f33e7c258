"""Flat buckets: parameters as views of one flat tensor, swept in one kernel call, equal to the per-tensor sweep."""

import copy
import logging

import torch
import torch.nn.functional as F

from zo_scale import ZOSGD, ZOOptimizer
from zo_scale.core import flat_buckets
from zo_scale.core.directions import DenseDirection, LowRankDirection
from zo_scale.core.shards import whole_param_shard
from zo_scale.core.sweep import Update, sweep_shard
from zo_scale.core.updates import SGD, Adam
from zo_scale.models.tiny import build_tiny_model, learnable_token_batch

SHAPES = [(300, 257), (257,), (5000,), (64, 1000), (3,)]  # under and over a block, 1-D and 2-D (decay)


def params(dtype=torch.float32):
    torch.manual_seed(0)
    return [(torch.nn.Parameter(torch.randn(s).to(dtype)), f"layer{i}.weight") for i, s in enumerate(SHAPES)]


def test_flatten_keeps_parameters_and_values_and_aligns_them():
    members = params()
    before = [p.detach().clone() for p, _ in members]
    objects = [p for p, _ in members]
    (bucket,) = flat_buckets.flatten([members])
    assert bucket.params == objects  # the same Parameter objects, their data moved
    for (p, _), value, start in zip(members, before, bucket.starts, strict=True):
        assert torch.equal(p, value)
        assert start % flat_buckets.BLOCK == 0
        assert p.data_ptr() == bucket.flat.data_ptr() + start * p.element_size()
    assert bucket.intact()
    members[1][0].data = members[1][0].data.clone()
    assert not bucket.intact()


def test_flatten_splits_by_dtype_and_size_and_skips_what_it_cannot_own():
    members = params()
    members[2] = (torch.nn.Parameter(members[2][0].detach().double()), members[2][1])
    shared = torch.zeros(20)
    members.append((torch.nn.Parameter(shared[:10]), "view.of.a.shared.storage"))
    buckets = flat_buckets.flatten([members], max_bytes=3 * flat_buckets.BLOCK * 4)
    bucketed = {id(p) for b in buckets for p in b.params}
    assert id(members[2][0]) not in bucketed  # alone in its dtype
    assert id(members[-1][0]) not in bucketed  # aliases a storage it does not own
    assert all(b.flat.numel() * 4 <= 3 * flat_buckets.BLOCK * 4 or len(b.params) == 1 for b in buckets)
    assert not flat_buckets.bucketable(members[-1][0])


def test_bucket_sweep_equals_the_per_tensor_sweep_bitwise():
    members = params()
    reference = [(torch.nn.Parameter(p.detach().clone()), n) for p, n in members]
    (bucket,) = flat_buckets.flatten([members])
    d1, d2 = DenseDirection(11), DenseDirection(12)  # the plan of a lazy step's first pass: one compile for both
    update = Update(SGD(), [(d1, 0.37)], 1e-2, 0.1)
    moves = dict(before=[(d1, 1e-3)], update=update, after=[(d2, 2e-3)])
    assert flat_buckets.covers((moves["before"], moves["after"]), update, master=False)
    assert flat_buckets.sweep_bucket(bucket, **moves, kernel_mode="compiled")
    for p, n in reference:
        sweep_shard(whole_param_shard(p, n), **moves, state={"step": torch.tensor(0.0)}, kernel_mode="eager")
    for (p, n), (r, _) in zip(members, reference, strict=True):
        assert torch.equal(p, r), n
    assert not torch.equal(members[0][0], params()[0][0])  # it moved


def test_what_a_bucket_sweep_covers():
    dense = [(DenseDirection(1), 1e-3)]
    assert flat_buckets.covers((dense, ()), None, master=False)
    assert not flat_buckets.covers((dense, ()), None, master=True)
    assert not flat_buckets.covers(([(LowRankDirection(1, 2, 4), 1e-3)], ()), None, master=False)
    assert not flat_buckets.covers((dense, ()), Update(Adam(), dense, 1e-3, 0.0), master=False)


def model_and_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    return model, (lambda m: (m(x) - y).pow(2).mean())


def test_optimizer_over_buckets_equals_per_tensor_steps_through_a_checkpoint():
    model, loss_fn = model_and_loss()
    reference = copy.deepcopy(model)
    kwargs = dict(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=5, lazy=True)
    opt = ZOSGD(model.named_parameters(), kernel="compiled", **kwargs)
    ref = ZOSGD(reference.named_parameters(), kernel="eager", **kwargs)
    assert len(opt.buckets) == 1 and not ref.buckets
    for _ in range(3):
        opt.step(lambda: loss_fn(model))
        ref.step(lambda: loss_fn(reference))
    saved = opt.state_dict()  # flushes; the step counts are views of the bucket's one tensor
    ref.flush()
    assert [s["step"].item() for s in saved["state"].values()] == [3.0] * 4
    opt = ZOSGD(model.named_parameters(), kernel="compiled", **kwargs)
    opt.load_state_dict(saved)
    for _ in range(2):
        opt.step(lambda: loss_fn(model))
        ref.step(lambda: loss_fn(reference))
    opt.flush()
    ref.flush()
    for (name, p), r in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, r), name
    assert [s["step"].item() for s in opt.state_dict()["state"].values()] == [5.0] * 4


def test_a_parameter_given_new_data_leaves_its_bucket_loudly(caplog):
    model, loss_fn = model_and_loss()
    reference = copy.deepcopy(model)
    opt = ZOSGD(model.named_parameters(), lr=1e-2, eps=1e-3, seed=5, kernel="compiled")
    ref = ZOSGD(reference.named_parameters(), lr=1e-2, eps=1e-3, seed=5, kernel="eager")
    assert len(opt.buckets) == 1 and not ref.buckets
    model[0].weight.data = model[0].weight.data.clone()
    with caplog.at_level(logging.WARNING):
        opt.step(lambda: loss_fn(model))
    ref.step(lambda: loss_fn(reference))
    assert not opt.buckets
    assert "given new data" in caplog.text and "0.weight" in caplog.text
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, r)


def test_no_buckets_with_the_eager_kernel_nor_on_the_cpu_under_auto():
    """On a CPU under 'auto' a bucket kernel would be one more compile to save milliseconds a step."""
    model, _ = model_and_loss()
    pointers = [p.data_ptr() for p in model.parameters()]
    for mode in ("eager", "auto"):
        assert not ZOOptimizer(model.named_parameters(), kernel=mode).buckets
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert not flat_buckets.runs_compiled("auto", torch.device("cpu"))
    assert flat_buckets.runs_compiled("auto", torch.device("meta"))  # any accelerator
    assert flat_buckets.runs_compiled("compiled", torch.device("cpu"))


def test_in_forward_copies_by_windows_equal_the_per_parameter_copies_bitwise(monkeypatch):
    """perturb='in_forward', lazy: each window of a bucket gets its copies and its landed update in one call;
    OPT's tied embedding / LM head is used twice (its window made again, copies only). Losses, records and
    weights equal those of copies made one parameter at a time, bit for bit."""
    monkeypatch.setattr(flat_buckets, "COPY_WINDOW_BYTES", 40_000)  # a few windows in this tiny model
    ids = learnable_token_batch(rows=2, length=16)

    def run(**kwargs):
        model = build_tiny_model("opt")
        opt = ZOSGD(model.named_parameters(), lr=1e-3, eps=1e-3, weight_decay=0.1, seed=3, lazy=True,
                    perturb="in_forward", model=model, **kwargs)
        records = [opt.step(lambda groups: stacked_losses(model, ids, groups)) for _ in range(3)]
        opt.flush()
        return model, opt, records

    model, opt, records = run(kernel="compiled")
    reference, ref, expected = run(kernel="eager")
    assert len(opt.buckets) == 1 and not ref.buckets
    assert records == expected and len(set(records)) == 3
    assert not torch.equal(next(model.parameters()), next(build_tiny_model("opt").parameters()))  # it trained
    for (name, p), r in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, r), name


def stacked_losses(model, ids, groups):
    """Mean next-token loss of each of ``groups`` stacked copies of ``ids``, shape (groups,)."""
    stacked = ids.repeat(groups, 1)
    logits = model(input_ids=stacked).logits[:, :-1].float()
    per_row = F.cross_entropy(logits.transpose(1, 2), stacked[:, 1:], reduction="none").mean(-1)
    return per_row.view(groups, -1).mean(1)
