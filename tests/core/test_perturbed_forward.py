"""The perturbed forward (perturb='in_forward'): one forward over K stacked row groups gives the in-place
step's losses and weights (fp32, to rounding), never moves the stored weights, and fails loudly."""

import pytest
import torch
import torch.nn.functional as F

import zo_scale
from zo_scale.core import perturbed_forward as perturbed_forward_module
from zo_scale.core.directions import (
    BlockSampler,
    DenseDirection,
    DenseSampler,
    LayerSubsetSampler,
    LowRankDirection,
    LowRankSampler,
    ScaledSampler,
    SparseSampler,
)
from zo_scale.core.perturbed_forward import perturbed_forward
from zo_scale.core.shards import whole_param_shard
from zo_scale.core.sweep import sweep_shard
from zo_scale.models.greedy import greedy_decode
from zo_scale.models.tiny import build_tiny_model, learnable_token_batch

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = learnable_token_batch(rows=4, length=24)


def losses(model, groups):
    """Mean next-token loss of each of ``groups`` stacked copies of IDS, shape (groups,)."""
    ids = IDS.repeat(groups, 1)
    logits = model(input_ids=ids).logits[:, :-1].float()
    per_row = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(-1)
    return per_row.view(groups, -1).mean(1)


def closures(model):
    return (lambda: losses(model, 1)[0]), (lambda groups: losses(model, groups))


def run(arch, perturb, steps, dtype=torch.float32, lr=1e-3, **kwargs):
    model = build_tiny_model(arch, dtype=dtype)
    opt = zo_scale.ZOOptimizer(model.named_parameters(), lr=lr, eps=1e-3, seed=3, model=model, perturb=perturb,
                               kernel="eager", **kwargs)
    in_place, in_forward = closures(model)
    recorded = []
    for _ in range(steps):
        recorded.append(opt.step(in_place if perturb == "in_place" else in_forward))
        recorded.append(list(opt.last_record.grads))
    opt.flush()
    return model, recorded


@pytest.mark.parametrize("arch", ["llama", "opt", "mistral"])
def test_row_groups_see_the_in_place_points(arch):
    """OPT ties its embedding and LM head: one parameter, one z at both uses."""
    start = dict(build_tiny_model(arch).named_parameters())
    a, _ = run(arch, "in_place", 3)
    b, _ = run(arch, "in_forward", 3)
    moved = max((pa - start[n]).abs().max().item() for n, pa in a.named_parameters())
    assert moved > 1e-5  # the steps did move the weights
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-3 * moved), n


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_losses_and_projected_gradients_match_in_place(arch):
    _, a = run(arch, "in_place", 3)
    _, b = run(arch, "in_forward", 3)
    for x, y in zip(a[0::2], b[0::2], strict=True):  # loss estimates
        assert x == pytest.approx(y, rel=1e-5)
    for x, y in zip(a[1::2], b[1::2], strict=True):  # projected gradients (l+ - l-) / 2 eps
        assert x == pytest.approx(y, rel=2e-3, abs=2e-3)


OPTIMIZERS = {
    "sign": {"rule": "sign"},
    "momentum": {"rule": "momentum"},
    "adam": {"rule": "adam"},
    "lozo": {"sampler": LowRankSampler(rank=2, resample_every=2)},
    "sparse": {"sampler": SparseSampler(0.5)},
    "block": {"sampler": BlockSampler()},
    "forward, q=2": {"estimator": "forward", "queries": 2},
    "fzoo, q=3": {"estimator": "fzoo", "queries": 3, "sampler": DenseSampler("rademacher")},
    "lezo": {"sampler": LayerSubsetSampler(0.5)},
    # its radii eps 2^-N amplify the rounding of a loss by 4^N: in fp32 the two paths' different
    # reduction orders (which vary by CPU) would decide the step, in fp64 they cannot
    "unbiased": {"estimator": "unbiased", "dtype": torch.float64},
    "lozo-m": {"rule": "lozo-m", "sampler": LowRankSampler(rank=2, resample_every=2)},
    "hizoo": {"rule": "hizoo", "estimator": "hizoo"},  # z scaled by the Hessian of the whole parameter
    "central, q=2, weight decay": {"queries": 2, "weight_decay": 0.1},
    "lazy": {"lazy": True},
    "zo fine-tuner": {"sampler": ScaledSampler({n: 0.5 + 0.5 * (i % 3) for i, (n, _) in
                                                enumerate(build_tiny_model("llama").named_parameters())})},
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_rule_and_sampler_matches_in_place(name):
    start = dict(build_tiny_model("llama", dtype=OPTIMIZERS[name].get("dtype", torch.float32)).named_parameters())
    a, ra = run("llama", "in_place", 2, **OPTIMIZERS[name])
    b, rb = run("llama", "in_forward", 2, **OPTIMIZERS[name])
    assert all(x == pytest.approx(y, rel=1e-5) for x, y in zip(ra[0::2], rb[0::2], strict=True))
    moved = max((pa - start[n]).abs().max().item() for n, pa in a.named_parameters())
    assert moved > 1e-4
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-3 * moved), n


LR_CONS = 1e-2  # it takes some steps (k = 1) and refuses others (k = 0)


def test_conservative_takes_the_in_place_steps_choices():
    """ZO-SGD-Cons: the two trial points theta -/+ lr g_hat as one closure(2) lead to the same choice of
    step at every step as the in-place walk (an lr at which it sometimes refuses the step) and so to the
    same weights."""
    start = dict(build_tiny_model("llama").named_parameters())
    models, choices = [], []
    for perturb in ("in_place", "in_forward"):
        model = build_tiny_model("llama")
        opt = zo_scale.ZOConservative(model.named_parameters(), lr=LR_CONS, eps=1e-3, seed=3, model=model,
                                      perturb=perturb, kernel="eager")
        closure = closures(model)[perturb == "in_forward"]
        taken = []
        for _ in range(8):
            opt.step(closure)
            taken.append(opt.last_record.conservative)
        models.append(model)
        choices.append(taken)
    assert choices[0] == choices[1] and len(set(choices[0])) > 1, choices
    moved = max((pa - start[n]).abs().max().item() for n, pa in models[0].named_parameters())
    assert moved > 1e-4
    for (n, pa), (_, pb) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-3 * moved), n


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_with_master_weights_the_points_are_the_same_and_so_is_every_bit(arch):
    """In place, a master copy sets each point to round(theta + c z): the copy the forward makes. Each
    module then sees the same B rows at the same weights (an nn.Linear through the kernel F.linear
    runs, with or without bias), so both steps agree bit for bit."""
    a, ra = run(arch, "in_place", 3, master_weights=True)
    b, rb = run(arch, "in_forward", 3, master_weights=True)
    assert ra == rb
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


def test_bf16_weights_come_back_bit_for_bit_at_lr_0():
    start = build_tiny_model("llama", dtype=torch.bfloat16).state_dict()
    stays, _ = run("llama", "in_forward", 10, dtype=torch.bfloat16, lr=0.0)
    drifts, _ = run("llama", "in_place", 10, dtype=torch.bfloat16, lr=0.0)
    assert all(torch.equal(stays.state_dict()[k], v) for k, v in start.items())
    assert not all(torch.equal(drifts.state_dict()[k], v) for k, v in start.items())  # the round trip drifts


def test_stored_weights_never_move_during_the_forward_and_forwards_are_restored():
    model = build_tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    seen = []
    opt = zo_scale.ZOSGD(model.named_parameters(), lr=1e-3, model=model, perturb="in_forward")

    def closure(groups):
        out = losses(model, groups)
        seen.append(all(torch.equal(p, before[n]) for n, p in model.named_parameters()))
        return out

    opt.step(closure)
    assert seen == [True]
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(losses(model, 2)[0], losses(model, 2)[1])  # outside the step: plain forwards


def test_only_the_optimizers_parameters_are_perturbed():
    model = build_tiny_model("llama")
    frozen = dict(model.named_parameters())["model.embed_tokens.weight"]
    names = {p: n for n, p in model.named_parameters() if p is not frozen}
    direction = zo_scale.core.directions.DenseDirection(7)
    with perturbed_forward(model, names, [[(direction, 1e-2)], [(direction, -1e-2)]]):
        wrapped = [n for n, m in model.named_modules() if "forward" in m.__dict__]
    assert "model.embed_tokens" not in wrapped and "model.layers.0.self_attn.q_proj" in wrapped


@pytest.mark.parametrize("direction", [DenseDirection(7), LowRankDirection(seed=7, v_seed=8, rank=2)],
                         ids=["dense", "lowrank"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_greedy_decoding_of_stacked_row_groups_decodes_each_point(arch, direction, monkeypatch):
    """Greedy decoding with a KV cache over prompts stacked K = 3 times, inside the perturbed forward: group k
    decodes what the model moved to point k decodes alone (each row's cache is its own, every decoding step
    runs group k at point k). Along LOZO's directions no Linear or Embedding weight is copied at any step (OPT's
    learned positions are: a subclass with a forward of its own)."""
    copied = []
    copies = perturbed_forward_module.perturbed_copies
    monkeypatch.setattr(perturbed_forward_module, "perturbed_copies",
                        lambda shard, *a, **k: copied.append(shard) or copies(shard, *a, **k))
    prompts = [IDS[i, : 6 + 5 * i].tolist() for i in range(3)]  # lengths 6, 11, 16: left-padded
    groups = [[(direction, 0.05)], [(direction, -0.05)], []]
    model = build_tiny_model(arch).eval()
    with perturbed_forward(model, {p: n for n, p in model.named_parameters()}, groups):
        stacked = greedy_decode(model, prompts * 3, pad_id=0, max_new_tokens=6)
    alone = []
    for moves in groups:
        moved = build_tiny_model(arch).eval()
        for n, p in moved.named_parameters():
            sweep_shard(whole_param_shard(p, n), after=moves)
        alone += greedy_decode(moved, prompts, pad_id=0, max_new_tokens=6)
    assert stacked == alone
    assert stacked[:3] != stacked[3:6]  # the points decode differently: the groups did see their own
    matrices = {shard.name for shard in copied if len(shard.shape) == 2}
    if isinstance(direction, LowRankDirection):
        assert copied and matrices <= {"model.decoder.embed_positions.weight"}
    else:
        assert "lm_head.weight" in matrices or "model.decoder.embed_tokens.weight" in matrices


def test_bad_closures_and_settings_fail_loudly():
    model = build_tiny_model("llama")
    opt = zo_scale.ZOSGD(model.named_parameters(), lr=1e-3, model=model, perturb="in_forward")
    with pytest.raises(ValueError, match=r"K = 2 row groups' losses, shape \(2,\); got shape \(\)"):
        opt.step(lambda groups: losses(model, groups).mean())
    with pytest.raises(ValueError, match="'model.embed_tokens' got 3 rows.*must stack its batch 2 times"):
        opt.step(lambda groups: model(input_ids=IDS[:3]).logits[:2, 0, 0])  # 3 rows: not stacked
    assert not any("forward" in m.__dict__ for m in model.modules())  # restored after the error
    params = model.named_parameters()
    with pytest.raises(ValueError, match="unknown perturb"):
        zo_scale.ZOSGD(params, perturb="copy", model=model)
    with pytest.raises(ValueError, match="needs model="):
        zo_scale.ZOSGD(model.named_parameters(), perturb="in_forward")
    with pytest.raises(ValueError, match="'jvp' evaluates no perturbed points"):
        zo_scale.ZOOptimizer(model.named_parameters(), perturb="in_forward", estimator="jvp", model=model)
    with pytest.raises(ValueError, match="HiZOO rule scales each perturbation by its Hessian, which a sharded"):
        zo_scale.HiZOO(model.named_parameters(), perturb="in_forward", model=model,
                       shard_fn=lambda p, name: whole_param_shard(p, name))  # as a ZeRO-3 backend passes its own


def test_a_forward_someone_else_wrapped_still_runs_per_row_group():
    """An instance-level forward (e.g. an accelerate hook's) is kept: each row group goes through it,
    and it is back in place after the step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    calls = []
    inner = model[2].forward

    def hooked(x):
        calls.append(x.shape[0])
        return inner(x)

    model[2].forward = hooked
    x = torch.randn(6, 8)
    opt = zo_scale.ZOSGD(model.named_parameters(), lr=1e-2, model=model, perturb="in_forward", kernel="eager")
    opt.step(lambda groups: model(x.repeat(groups, 1)).view(groups, -1).pow(2).mean(1))
    assert calls == [6, 6]  # once per row group, on that group's rows
    assert model[2].forward is hooked


LANDS_IN_FORWARD = {  # rules without per-element state: the lazy update lands on each parameter in the forward
    "sgd": {},
    "sign": {"rule": "sign"},
    "lozo": {"sampler": LowRankSampler(rank=2, resample_every=2)},
    "sparse": {"sampler": SparseSampler(0.5)},
    "block": {"sampler": BlockSampler()},
    "forward, q=2, weight decay": {"estimator": "forward", "queries": 2, "weight_decay": 0.1},
    "fzoo, q=3": {"estimator": "fzoo", "queries": 3, "sampler": DenseSampler("rademacher")},
    "lezo": {"sampler": LayerSubsetSampler(0.5)},
}


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("name", list(LANDS_IN_FORWARD))
def test_the_lazy_update_landed_in_the_forward_equals_the_update_pass_bit_for_bit(arch, name, monkeypatch):
    """The update of step t applied to each parameter as its module runs in step t+1's forward (OPT: the
    tied embedding / LM head once, at its first use) gives the same weights and records, bit for bit,
    as the separate update pass at the end of step t. (LOZO's matrices hold their lazy updates in windows
    instead, test_pending_window.py: here each one lands.)"""
    monkeypatch.setattr(zo_scale.ZOOptimizer, "_holding", lambda self, directions: False)
    a, ra = run(arch, "in_forward", 4, **LANDS_IN_FORWARD[name])
    b, rb = run(arch, "in_forward", 4, lazy=True, **LANDS_IN_FORWARD[name])
    assert ra == rb
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


def test_the_lazy_update_is_stored_once_per_parameter_and_reaches_parameters_the_forward_skips():
    """``store_fn`` sees each parameter once per step, from the second step on (the first has no
    pending update), and none that the forward never runs; a parameter the forward skips is still
    updated, by the sweep after it; with a stateful rule nothing is stored in the forward."""
    def stores(rule):
        model = build_tiny_model("llama")
        model.unused = torch.nn.Linear(4, 3, bias=False)  # owned by the model, never called by its forward
        torch.nn.init.zeros_(unused := model.unused.weight)
        named = list(model.named_parameters())
        stored = []
        opt = zo_scale.ZOOptimizer(named, lr=1e-3, seed=3, model=model, perturb="in_forward", lazy=True, rule=rule,
                                   store_fn=lambda p, n: stored.append(n))
        for _ in range(3):
            opt.step(lambda groups: losses(model, groups))
        opt.flush()
        return stored, unused, len(named)

    stored, unused, count = stores("sgd")
    assert len(stored) == 2 * (count - 1) and len(set(stored)) == count - 1 and "unused.weight" not in stored
    assert unused.abs().max() > 0  # updated all the same
    assert stores("momentum")[0] == []


@pytest.mark.parametrize(("arch", "rule", "dtype"), [("llama", "sgd", torch.float32), ("opt", "sign", torch.float32),
                                                     ("llama", "sgd", torch.bfloat16)])
def test_pending_steps_store_every_nth_step_and_keep_every_bit(arch, rule, dtype):
    """pending_steps=3: only the forwards of steps 3 and 6 store the parameters (the updates of steps 0-2, then
    3-5), each parameter once; the losses, projected gradients and weights equal those of the run that stores
    every step, bit for bit (each update lands by a sweep of its own, on a transient copy in between; in bf16
    too). A parameter the forward never reads gets them from the sweeps after the storing forwards; the flush
    lands the updates still due."""
    def run(pending_steps):
        model = build_tiny_model(arch, dtype=dtype)
        model.unused = torch.nn.Linear(4, 3, bias=False, dtype=dtype)  # never called: updated by the sweep after
        torch.nn.init.zeros_(model.unused.weight)
        stored, records = [], []
        opt = zo_scale.ZOOptimizer(model.named_parameters(), lr=1e-2, seed=3, model=model, perturb="in_forward",
                                   lazy=True, rule=rule, pending_steps=pending_steps,
                                   store_fn=lambda p, name: stored.append((opt.step_count, name)))
        for _ in range(7):
            records += [opt.step(lambda groups: losses(model, groups)), opt.last_record.grads]
        opt.flush()
        return model, records, stored

    model, records, stored = run(3)
    reference, expected, every_step = run(1)
    names = {n for n, _ in model.named_parameters()} - {"unused.weight"}
    assert sorted(stored) == sorted((t, n) for t in (3, 6) for n in names)
    assert sorted(every_step) == sorted((t, n) for t in range(1, 7) for n in names)
    assert records == expected
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters(), strict=True))
    assert model.unused.weight.abs().max() > 0


def test_pending_steps_need_updates_that_land_in_the_forward():
    model = build_tiny_model("llama")
    for kwargs in ({}, {"perturb": "in_forward"}, {"perturb": "in_forward", "lazy": True, "rule": "momentum"}):
        with pytest.raises(ValueError, match="pending_steps=2 lands updates inside the forward: it needs"):
            zo_scale.ZOOptimizer(model.named_parameters(), model=model, pending_steps=2, **kwargs)
    with pytest.raises(ValueError, match="LOZO holds its matrices' updates in pending windows"):
        zo_scale.LOZO(model.named_parameters(), model=model, perturb="in_forward", lazy=True, pending_steps=2)
    with pytest.raises(ValueError, match="pending_steps must be >= 1"):
        zo_scale.ZOOptimizer(model.named_parameters(), pending_steps=0)


def test_a_closure_that_raises_mid_forward_still_lands_the_whole_update():
    model = build_tiny_model("llama")
    reference = build_tiny_model("llama")
    opts = [zo_scale.ZOSGD(m.named_parameters(), lr=1e-3, seed=3, model=m, perturb="in_forward", lazy=lazy)
            for m, lazy in ((model, True), (reference, False))]
    for opt, m in zip(opts, (model, reference), strict=True):
        opt.step(lambda groups, m=m: losses(m, groups))

    def half_a_forward(groups):
        model.model.norm(model.model.embed_tokens(IDS.repeat(groups, 1)))  # two modules land it
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        opts[0].step(half_a_forward)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters(), strict=True))


@pytest.mark.parametrize("perturb", ["in_place", "in_forward"])
def test_every_write_is_bracketed_by_writing_and_no_forward_runs_inside_it(perturb):
    """``writing`` (ZeRO-3 orders DeepSpeed's gather stream by it) is entered around every pass that writes
    the stored weights: each sweep, and in_forward's stores, which the sweep after the forward closes; no
    closure runs inside it, and every store lands between a forward's start and the bracket that closes it."""
    import contextlib

    model = build_tiny_model("llama")
    events = []

    @contextlib.contextmanager
    def writing():
        events.append("enter")
        yield
        events.append("exit")

    def forward(*groups):  # in_place: closure(); in_forward: closure(K)
        events.append("forward")
        return losses(model, groups[0]) if groups else losses(model, 1)[0]

    opt = zo_scale.ZOSGD(model.named_parameters(), lr=1e-3, seed=3, model=model, perturb=perturb, lazy=True,
                         writing=writing, store_fn=lambda p, n: events.append("store"))
    for _ in range(3):
        opt.step(forward)
    opt.flush()
    depth = 0
    for event in events:
        depth += {"enter": 1, "exit": -1}.get(event, 0)
        assert depth in (0, 1)
        assert event != "forward" or depth == 0
    assert depth == 0
    bracketed = "".join({"enter": "(", "exit": ")", "forward": "f", "store": "s"}[e] for e in events)
    if perturb == "in_place":  # lazy: the step's first move carries the last update, then -2 eps z
        assert bracketed == "()f()f" + "()f()f" * 2 + "()"
    else:  # the first step has nothing to land; later ones store inside the forward, closed by the sweep after it
        stores = "s" * len(list(model.parameters()))
        assert bracketed == "f" + f"f{stores}()" * 2 + "()"


def test_a_matrix_larger_than_a_copy_window_gives_the_whole_copys_outputs_a_block_of_rows_at_a_time(monkeypatch):
    """An Embedding's and a Linear's weight over BLOCKED_BYTES are copied a block of rows at a time, every
    block's K copies within the window: the embedding's outputs are the whole copies' bit for bit, the
    linear layer's equal them to its products' rounding; a small matrix still gets whole copies."""
    from zo_scale.core import flat_buckets, sweep

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(300, 16), "head": torch.nn.Linear(16, 300),
                                 "small": torch.nn.Linear(16, 8)})
    names = {p: n for n, p in model.named_parameters()}
    direction = zo_scale.core.directions.DenseDirection(7)
    groups = [[(direction, 1e-2)], [(direction, -1e-2)], []]
    ids = torch.randint(0, 300, (6, 5), generator=gen)  # 3 row groups of 2 rows
    x = torch.randn(6, 5, 16, generator=gen)

    def outputs():
        copied = []

        def make_copies(p, name, span):
            whole = whole_param_shard(p, name)
            out = sweep.perturbed_copies(whole if span is None else whole.narrow(*span), groups)
            copied.append((name, span, sum(c.numel() * c.element_size() for c in out if c is not p.data.view(-1))))
            return out

        with torch.no_grad(), perturbed_forward(model, names, groups, make_copies=make_copies):
            return (model["embed"](ids), model["head"](x), model["small"](x)), copied

    whole, whole_copies = outputs()
    window = 300 * 16 * 4 // 3  # the two 300 x 16 fp32 weights are over it, the 8 x 16 one is not
    monkeypatch.setattr(flat_buckets, "COPY_WINDOW_BYTES", window)
    monkeypatch.setattr(perturbed_forward_module, "BLOCKED_BYTES", window)
    blocks, block_copies = outputs()
    assert torch.equal(blocks[0], whole[0])
    assert torch.allclose(blocks[1], whole[1], rtol=1e-6, atol=1e-6) and torch.equal(blocks[2], whole[2])
    spans = {name: [span for n, span, _ in block_copies if n == name] for name in names.values()}
    for name in ("embed.weight", "head.weight"):
        assert len(spans[name]) > 3 and spans[name][0][0] == 0 and spans[name][-1][1] == 300 * 16
        assert all(a[1] == b[0] for a, b in zip(spans[name], spans[name][1:], strict=False))  # contiguous, in order
    assert spans["small.weight"] == [None] and spans["head.bias"] == [None]
    assert max(size for _, span, size in block_copies if span) <= window < max(size for *_, size in whole_copies)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_steps_with_the_embedding_and_head_copied_by_blocks_follow_the_whole_copies(arch, monkeypatch):
    """Lazy in_forward steps whose embedding and LM head (tied in OPT) are copied a block at a time: the
    update lands once per step on them (in a pass before the first block), the projected gradients follow
    the whole copies' to the linear layers' rounding, and the weights with them."""
    from zo_scale.core import flat_buckets, optimizer

    whole_model, whole = run(arch, "in_forward", 3, lazy=True)
    monkeypatch.setattr(flat_buckets, "COPY_WINDOW_BYTES", 1 << 15)  # under the 259 x 64 fp32 embedding
    monkeypatch.setattr(perturbed_forward_module, "BLOCKED_BYTES", 1 << 15)
    blocked = set()

    def perturbed_copies(shard, *args):
        if shard.flat.numel() < shard.full_numel:
            blocked.add(shard.name)
        return real(shard, *args)

    real = optimizer.perturbed_copies
    monkeypatch.setattr(optimizer, "perturbed_copies", perturbed_copies)
    block_model, blocks = run(arch, "in_forward", 3, lazy=True)
    assert blocked == {"model.embed_tokens.weight", "lm_head.weight"} if arch == "llama" else \
        {"model.decoder.embed_tokens.weight"}  # OPT ties its head to the embedding
    grads = [[g for gs in r[1::2] for g in gs] for r in (blocks, whole)]
    assert grads[0] == pytest.approx(grads[1], rel=1e-3)
    start = build_tiny_model(arch).parameters()
    moved = max((p - q).abs().max().item() for p, q in zip(whole_model.parameters(), start, strict=True))
    for (n, p), q in zip(block_model.named_parameters(), whole_model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-3 * moved), n
