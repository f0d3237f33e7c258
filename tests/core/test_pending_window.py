"""LOZO's updates held pending while V is fixed (zo_scale.core.pending_window): theta = W - P V^T read inside the
forward, the stored matrix written once a window; replay and resume fold where the run did."""

import contextlib
import copy
import dataclasses

import pytest
import torch
from test_perturbed_forward import losses  # the K row groups' LM losses of one fixed batch

import zo_scale
from zo_scale.core.directions import LowRankDirection
from zo_scale.core.optimizer import ZOOptimizer
from zo_scale.core.pending_window import PendingWindows
from zo_scale.core.shards import whole_param_shard
from zo_scale.models.tiny import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
NU = 3


def test_a_window_holds_the_sum_of_its_updates_as_one_factor():
    """P V^T after two held steps is the sum of the two dense updates lr w (1/r) U V^T (fp64, to fp32 rounding);
    close() hands over the windows it does not keep."""
    weight = torch.zeros(30, 20)
    shard = whole_param_shard(weight, "w")
    windows = PendingWindows()
    steps = [(LowRankDirection(1, 7, 2), 0.5, 1e-2), (LowRankDirection(2, 7, 2), -2.0, 3e-2)]
    expected = torch.zeros(30, 20, dtype=torch.float64)
    for d, w, lr in steps:
        windows.hold(shard, [(d, w / 2)], lr, d.v_seed)  # c = w / r
        expected += lr * w / 2 * d.z(shard, 0, 600).double().view(30, 20)
    held = windows.on(shard)
    assert torch.allclose(held.factor.double() @ held.right.double().T, expected, rtol=0,
                          atol=1e-6 * expected.abs().max().item())
    with pytest.raises(RuntimeError, match="should have folded first"):  # another V: the window must close first
        windows.hold(shard, [(LowRankDirection(3, 8, 2), 1.0)], 1e-2, 8)
    assert not windows.close(lambda stream, v_seed: v_seed == 7) and windows
    closed = windows.close(lambda stream, v_seed: v_seed == 8)
    assert closed.on(shard) is held and not windows


def lozo(model, method=zo_scale.LOZO, **kwargs):
    return method(model.named_parameters(), lr=1e-3, eps=1e-3, rank=2, nu=NU, seed=3, lazy=True,
                         perturb="in_forward", model=model, **kwargs)


def step(opt, model):
    return opt.step(lambda groups: losses(model, groups))


@pytest.mark.parametrize("method", [zo_scale.LOZO, zo_scale.LOZOM], ids=["lozo", "lozo-m"])
def test_a_matrix_is_written_once_a_window_and_the_run_follows_the_per_step_updates(monkeypatch, method):
    """Matrices keep their stored bits through a window and are stored when V is redrawn (steps 3 and 6 of 7,
    nu = 3); LOZO's 1-D parameters every step (LOZO-M's, with a momentum buffer each, by a sweep: never
    stored from the forward). Losses, projected gradients and weights follow the run that lands every update
    on the weights (holding off) to fp32 rounding."""
    def run(hold):
        monkeypatch.setattr(ZOOptimizer, "_holding", real if hold else (lambda self, directions: False))
        model = build_tiny_model("llama")
        stored = []
        opt = lozo(model, method, store_fn=lambda p, n: stored.append((opt.step_count, n)))
        bits, records = [], []
        for _ in range(7):
            records += [step(opt, model), *opt.last_record.grads]
            bits.append({n: p.detach().clone() for n, p in model.named_parameters()})
        opt.flush()
        return model, bits, records, stored

    real = ZOOptimizer._holding
    model, bits, records, stored = run(hold=True)
    reference, _, expected, landed = run(hold=False)
    matrices = {n for n, p in model.named_parameters() if p.dim() == 2}
    vectors = {n for n, p in model.named_parameters() if p.dim() == 1}
    assert len(matrices) > 10 and vectors
    every_step = range(1, 7) if method is zo_scale.LOZO else ()  # the steps that land the last one's update
    assert sorted(stored) == sorted([(t, n) for t in (3, 6) for n in matrices] + [(t, n) for t in every_step
                                                                                   for n in vectors])
    assert sorted(landed) == sorted((t, n) for t in every_step for n in matrices | vectors)
    for t in range(6):  # after step t; windows open at steps 0 and 3, and fold in the forwards of steps 3 and 6
        same = {n for n in matrices if torch.equal(bits[t][n], bits[t + 1][n])}
        assert same == (set() if t + 1 in (3, 6) else matrices), t
    assert records[::2] == pytest.approx(expected[::2], rel=1e-5)
    assert records[1::2] == pytest.approx(expected[1::2], abs=1e-3 * max(map(abs, expected[1::2])))
    base = build_tiny_model("llama").parameters()
    moved = max((p - q).abs().max().item() for p, q in zip(reference.parameters(), base, strict=True))
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-3 * moved), n


@pytest.mark.parametrize("method", [zo_scale.LOZO, zo_scale.LOZOM], ids=["lozo", "lozo-m"])
def test_replay_folds_where_the_run_was_flushed_and_rebuilds_it_bitwise(method):
    """A flush mid-window (an evaluation) folds the window there, and the next record says so; replaying the
    records on the base model folds at the same points (there and where V is redrawn) and gives the run's weights
    bit for bit. Replayed without the flag, the one fold of steps 0-2 rounds differently."""
    model = build_tiny_model("llama")
    base = copy.deepcopy(model)
    opt = lozo(model, method)
    records = []
    for t in range(5):
        step(opt, model)
        records.append(opt.last_record)
        if t == 1:
            opt.flush()
    opt.flush()
    assert [r.folded for r in records] == [False, False, True, False, False]

    def replay(records):
        replayed = copy.deepcopy(base)
        opt = lozo(replayed, method)
        for record in records:
            opt.step(replay=record)
        opt.flush()
        return replayed

    def equal(a, b):
        return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))

    assert equal(replay(records), model)
    unflagged = [dataclasses.replace(r, folded=False) for r in records]
    assert not equal(replay(unflagged), model)


def test_an_evaluation_reads_the_open_windows_without_folding_them():
    """Inside reading() the forward sees theta_t = W - P V^T (the flushed model's losses, to fp32 rounding) while
    every matrix keeps its stored bits; the run goes on as if nothing had been read: the same records (none says
    folded) and the same weights, bit for bit. A flush there folds instead, and the run differs."""
    def run(evaluate):
        model = build_tiny_model("llama")
        opt = lozo(model)
        records, seen = [], None
        for t in range(5):
            step(opt, model)
            records.append(opt.last_record)
            if t == 1 and evaluate:
                stored = {n: p.clone() for n, p in model.named_parameters() if p.dim() == 2}
                with opt.reading() if evaluate == "read" else contextlib.nullcontext():
                    if evaluate == "flush":
                        opt.flush()
                    seen = losses(model, 1)
                kept = all(torch.equal(p, stored[n]) for n, p in model.named_parameters() if p.dim() == 2)
                assert kept == (evaluate == "read")
        opt.flush()
        return model, records, seen

    model, records, read = run("read")
    plain, plain_records, _ = run(None)
    folded, folded_records, flushed = run("flush")
    assert torch.allclose(read, flushed, rtol=1e-5, atol=0) and not any(r.folded for r in records)
    assert records == plain_records and [r.folded for r in folded_records] == [False, False, True, False, False]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), folded.parameters(), strict=True))


def test_a_run_resumed_from_its_state_dict_goes_on_bitwise():
    """state_dict() folds the open windows (mid-window here); the resumed optimizer's next record says the weights
    were folded, and its steps equal the saving run's bit for bit."""
    model = build_tiny_model("llama")
    opt = lozo(model)
    for _ in range(4):
        step(opt, model)
    state, weights = opt.state_dict(), copy.deepcopy(model.state_dict())
    after = [step(opt, model) for _ in range(3)]
    folded = opt.last_record.folded
    opt.flush()

    resumed = build_tiny_model("llama")
    resumed.load_state_dict(weights)
    opt2 = lozo(resumed)
    opt2.load_state_dict(state)
    assert step(opt2, resumed) == after[0] and opt2.last_record.folded and not folded  # step 4 says so, 6 not
    assert [step(opt2, resumed) for _ in range(2)] == after[1:]
    opt2.flush()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters(), strict=True))


def test_a_group_that_decays_weights_lands_every_update_and_turning_decay_on_folds_its_window():
    """Weight decay moves along theta itself, not a factor: its group's matrices are stored every step; a window
    open when the decay is turned on folds in the next forward."""
    model = build_tiny_model("llama")
    stored = []
    opt = lozo(model, store_fn=lambda p, n: stored.append((opt.step_count, n)))
    matrices = {n for n, p in model.named_parameters() if p.dim() == 2}
    for _ in range(2):
        step(opt, model)
    assert not {n for _, n in stored} & matrices  # held
    for group in opt.param_groups:
        group["weight_decay"] = 0.1
    step(opt, model)  # folds the window (step 2)
    step(opt, model)  # lands step 2's update, decay included (step 3)
    assert sorted((t, n) for t, n in stored if n in matrices) == sorted((t, n) for t in (2, 3) for n in matrices)
    assert not opt._windows
