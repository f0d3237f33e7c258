"""Step time: one ZO step vs the two forward passes it cannot avoid, on an OPT-125m-shaped model.

Model: ``OPTForCausalLM(OPTConfig())`` (OPT-125m's shape, random init, eval mode) in ``--dtype``.
Batch: ``--batch`` x ``--seq`` random token ids, one fixed batch; loss = the model's LM loss
(``model(input_ids=ids, labels=ids).loss``). Timed (wall clock, median of ``--repeats`` after one
warmup; the variants are timed round-robin, each on its own copy of the model):

    (a) 2 forwards       two forward passes under torch.inference_mode()                  (baseline)
    (b) ZO eager         zo_scale.ZOSGD(model.named_parameters(), lr=1e-6, eps=1e-3).step(closure): the
                         library's defaults (kernel 'auto': one compiled kernel per shard of >= 64K elements)
    (b') ZO eager, eager kernel  the same with kernel="eager": the chunked tensor-op reference sweep
    (c) ZO lazy          the same as (b) with lazy=True; the warmup step makes the timed ones steady state
    (c') ZO lazy, buckets  the same with kernel="compiled": parameters in flat buckets, one sweep kernel call per
                         bucket instead of one per tensor (zo_scale.core.flat_buckets; a GPU's 'auto' does this,
                         a CPU's 'auto' keeps the per-tensor sweep)
    (d) ZO lazy rad.     ZOOptimizer(..., sampler=DenseSampler("rademacher"), lazy=True)
    (e) MeZO reference   the published MeZO step (mezo_reference.py): 4 passes over the named parameters
                         (+eps z, -2 eps z, +eps z, update), each regenerating z with torch.normal from a
                         torch.Generator reseeded with the step's seed, applied with p.data.add_(z, alpha=...)
    (f) ZO in_forward    ZOSGD(..., perturb="in_forward", model=m, lazy=True): one forward over the batch
                         stacked twice, each module landing the last update on its weights and running row
                         group k with a transient perturbed copy of them; the closure is
                         common.stacked_lm_losses (per-row LM loss, averaged per group)

The warmup step also compiles the sweep kernels. Each is reported as a ratio to (a): 1.0 would mean
the parameter passes cost nothing. A ZO step
does the same 2 forwards plus passes over the 125M parameters (eager: 3, lazy: 2, MeZO: 4), so
ratio - 1 is the price of the perturb / restore / update passes. ``sweep_work_per_step``: the work of one
more step of each in-place variant minus that of two forwards of the same closure under torch.no_grad
(the step's own forwards): aten ops (each a kernel launch on a GPU), compiled sweep calls, host reads.
``--profile`` adds a cProfile of one eager step (top functions by own time) to the JSON.

Run (2-core CPU: a forward at 16 x 128 takes about 5 s in fp32, so the full run takes
about 5 min in fp32 and 3 min in bf16 with 5 repeats):
    .venv/bin/python benchmarks/step_time.py                  # fp32, batch 16 x 128, 5 repeats
    .venv/bin/python benchmarks/step_time.py --dtype bf16     # bf16 (this AVX512-BF16 CPU: about 2x faster forwards)
    .venv/bin/python benchmarks/step_time.py --profile        # also profile one eager ZO step
    .venv/bin/python benchmarks/step_time.py --quick          # smoke run: batch 4 x 64, 2 repeats

Writes benchmarks/results/step_time_<dtype>[_quick].{json,png}.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
from collections.abc import Callable

import common
import torch
import torch.profiler
from mezo_reference import MeZOReference

import zo_scale
from zo_scale.core import noise

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dtype", choices=common.DTYPES, default="fp32")
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--seq", type=int, default=128)
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--profile", action="store_true", help="cProfile one eager ZO step, top functions to the JSON")
parser.add_argument("--quick", action="store_true", help="batch 4 x 64, 2 repeats")
args = parser.parse_args()
if args.quick:
    args.batch, args.seq, args.repeats = 4, 64, 2
name = f"step_time_{args.dtype}" + ("_quick" if args.quick else "")
LR, EPS, SEED = 1e-6, 1e-3, 0

# -----------------------------------------------------------------------------
# model and batch

model = common.opt_125m(args.dtype)
ids = common.lm_batch(args.batch, args.seq)
numel = sum(p.numel() for p in model.parameters())
print(f"OPT-125m shape, {numel / 1e6:.1f}M params, {args.dtype}, batch {args.batch} x {args.seq}, "
      f"{torch.get_num_threads()} threads")


def lm_loss(m: torch.nn.Module) -> torch.Tensor:
    return m(input_ids=ids, labels=ids).loss


# -----------------------------------------------------------------------------
# the variants, each on its own copy of the model (a lazy optimizer leaves its model mid-step)


def two_forwards(m: torch.nn.Module) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            lm_loss(m)
            lm_loss(m)

    return run


def optimizer_step(m: torch.nn.Module, opt: zo_scale.ZOOptimizer | MeZOReference) -> Callable[[], None]:
    return lambda: opt.step(lambda: lm_loss(m))


def new_copy() -> torch.nn.Module:
    return copy.deepcopy(model)


m_eager, m_ref, m_lazy, m_buckets, m_rad, m_mezo, m_fwd = (new_copy() for _ in range(7))
opt_f = zo_scale.ZOSGD(m_fwd.named_parameters(), lr=LR, eps=EPS, perturb="in_forward", model=m_fwd, lazy=True)
variants: dict[str, Callable[[], None]] = {
    "(a) 2 forwards": two_forwards(model),
    "(b) ZO eager": optimizer_step(m_eager, zo_scale.ZOSGD(m_eager.named_parameters(), lr=LR, eps=EPS)),
    "(b') ZO eager, eager kernel": optimizer_step(m_ref, zo_scale.ZOSGD(m_ref.named_parameters(), lr=LR, eps=EPS,
                                                                        kernel="eager")),
    "(c) ZO lazy": optimizer_step(m_lazy, zo_scale.ZOSGD(m_lazy.named_parameters(), lr=LR, eps=EPS, lazy=True)),
    "(c') ZO lazy, buckets": optimizer_step(m_buckets, zo_scale.ZOSGD(m_buckets.named_parameters(), lr=LR, eps=EPS,
                                                                      lazy=True, kernel="compiled")),
    "(d) ZO lazy rademacher": optimizer_step(m_rad, zo_scale.ZOOptimizer(
        m_rad.named_parameters(), lr=LR, eps=EPS, sampler=zo_scale.DenseSampler("rademacher"), lazy=True)),
    "(e) MeZO reference": optimizer_step(m_mezo, MeZOReference(m_mezo, LR, EPS)),
    "(f) ZO in_forward": lambda: opt_f.step(lambda groups: common.stacked_lm_losses(m_fwd, ids, groups)),
}
# (f): one pass that lands the last update and writes 2 perturbed copies (read theta, write theta and 2 copies)
passes = {"(a) 2 forwards": 0, "(b) ZO eager": 3, "(b') ZO eager, eager kernel": 3, "(c) ZO lazy": 2,
          "(c') ZO lazy, buckets": 2,
          "(d) ZO lazy rademacher": 2, "(e) MeZO reference": 4, "(f) ZO in_forward": 1}

# -----------------------------------------------------------------------------
# measure

timings = common.time_interleaved(variants, warmup=1, repeats=args.repeats)
base = timings["(a) 2 forwards"].median_s
results: dict[str, object] = {}
for label, t in timings.items():
    results[label] = {
        "median_s": t.median_s,
        "times_s": t.times_s,
        "ratio_vs_2_forwards": t.median_s / base,
        "ratio_of_fastest_repeats": min(t.times_s) / min(timings["(a) 2 forwards"].times_s),
        "overhead_vs_2_forwards_s": t.median_s - base,
        "parameter_passes": passes[label],
    }
    print(f"{label:24s} {t.median_s:7.2f} s  x{t.median_s / base:.3f}  (times {[round(x, 2) for x in t.times_s]})")

# -----------------------------------------------------------------------------
# work per step: what a GPU pays per launch, per sync and per byte, counted on one more step of each variant

MEZO_BYTES = 16  # (e) outside the sweep, by its code: 4 passes, each writes z, reads theta and z, writes theta
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
for label, run in variants.items():
    w = results[label]["work_per_step"] = common.work_per_step(run, model_bytes)
    if label.startswith("(e)"):
        w["zo_bytes_per_model_bytes"] = MEZO_BYTES
    print(f"{label:24s} {w['aten_ops']:6d} aten ops, {w['zo_kernel_calls']:4d} compiled ZO kernel calls, "
          f"{w['host_reads']:4d} host reads; its ZO passes move {w['zo_bytes_per_model_bytes']:.2f}x the model's bytes")


def two_forwards_no_grad() -> None:  # what an in-place step's own forwards cost, to subtract
    with torch.no_grad():
        lm_loss(m_lazy)
        lm_loss(m_lazy)


forwards_work = common.work_per_step(two_forwards_no_grad, model_bytes)
for label in variants:
    if label.startswith(("(b", "(c", "(d")):
        w = results[label]["work_per_step"]
        results[label]["sweep_work_per_step"] = {key: w[key] - forwards_work[key]
                                                 for key in ("aten_ops", "zo_kernel_calls", "host_reads")}
        print(f"{label:24s} sweeps: {results[label]['sweep_work_per_step']}")

profile: list[dict[str, object]] = []
if args.profile:  # one eager ZO step (the model has had its warmup), top functions by own time
    profiler = cProfile.Profile()
    profiler.runcall(variants["(b) ZO eager"])
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]  # type: ignore[attr-defined]
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in rows:
        profile.append({"function": f"{func} ({file.split('site-packages/')[-1]}:{line})", "ncalls": ncalls,
                        "tottime_s": tottime, "cumtime_s": cumtime})
        print(f"  {tottime:7.3f} s own  {cumtime:7.3f} s cum  {ncalls:7d} calls  {profile[-1]['function']}")
    results["profile_eager_step"] = profile

settings = {
    "model": "OPTForCausalLM(OPTConfig()) random init, eval mode",
    "numel": numel,
    "dtype": args.dtype,
    "batch": args.batch,
    "seq": args.seq,
    "loss": "model(input_ids=ids, labels=ids).loss, random ids, one fixed batch",
    "lr": LR,
    "eps": EPS,
    "warmup_steps": 1,
    "repeats": args.repeats,
    "timing": "round-robin over the variants, median of repeats, each variant on its own model copy",
    "noise_chunk_elements": noise.CHUNK,
    "sweep_kernel": {label: ("eager" if "eager kernel" in label else "compiled" if "buckets" in label else "auto")
                     for label in variants
                     if label.startswith(("(b", "(c", "(d", "(f"))},
    "quick": args.quick,
}
notes = [
    "ratio_vs_2_forwards: median step time / median time of 2 forwards under torch.inference_mode().",
    "ratio_of_fastest_repeats: the same with the fastest repeat of each: less hurt by other processes.",
    "ZO steps run their forwards under torch.no_grad() (the optimizer's contract), not inference_mode.",
    "parameter_passes: passes over all parameters per step (lazy: steady state); (f)'s one pass reads theta and "
    "writes theta and its 2 copies.",
    "work_per_step, counted on one more step of each variant: aten_ops, every aten op the profiler saw (the "
    "forwards' included; on a GPU each op on a device tensor is a kernel launch); zo_kernel_calls, calls of the "
    "compiled sweep kernel (one launch each; shards under 64K elements run the eager chunks on the CPU); "
    "host_reads, every read of a tensor's value on the host (aten::_local_scalar_dense): one per loss evaluated "
    "((f): one for all groups) plus one per updated parameter tensor of the rule's step counter, a 0-dim CPU "
    "tensor (no device sync on a GPU); zo_bytes_per_model_bytes, the bytes the ZO passes read and write over "
    "the model's bytes (the forwards' reads of the weights not counted; (f) also copies the tied embedding "
    "at the LM head; (e) by its code, 4 passes of 4x, not counted).",
]
print("wrote", common.write_json(name, settings, results, notes))

# -----------------------------------------------------------------------------
# plot: seconds per step, ratio to 2 forwards on each bar

fig, ax = common.new_figure()
common.step_times(ax, timings, base, ["tab:gray", "tab:blue", "tab:olive", "tab:blue", "tab:blue", "tab:orange"])
ax.set_title(f"ZO step time vs 2 forwards: OPT-125m shape, {args.dtype}, batch {args.batch} x {args.seq}\n"
             f"xN: median ratio to (a) 2 forwards under inference_mode\n{common.machine_label()}", fontsize=10)
print("wrote", common.save_figure(fig, name))
