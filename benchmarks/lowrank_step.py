"""LOZO's step inside the forward: low-rank points in the matmul (no weight copies) vs copies vs in place.

Model: ``OPTForCausalLM(OPTConfig())`` (OPT-125m's shape, random init, eval mode, fp32), one fixed batch of
``--batch`` x ``--seq`` random ids; each ZO variant is ``zo_scale.LOZO(rank=2, nu=50, lazy=True)`` with q
queries (K = 2q row groups). Timed round-robin (median of ``--repeats`` after two warmup steps: a lazy step's
second pass compiles a kernel of its own), each variant on its own copy of the model:

    (a) 1 forward, K x B rows     one plain forward over the batch stacked K times (torch.no_grad)   (baseline)
    (a') ... + the K losses       the same forward and the per-group LM losses the step's closure computes: the
                                  floor of an in_forward step (its closure at theta, no perturbation)
    (b) 2q forwards of B rows     what the in-place step's forwards cost
    (c) LOZO in_forward           perturb='in_forward': every Linear and Embedding weight at its K points
                                  by zo_scale.core.lowrank_forward (one product over all rows, each group's
                                  rank-r correction), no copies of them; 1-D parameters and OPT's learned
                                  positions by copies; the matrices' updates held in their pending windows
                                  (zo_scale.core.pending_window: stored once per nu steps)
    (c') ... each update landed   the same with every update landed on the weights in a pass of its own
                                  (``ZOOptimizer._holding`` answering no), as before the pending windows
    (d) LOZO in_forward, copies   the low-rank path switched off too (``perturbed_forward.low_rank_only``
                                  answering no): K transient copies of every weight, as before
    (e) LOZO in place             perturb='in_place': the weights moved to each point, 2q forwards

Ratios: every variant over (a), over (a') and over (b); per ZO variant the work of one more step (aten ops,
compiled sweep calls, host reads, bytes the ZO passes move). Peak memory: ``benchmarks/lowrank_memory.py``.

Run (2-core CPU, fp32):
    .venv/bin/python benchmarks/lowrank_step.py                        # batch 8 x 128, q 1, 3 repeats (~6 min)
    .venv/bin/python benchmarks/lowrank_step.py --queries 16 --batch 1 # K = 32 row groups of 1 x 128 (~15 min)
    .venv/bin/python benchmarks/lowrank_step.py --quick                # batch 2 x 32, 2 repeats

Writes benchmarks/results/lowrank_step_q<q>[_quick].{json,png}.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import common
import torch

import zo_scale
from zo_scale.core import perturbed_forward

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--seq", type=int, default=128)
parser.add_argument("--queries", type=int, default=1)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--quick", action="store_true", help="batch 2 x 32, 2 repeats")
args = parser.parse_args()
if args.quick:
    args.batch, args.seq, args.repeats = 2, 32, 2
name = f"lowrank_step_q{args.queries}" + ("_quick" if args.quick else "")
LR, EPS, RANK, NU = 1e-6, 1e-3, 2, 50
K = 2 * args.queries

model = common.opt_125m("fp32")
ids = common.lm_batch(args.batch, args.seq)
stacked = ids.repeat(K, 1)
print(f"OPT-125m shape, fp32, batch {args.batch} x {args.seq}, q {args.queries} (K = {K}), "
      f"{torch.get_num_threads()} threads")


def lozo(m: torch.nn.Module, perturb: str) -> zo_scale.ZOOptimizer:
    return zo_scale.LOZO(m.named_parameters(), lr=LR, eps=EPS, rank=RANK, nu=NU, queries=args.queries, lazy=True,
                         perturb=perturb, model=m if perturb == "in_forward" else None)


def one_stacked_forward() -> None:
    with torch.no_grad():
        model(input_ids=stacked)


def stacked_losses() -> None:
    with torch.no_grad():
        common.stacked_lm_losses(model, ids, K)


def separate_forwards() -> None:
    with torch.no_grad():
        for _ in range(K):
            model(input_ids=ids, labels=ids)


def in_forward(copies: bool, hold: bool) -> Callable[[], None]:
    m = copy.deepcopy(model)
    opt = lozo(m, "in_forward")

    def step() -> None:
        real, holding = perturbed_forward.low_rank_only, opt._holding
        if copies:  # the path before: K copies of every weight
            perturbed_forward.low_rank_only = lambda groups: False
        if not hold:  # each update landed on the weights, in a pass of its own
            opt._holding = lambda directions: False  # type: ignore[method-assign]
        try:
            opt.step(lambda groups: common.stacked_lm_losses(m, ids, groups))
        finally:
            perturbed_forward.low_rank_only = real
            opt._holding = holding  # type: ignore[method-assign]

    return step


m_place = copy.deepcopy(model)
opt_place = lozo(m_place, "in_place")
variants: dict[str, Callable[[], None]] = {
    f"(a) 1 forward, {K} x {args.batch} rows": one_stacked_forward,
    f"(a') ... + the {K} losses": stacked_losses,
    f"(b) {K} forwards of {args.batch} rows": separate_forwards,
    "(c) LOZO in_forward": in_forward(copies=False, hold=True),
    "(c') ... each update landed": in_forward(copies=False, hold=False),
    "(d) LOZO in_forward, copies": in_forward(copies=True, hold=False),
    "(e) LOZO in place": lambda: opt_place.step(lambda: m_place(input_ids=ids, labels=ids).loss),
}
labels = list(variants)
timings = common.time_interleaved(variants, warmup=2, repeats=args.repeats)  # the second step compiles too
stacked_s, losses_s, separate_s = (timings[label].median_s for label in labels[:3])
results = {}
for label, t in timings.items():
    results[label] = {"median_s": t.median_s, "times_s": t.times_s,
                      "ratio_vs_one_stacked_forward": t.median_s / stacked_s,
                      "ratio_vs_stacked_forward_and_losses": t.median_s / losses_s,
                      "ratio_vs_separate_forwards": t.median_s / separate_s}
    print(f"{label:32s} {t.median_s:7.2f} s  x{t.median_s / stacked_s:.3f} of (a)  x{t.median_s / losses_s:.3f} "
          f"of (a')  x{t.median_s / separate_s:.3f} of (b)  (times {[round(x, 2) for x in t.times_s]})")

# work per step, counted on one more step of each ZO variant: aten ops (launches on a GPU), compiled sweep calls,
# host reads, the bytes the ZO passes read and write over the model's
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
for label in labels[3:]:
    w = results[label]["work_per_step"] = common.work_per_step(variants[label], model_bytes)
    print(f"{label:32s} {w['aten_ops']:6d} aten ops, {w['zo_kernel_calls']:4d} compiled ZO kernel calls, "
          f"{w['host_reads']:4d} host reads; ZO passes move {w['zo_bytes_per_model_bytes']:.2f}x the model's bytes")

settings = {"model": "OPTForCausalLM(OPTConfig()) random init, eval mode", "dtype": "fp32", "batch": args.batch,
            "seq": args.seq, "queries": args.queries, "row_groups": K, "rank": RANK, "nu": NU, "lr": LR, "eps": EPS,
            "lazy": True, "warmup_steps": 2, "repeats": args.repeats, "quick": args.quick,
            "timing": "round-robin over the variants, median of repeats, each ZO variant on its own model copy"}
notes = ["ratio_vs_one_stacked_forward: median time / that of (a), one forward over the K stacked copies of the batch "
         "(the in_forward step's own forward, without the loss).",
         "ratio_vs_stacked_forward_and_losses: median time / that of (a'), the same forward and the K row groups' "
         "losses (common.stacked_lm_losses at theta): what every in_forward step computes.",
         "ratio_vs_separate_forwards: median time / that of (b), K forwards of the batch with the LM loss (the "
         "in-place step's forwards).",
         "The in_forward closure is common.stacked_lm_losses (per-row LM loss, averaged per group).",
         "work_per_step (common.work_per_step, one more step of each ZO variant): every aten op (the forward's "
         "included), compiled ZO kernel calls, host reads, and the bytes the ZO passes (sweeps and copies) read and "
         "write over the model's bytes; the low-rank corrections inside the forward are aten ops, not ZO passes."]
print("wrote", common.write_json(name, settings, results, notes))

fig, ax = common.new_figure()
common.step_times(ax, timings, stacked_s,
                  ["tab:gray", "tab:gray", "tab:gray", "tab:blue", "tab:cyan", "tab:olive", "tab:orange"])
ax.set_title(f"LOZO step vs forwards: OPT-125m shape, fp32, batch {args.batch} x {args.seq}, K = {K}\n"
             f"xN: median ratio to (a)\n{common.machine_label()}", fontsize=10)
print("wrote", common.save_figure(fig, name))
