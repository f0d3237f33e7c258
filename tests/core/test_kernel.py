"""The compiled sweep (one kernel per shard) equals the eager reference bit for bit, and compiles once."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import zo_scale
from zo_scale.core import kernel, noise
from zo_scale.core.optimizer import ZOOptimizer


def model_and_loss(dtype):
    torch.manual_seed(0)
    # odd sizes: shards that are not multiples of 4 (normal words), 64 (sign words) or a SIMD width
    model = torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5)).to(dtype)
    x, y = torch.randn(32, 13, dtype=dtype), torch.randn(32, 5, dtype=dtype)
    return model, (lambda m: (m(x) - y).float().pow(2).mean())


OPTIMIZERS = {  # the per-tensor kernel (flat=False): flat buckets have their own tests (test_flat_buckets.py)
    "sgd": lambda p, k: zo_scale.ZOSGD(p, lr=1e-2, kernel=k, flat=False),
    "sgd-q3-wd-lazy": lambda p, k: zo_scale.ZOSGD(p, lr=1e-2, queries=3, weight_decay=0.1, lazy=True, kernel=k,
                                                  flat=False),
    "momentum": lambda p, k: zo_scale.ZOSGD(p, lr=1e-2, momentum=0.9, kernel=k, flat=False),
    "sign": lambda p, k: zo_scale.ZOSignSGD(p, lr=1e-3, kernel=k, flat=False),
    "adam-wd": lambda p, k: zo_scale.ZOAdam(p, lr=1e-3, weight_decay=0.01, kernel=k, flat=False),
    "rademacher-forward": lambda p, k: ZOOptimizer(p, lr=1e-2, estimator="forward", queries=2, kernel=k, flat=False,
                                                   sampler=zo_scale.DenseSampler("rademacher")),
    "conservative": lambda p, k: zo_scale.ZOConservative(p, lr=1e-2, kernel=k, flat=False),
    "block": lambda p, k: zo_scale.BlockZO(p, lr=1e-2, queries=2, kernel=k, flat=False),
    "lozo-m": lambda p, k: zo_scale.LOZOM(p, lr=1e-3, rank=2, nu=2, kernel=k, flat=False),
    "lozo-lazy": lambda p, k: zo_scale.LOZO(p, lr=1e-2, rank=3, nu=2, lazy=True, kernel=k, flat=False),
    "sparse": lambda p, k: zo_scale.SparseZO(p, lr=1e-2, sparsity=0.5, kernel=k, flat=False),
    "master-adam": lambda p, k: zo_scale.ZOAdam(p, lr=1e-3, master_weights=True, lazy=True, kernel=k, flat=False),
    "hizoo": lambda p, k: zo_scale.HiZOO(p, lr=1e-3, alpha=0.1, kernel=k, flat=False),  # H^-1/2 z made in the kernel
    "ardd": lambda p, k: zo_scale.ARDD(p, lr=1e-2, dimension=8, kernel=k, flat=False),
    "zo-fine-tuner": lambda p, k: zo_scale.ZOFineTuner(p, {"0.weight": 2.0, "0.bias": 0.3, "2.weight": 0.7,
                                                           "2.bias": 1.5}, lr=1e-2, kernel=k, flat=False),
}


def train(name, dtype, mode, steps=4):
    model, loss = model_and_loss(dtype)
    opt = OPTIMIZERS[name](model.named_parameters(), mode)
    losses = [opt.step(lambda: loss(model)) for _ in range(steps)]
    opt.flush()
    return model, losses, opt.state_dict()


# the master copy is for 16-bit weights only. fp16 rounds through the same casts as bf16 (each a kernel of its
# own to compile): checked for the rules with state, decay or a master copy, not again for every direction
FP16 = ("adam-wd", "master-adam", "sgd-q3-wd-lazy")
CASES = [(n, d) for n in sorted(OPTIMIZERS) for d in (torch.float32, torch.bfloat16, torch.float16)
         if not (n.startswith("master") and d == torch.float32) and (d != torch.float16 or n in FP16)]


@pytest.mark.parametrize("name,dtype", CASES)
def test_compiled_steps_equal_eager_bitwise(name, dtype):
    eager, eager_losses, eager_state = train(name, dtype, "eager")
    fused, fused_losses, fused_state = train(name, dtype, "compiled")
    assert fused_losses == eager_losses
    for (n, p), q in zip(fused.named_parameters(), eager.parameters(), strict=True):
        assert torch.equal(p, q), n
    for index, buffers in eager_state["state"].items():
        for key, value in buffers.items():
            assert torch.equal(fused_state["state"][index][key], value), (index, key)
    assert not torch.equal(fused[0].weight, model_and_loss(dtype)[0][0].weight)  # it moved


@pytest.mark.parametrize("kind", noise.KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise_compiled_equals_eager_on_random_slices(kind, dtype):
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        start = int(torch.randint(0, 1 << 40, (1,), generator=gen))
        n = int(torch.randint(1, 200_000, (1,), generator=gen))
        x = torch.randn(n, generator=gen).to(dtype)
        a, b = x.clone(), x.clone()
        noise.add_noise_(a, kind, 5, 9, start, 0.3, kernel="eager")
        noise.add_noise_(b, kind, 5, 9, start, 0.3, kernel="compiled")
        assert torch.equal(a, b), (start, n)
        z = noise.generate(kind, 5, 9, start, n, dtype)
        assert torch.equal(a, (x.float() + 0.3 * z.float()).to(dtype))


def test_elementwise_noise_equals_generate():
    for kind in noise.KINDS:
        index = torch.arange(1_000_003, 1_070_001)
        key = noise.stream_key(3, 7)
        at = noise.at(kind, index, key, noise.table(kind, torch.float32, index.device)).float()
        assert torch.equal(at, noise.generate(kind, 3, 7, 1_000_003, index.numel()))


def test_every_direction_takes_the_compiled_path(monkeypatch):
    from zo_scale.core.directions import (
        BlockDirection,
        DenseDirection,
        FactorDirection,
        LowRankDirection,
        MagnitudeSampler,
        ScaledSampler,
        SparseDirection,
    )
    from zo_scale.core.shards import whole_param_shard
    from zo_scale.core.sweep import sweep_shard

    calls = []
    real_run = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *args, **kw: calls.append(args[2].specs) or real_run(*args, **kw))
    w = torch.randn(9, 7)
    shard = whole_param_shard(w, "w")
    low_rank = LowRankDirection(1, 2, 2)
    scaled = ScaledSampler({"w": 0.5})
    scaled.bind([shard])
    directions = {
        "dense": DenseDirection(3, "rademacher"),
        "lowrank": low_rank,
        "factor": FactorDirection(torch.randn(9, 2), low_rank.v(shard), shard.stream),
        "block": BlockDirection(DenseDirection(4), frozenset({shard.stream})),
        "sparse": SparseDirection(5, 6, 0.5),
        "magnitude": MagnitudeSampler(0.5).directions(7, 0, 1)[0],
        "scaled": scaled.directions(8, 0, 1)[0],
    }
    for d in directions.values():
        sweep_shard(shard, after=[(d, 1e-3)], kernel_mode="compiled")
    assert calls == [(("rademacher",),), (("lowrank", 2),), (("factor", 2),), (("normal",),), (("sparse", "normal"),),
                     (("magnitude", ("normal",)),), (("scaled", ("normal",)),)]


def test_no_recompiles_across_shapes_steps_and_seeds():
    torch._dynamo.reset()
    counters.clear()

    def run(sizes, seed):
        params = [(f"w{i}", torch.nn.Parameter(torch.randn(n))) for i, n in enumerate(sizes)]
        opt = zo_scale.ZOAdam(params, lr=1e-3, seed=seed, kernel="compiled", weight_decay=0.1, flat=False)
        for _ in range(3):
            opt.step(lambda: sum(p.sum() for _, p in params))

    run([1000, 3001, 70_001], seed=0)  # warm-up: each sweep shape compiles here, for small and large shards
    warm = counters["stats"]["unique_graphs"]
    run([77_777, 12_345, 5, 300_000], seed=9)  # new sizes, offsets, seeds, coefficients, steps
    assert counters["stats"]["unique_graphs"] == warm
    assert warm <= 8  # per plan and dtype: no shape- or value-specialized copies


def test_mode_comes_from_argument_then_environment(monkeypatch):
    monkeypatch.setenv(kernel.ENV, "eager")
    assert kernel.resolve(None) == "eager"
    assert kernel.resolve("compiled") == "compiled"
    assert not kernel.wants_compiled(None, torch.device("cpu"), 1 << 30)
    monkeypatch.delenv(kernel.ENV)
    assert kernel.resolve(None) == "auto"
    assert kernel.wants_compiled("auto", torch.device("cpu"), kernel.MIN_COMPILED_NUMEL)
    assert not kernel.wants_compiled("auto", torch.device("cpu"), kernel.MIN_COMPILED_NUMEL - 1)
    assert kernel.wants_compiled("auto", torch.device("meta"), 1)  # any accelerator: always compiled
    monkeypatch.setenv(kernel.ENV, "fast")
    with pytest.raises(ValueError, match=r"\$ZO_SCALE_KERNEL='fast' is not a sweep kernel mode"):
        kernel.resolve(None)
    with pytest.raises(ValueError, match="kernel='fused' is not a sweep kernel mode"):
        zo_scale.ZOSGD([torch.nn.Parameter(torch.ones(3))], kernel="fused")


def test_the_log_says_which_kernel_runs(caplog):
    with caplog.at_level(logging.INFO, logger="zo_scale.core.kernel"):
        kernel._announced.clear()
        zo_scale.ZOSGD([torch.nn.Parameter(torch.ones(3))], kernel="eager")
        zo_scale.ZOSGD([torch.nn.Parameter(torch.ones(3))], kernel="compiled")
    assert "eager tensor ops (reference)" in caplog.text
    assert "kernel per flat bucket of parameters, else per shard (inductor, C++/OpenMP)" in caplog.text


def test_an_accelerator_compiles_with_eager_rounding_and_the_cpu_as_before():
    gpu = kernel.compile_options("cuda", exact_casts=False)
    assert gpu["emulate_precision_casts"]  # in Triton: no fused multiply-add
    assert gpu["eager_numerics.division_rounding"] and gpu["eager_numerics.disable_ftz"]
    assert gpu["triton.autotune_pointwise"] is False  # no benchmarking on clones of the shard at the first call
    assert not kernel.compile_options("cpu", exact_casts=False)["emulate_precision_casts"]
    assert kernel.compile_options("cpu", exact_casts=True)["emulate_precision_casts"]
    for options in (gpu, kernel.compile_options("cpu", exact_casts=False)):
        assert options["cpp.enable_floating_point_contract_flag"] == "off"
        torch.compile(lambda x: x, options=options)  # inductor knows every key, with its type


def test_inductor_turns_the_options_into_no_fma_and_ieee_division():
    """What inductor's Triton and C++ code generation read (no GPU needed): with the options, Triton gets
    enable_fp_fusion=False and div_rn; without them, fusion and approximate division."""
    from torch._inductor import config, cpp_builder
    from torch._inductor.codegen.triton import TritonKernel, TritonOverrides

    class Fp32:  # a generated variable, as truediv sees it: a name with a dtype
        dtype = torch.float32

        def __init__(self, name):
            self.name = name

        def __str__(self):
            return self.name

    def generated():
        return TritonKernel.triton_meta_common(), TritonOverrides.truediv(Fp32("a"), Fp32("b"))

    with config.patch({"emulate_precision_casts": False, "eager_numerics.division_rounding": False}):
        meta, division = generated()
    assert meta["enable_fp_fusion"] and division == "(a / b)"
    with config.patch(kernel.compile_options("cuda", exact_casts=False)):
        meta, division = generated()
    assert not meta["enable_fp_fusion"] and meta["disable_ftz"] and division == "triton.language.div_rn(a, b)"
    compiler = cpp_builder.get_cpp_compiler()
    with config.patch({"cpp.enable_floating_point_contract_flag": "fast"}):  # as TORCHINDUCTOR_CPP_... sets it
        with config.patch(kernel.compile_options("cpu", exact_casts=False)):
            assert "ffp-contract=off" in cpp_builder._get_optimization_cflags(compiler)[0]


def test_each_sweep_compiles_with_the_options_of_its_device(monkeypatch):
    seen = []
    monkeypatch.setattr(kernel, "_compiled", {})
    monkeypatch.setattr(kernel, "_tallies", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw["options"]) or fn)  # runs uncompiled
    noise.add_noise_(torch.zeros(100), "normal", 1, 2, 0, 0.5, kernel="compiled")
    assert kernel.run("compiled", lambda plan: lambda t: None, "plan", torch.empty(3, device="meta"), numel=3)
    assert seen == [kernel.compile_options("cpu", False), kernel.compile_options("meta", False)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run benchmarks/gpu_check.py there)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_equals_cuda_eager_and_cpu(dtype):
    x = torch.randn(1_000_003).to(dtype)
    cpu = noise.add_noise_(x.clone(), "normal", 3, 4, 99, 0.25, kernel="eager")
    eager = noise.add_noise_(x.cuda(), "normal", 3, 4, 99, 0.25, kernel="eager")
    fused = noise.add_noise_(x.cuda(), "normal", 3, 4, 99, 0.25, kernel="compiled")
    assert torch.equal(eager, fused)
    assert torch.equal(eager.cpu(), cpu)  # the table lookup is exact: same z on every device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run benchmarks/gpu_check.py there)")
@pytest.mark.parametrize("name,dtype", [("sgd-q3-wd-lazy", torch.float32), ("sgd-q3-wd-lazy", torch.bfloat16),
                                        ("adam-wd", torch.float32), ("adam-wd", torch.bfloat16),
                                        ("hizoo", torch.float32), ("master-adam", torch.bfloat16)])
def test_cuda_steps_compiled_equal_eager(name, dtype):
    """fp32 shows what bf16's final rounding can hide: a fused multiply-add or an approximate division
    (compile_options turns both off)."""

    def run(mode):
        model, loss = model_and_loss(dtype)
        model = model.cuda()
        x = torch.randn(32, 13, dtype=dtype, device="cuda")
        opt = OPTIMIZERS[name](model.named_parameters(), mode)
        for _ in range(3):
            opt.step(lambda: model(x).float().pow(2).mean())
        opt.flush()
        return model

    for p, q in zip(run("eager").parameters(), run("compiled").parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_copies_compiled_equal_eager_and_a_master_sweep(dtype):
    from zo_scale.core.directions import DenseDirection, LowRankDirection, SparseDirection
    from zo_scale.core.shards import whole_param_shard
    from zo_scale.core.sweep import perturbed_copies, sweep_shard

    w = torch.randn(300, 257).to(dtype)
    shard = whole_param_shard(w, "w")
    before = w.clone()
    d = {"dense": DenseDirection(1), "sparse": SparseDirection(2, 3, 0.5), "lowrank": LowRankDirection(4, 5, 2)}
    groups = [[(d["dense"], 1e-2)], [(d["dense"], -1e-2)], [(d["sparse"], 0.5), (d["lowrank"], -0.25)], []]
    compiled = perturbed_copies(shard, groups, "compiled")
    eager = perturbed_copies(shard, groups, "eager")
    assert torch.equal(w, before)  # theta is only read
    assert compiled[3] is shard.flat and eager[3] is shard.flat  # no move: theta itself, no copy
    for moves, a, b in zip(groups[:3], compiled[:3], eager[:3], strict=True):
        assert torch.equal(a, b)
        moved = w.clone()
        sweep_shard(whole_param_shard(moved, "w"), master=w.view(-1).float(), offsets=moves, kernel_mode="eager")
        assert torch.equal(a, moved.view(-1))
        assert not torch.equal(a, shard.flat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["sgd", "sign"])
def test_copies_with_the_update_landed_in_the_same_pass_equal_the_update_then_the_copies(dtype, rule):
    """perturbed_copies(update=...) lands the update on theta and makes the copies from the updated,
    rounded theta in one pass: bit for bit a sweep_shard of the update followed by perturbed_copies, compiled
    and eager (in bf16/fp16 the copies must start from theta rounded, a rounding the compiler would fold)."""
    from zo_scale.core.directions import DenseDirection
    from zo_scale.core.shards import whole_param_shard
    from zo_scale.core.sweep import Update, perturbed_copies, sweep_shard
    from zo_scale.core.updates import make_rule

    torch.manual_seed(0)
    start = torch.randn(300, 257).to(dtype)
    old, new = DenseDirection(7), DenseDirection(8, "rademacher")
    groups = [[(new, 1e-2)], [(new, -1e-2)], []]
    results = {}
    for mode in ("eager", "compiled"):
        for fused in (True, False):
            w = start.clone()
            shard = whole_param_shard(w, "w")
            update = Update(make_rule(rule), [(old, 0.3)], lr=1e-2, weight_decay=0.1)
            state = update.rule.init_state(shard)
            if fused:
                copies = perturbed_copies(shard, groups, mode, update, state)
            else:
                sweep_shard(shard, update=update, state=state, kernel_mode=mode)
                copies = perturbed_copies(shard, groups, mode)
            assert copies[2] is shard.flat  # the group at theta reads the updated theta itself
            assert int(state["step"]) == 1
            results[mode, fused] = (w, copies)
    (w_ref, c_ref) = results["eager", False]
    assert not torch.equal(w_ref, start) and not torch.equal(c_ref[0], c_ref[1])
    for w, copies in results.values():
        assert torch.equal(w, w_ref)
        assert all(torch.equal(a, b) for a, b in zip(copies, c_ref, strict=True))
