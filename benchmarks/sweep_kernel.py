"""Sweep kernel: the compiled one-kernel-per-shard sweep vs the eager reference, vs a plain add_.

Part 1, time. Over one tensor of ``--numel`` elements (default 16M) in fp32 and bf16, the median
wall time (round-robin, after a warmup that also compiles) of:

    plain add_                 x.add_(y), y a stored tensor of the same size: the memory-bound floor (baseline)
    eager add_noise_ normal    zo_scale.core.noise.add_noise_(x, "normal", ..., kernel="eager")   (64K chunks)
    compiled add_noise_ normal the same with kernel="compiled" (one torch.compile kernel)
    ... rademacher             the same two with Rademacher signs
    2 perturbed copies         perturb='in_forward''s pass over a parameter: theta + eps z and theta - eps z into
                               2 new tensors (compiled), theta only read
    update, then 2 copies      lazy ZO-SGD's last update landed by a sweep, then the copies: two passes
    update and 2 copies ...    the same in one pass (perturbed_copies(..., update)): what the optimizer runs

reported as ratios to plain add_ (1.0: z costs nothing beyond the read-modify-write of x).

Part 2, work per sweep. One steady-state lazy ZO-SGD sweep (restore + update + next perturbation:
two directions), one ZO-Adam sweep, one LOZO perturbation (rank 2, on a square matrix) and one
SparseZO sweep over a shard of ``--count-numel``
elements, under torch.profiler: aten ops per 64K chunk (eager; on a GPU each is a kernel launch),
host syncs (``aten::_local_scalar_dense``: each host read of a value, .item() or bool()), compiled graph
calls and inductor kernels per shard, and with ``--device cuda`` the CUDA kernel launches.

Part 3, the noise format. The same compiled noise-add (fp32) with a candidate 32-bit counter hash in
place of SplitMix64 (two rounds of a 32-bit finalizer over the counter's low and high words, one
hash per element, 16 bits for the table index or 1 bit for a sign; defined here, not in the
library), to see whether a 32-bit generator would be worth a new noise format.

Run:
    .venv/bin/python benchmarks/sweep_kernel.py                  # 16M elements, 7 repeats (about 2 min on 2 cores)
    .venv/bin/python benchmarks/sweep_kernel.py --device cuda    # on a GPU (benchmarks/gpu_check.py runs this)
    .venv/bin/python benchmarks/sweep_kernel.py --quick          # smoke run: 1M elements, 2 repeats

Writes benchmarks/results/sweep_kernel_<device>[_quick].{json,png}.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import common
import torch
from torch._inductor import metrics as inductor_metrics
from torch.profiler import ProfilerActivity, profile

from zo_scale.core import noise
from zo_scale.core.directions import DenseDirection, LowRankDirection, SparseDirection
from zo_scale.core.shards import ParamShard
from zo_scale.core.sweep import Update, perturbed_copies, sweep_shard
from zo_scale.core.updates import SGD, Adam

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--numel", type=int, default=1 << 24)
parser.add_argument("--count-numel", type=int, default=1 << 20, help="shard size for the op counts (16 chunks)")
parser.add_argument("--repeats", type=int, default=7)
parser.add_argument("--device", default="cpu")
parser.add_argument("--quick", action="store_true", help="1M elements, 2 repeats")
args = parser.parse_args()
if args.quick:
    args.numel, args.repeats = 1 << 20, 2
device = torch.device(args.device)
name = f"sweep_kernel_{device.type}" + ("_quick" if args.quick else "")
SEED, STREAM, EPS = 1234, 7, 1e-3


def synchronized(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


# -----------------------------------------------------------------------------
# part 1: time per pass over one tensor, as a ratio to a plain add_


def in_forward_passes(x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """What perturb='in_forward' (lazy ZO-SGD) does to one parameter per step, compiled: the 2 perturbed
    copies alone; the last step's update landed by a sweep, then the copies (two passes); both in one pass."""
    shard = ParamShard(x, "w", STREAM, x, 0, torch.Size([x.numel()]))
    last, now = DenseDirection(noise.derive_seed(SEED, 1)), DenseDirection(noise.derive_seed(SEED, 2))
    groups = [[(now, 1e-9)], [(now, -1e-9)]]
    update = Update(SGD(), [(last, 0.5)], 1e-9, 0.0)
    state = SGD().init_state(shard)
    return {"2 perturbed copies": lambda: perturbed_copies(shard, groups, "compiled"),
            "update, then 2 copies (2 passes)": lambda: (
                sweep_shard(shard, update=update, state=state, kernel_mode="compiled"),
                perturbed_copies(shard, groups, "compiled")),
            "update and 2 copies in 1 pass": lambda: perturbed_copies(shard, groups, "compiled", update, state)}


time_results: dict[str, dict[str, object]] = {}
for dtype_name in common.DTYPES:
    dtype = common.torch_dtype(dtype_name)
    x = torch.randn(args.numel, device=device).to(dtype)
    y = torch.randn(args.numel, device=device).to(dtype)
    methods = {"plain add_": synchronized(lambda x=x, y=y: x.add_(y, alpha=1e-9))}
    for kind in noise.KINDS:
        for mode in ("eager", "compiled"):
            methods[f"{mode} add_noise_ {kind}"] = synchronized(
                lambda x=x, kind=kind, mode=mode: noise.add_noise_(x, kind, SEED, STREAM, 0, 1e-9, kernel=mode))
    methods.update({label: synchronized(run) for label, run in in_forward_passes(x).items()})
    timings = common.time_interleaved(methods, warmup=1, repeats=args.repeats)
    base = timings["plain add_"].median_s
    for label, t in timings.items():
        time_results[f"{dtype_name} {label}"] = {"median_s": t.median_s, "times_s": t.times_s,
                                                 "ratio_vs_plain_add": t.median_s / base,
                                                 "elements_per_s": args.numel / t.median_s}
        print(f"{dtype_name} {label:32s} {t.median_s * 1e3:8.2f} ms  x{t.median_s / base:.2f} vs plain add_")

# -----------------------------------------------------------------------------
# part 2: what one sweep issues, per chunk (eager) and per shard (compiled)


def sweep_case(case: str, flat: torch.Tensor) -> Callable[[str], None]:
    shard = ParamShard(flat, "w", STREAM, flat, 0, torch.Size([flat.numel()]))
    now, then = DenseDirection(noise.derive_seed(SEED, 1)), DenseDirection(noise.derive_seed(SEED, 2))
    if case == "sgd lazy":  # restore from theta - eps z_t, update along z_t, then theta + eps z_(t+1)
        update = Update(SGD(), [(now, 0.5)], 1e-6, 0.0)
        return lambda mode: sweep_shard(shard, [(now, EPS)], update, [(then, EPS)], kernel_mode=mode)
    if case == "adam":
        rule = Adam()
        state = rule.init_state(shard)
        update = Update(rule, [(now, 0.5)], 1e-6, 0.0)
        return lambda mode: sweep_shard(shard, [(now, EPS)], update, [(then, EPS)], state, kernel_mode=mode)
    if case == "lozo":  # U V^T / sqrt(r) on a square matrix of count_numel elements, rank 2
        side = int(flat.numel() ** 0.5)
        matrix = ParamShard(flat, "w", STREAM, flat[: side * side], 0, torch.Size([side, side]))
        low_rank = LowRankDirection(noise.derive_seed(SEED, 5), noise.derive_seed(SEED, 6), 2)
        return lambda mode: sweep_shard(matrix, after=[(low_rank, EPS)], kernel_mode=mode)
    sparse = SparseDirection(noise.derive_seed(SEED, 3), noise.derive_seed(SEED, 4), 0.75)
    return lambda mode: sweep_shard(shard, after=[(sparse, EPS)], kernel_mode=mode)


def count(run: Callable[[], None]) -> dict[str, int]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    run()  # warm: compiled, tables cached
    inductor_metrics.reset()
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    aten = sum(e.count for e in events if e.key.startswith("aten::"))
    out = {"aten_ops": aten, "host_syncs": sum(e.count for e in events if e.key in common.SYNC_OPS),
           "compiled_graph_calls": sum(e.count for e in events if e.key.startswith("## Call CompiledFxGraph"))}
    if device.type == "cuda":
        out["cuda_kernel_launches"] = sum(e.count for e in events if e.key == "cudaLaunchKernel"
                                          or e.key == "cuLaunchKernel" or e.key == "cuLaunchKernelEx")
    return out


def kernels_in_graph(run: Callable[[], None]) -> int:
    """Inductor kernels generated for this sweep's graph (compiled fresh, so the count is its own)."""
    torch._dynamo.reset()
    inductor_metrics.reset()
    run()
    return inductor_metrics.generated_kernel_count


chunks = -(-args.count_numel // noise.CHUNK)
count_results: dict[str, dict[str, object]] = {}
for case in ("sgd lazy", "adam", "lozo", "sparse"):
    flat = torch.zeros(args.count_numel, device=device)
    run = sweep_case(case, flat)
    eager = count(lambda run=run: run("eager"))
    row: dict[str, object] = {"eager": eager, "eager_aten_ops_per_chunk": eager["aten_ops"] / chunks,
                              "eager_host_syncs_per_chunk": eager["host_syncs"] / chunks}
    row["compiled"] = count(lambda run=run: run("compiled"))
    row["compiled_kernels_per_shard"] = kernels_in_graph(lambda run=run: run("compiled"))
    count_results[case] = row
    print(f"{case:9s} eager: {row['eager_aten_ops_per_chunk']:.1f} aten ops and "
          f"{row['eager_host_syncs_per_chunk']:.1f} host syncs per 64K chunk"
          + f"; compiled: {row['compiled']} per shard, {row['compiled_kernels_per_shard']} inductor kernel(s)")

# -----------------------------------------------------------------------------
# part 3: a 32-bit counter hash in place of SplitMix64, same kernel shape (fp32)

MASK32 = 0xFFFFFFFF


def int32(value: int) -> int:
    value &= MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


def finalize32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit multiply-xorshift finalizer on int32 (shifts masked to act as logical shifts)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * int32(0x7FEB352D)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * int32(0x846CA68B)
    return x ^ ((x >> 16) & 0xFFFF)


def hash32(index: torch.Tensor, key0: int, key1: int) -> torch.Tensor:
    return finalize32(finalize32(index.to(torch.int32) ^ key0) ^ (index >> 32).to(torch.int32) ^ key1)


def add_32bit(kind: str) -> Callable[..., torch.Tensor]:
    def add(x: torch.Tensor, table: torch.Tensor, key0: int, key1: int, start: int) -> torch.Tensor:
        index = torch.arange(x.numel(), dtype=torch.int64, device=x.device) + start
        h = hash32(index, key0, key1)
        z = table[(h & 0xFFFF).to(torch.int64)] if kind == "normal" else ((h & 1) * 2 - 1).float()
        return x.copy_(x.float() + 1e-9 * z)

    return torch.compile(add, dynamic=True)


x = torch.randn(args.numel, device=device)
y = torch.randn(args.numel, device=device)
lookup = noise.table("normal", torch.float32, device)
keys32 = (int32(noise.stream_key(SEED, STREAM)), int32(noise.stream_key(SEED, STREAM) >> 32))
candidates = {"plain add_": synchronized(lambda: x.add_(y, alpha=1e-9))}
for kind in noise.KINDS:
    candidates[f"splitmix64 {kind}"] = synchronized(
        lambda kind=kind: noise.add_noise_(x, kind, SEED, STREAM, 0, 1e-9, kernel="compiled"))
    add32 = add_32bit(kind)
    candidates[f"32-bit hash {kind}"] = synchronized(lambda add32=add32: add32(x, lookup, *keys32, 0))
timings = common.time_interleaved(candidates, warmup=1, repeats=args.repeats)
format_results = {label: {"median_s": t.median_s, "times_s": t.times_s,
                          "ratio_vs_plain_add": t.median_s / timings["plain add_"].median_s}
                  for label, t in timings.items()}
for label, row in format_results.items():
    print(f"format fp32 {label:24s} x{row['ratio_vs_plain_add']:.2f} vs plain add_")

settings = {"numel": args.numel, "count_numel": args.count_numel, "chunks_per_count_shard": chunks,
            "device": str(device), "repeats": args.repeats, "warmup": 1, "noise_chunk_elements": noise.CHUNK,
            "timing": "round-robin, median of repeats; the warmup pass also compiles", "quick": args.quick}
notes = ["ratio_vs_plain_add: median time / median time of x.add_(y) over the same number of elements.",
         "aten_ops: every aten op the profiler saw in one sweep (eager: per chunk divide by chunks); on a GPU "
         "each is a kernel launch or a host-side op. compiled_graph_calls: calls into the compiled graph.",
         "compiled_kernels_per_shard: inductor's generated_kernel_count for the sweep's graph.",
         "host_syncs count every .item() the profiler saw; the rule's step counter is a CPU tensor, so on a GPU "
         "those are host reads, not device syncs.",
         "noise_format_fp32: the compiled noise-add with SplitMix64 (the format) vs a candidate 32-bit hash."]
results = {"time": time_results, "work_per_sweep": count_results, "noise_format_fp32": format_results}
print("wrote", common.write_json(name, settings, results, notes))

fig, ax = common.new_figure()
labels = list(time_results)
common.hbar_with_ratios(ax, labels, [time_results[k]["median_s"] * 1e3 for k in labels],
                        [[s * 1e3 for s in time_results[k]["times_s"]] for k in labels],
                        [time_results[k]["ratio_vs_plain_add"] for k in labels],
                        ["tab:gray" if "plain" in k else "tab:orange" if "eager" in k else "tab:blue" for k in labels])
ax.set_xlabel("ms per pass (bar: median, dots: repeats; lower is better)")
ax.set_title(f"Noise-add over {args.numel / 1e6:.0f}M elements on {device.type}: compiled (blue) vs eager (orange)\n"
             f"xN: ratio to a plain add_ of the same size (gray)\n{common.machine_label()}", fontsize=10)
print("wrote", common.save_figure(fig, name))
