"""Peak memory of LOZO's step inside the forward, low-rank points in the matmul vs weight copies, vs inference.

Model: ``OPTForCausalLM(OPTConfig())`` (OPT-125m's shape, random init, eval mode, fp32). For K = 2 (q 1, batch
8 x 128) and K = 32 (q 16, batch 1 x 128), each in a fresh process:

    inference       one forward over the batch stacked K times under torch.no_grad, with the per-group LM loss
                    (common.stacked_lm_losses): the memory the step's own forward needs
    lowrank         zo_scale.LOZO(rank=2, nu=50, lazy=True, perturb='in_forward'): every Linear and Embedding
                    weight at its K points inside the matmul / lookup (zo_scale.core.lowrank_forward)
    copies          the same with the low-rank path switched off (perturbed_forward.low_rank_only answering no):
                    K transient copies of each module's weights while it runs

How (CPU, Linux): the child builds the model, runs 2 steps (or forwards: the first steps compile the sweep
kernels, whose compiler memory is not the step's), records its RSS, resets the peak-RSS counter
(``/proc/self/clear_refs``), runs 2 more and reads the peak RSS; above_model = peak - RSS before them.
Ratio: above_model of each ZO variant / that of inference at the same K.

Run (2-core CPU, about 8 min):
    .venv/bin/python benchmarks/lowrank_memory.py

Writes benchmarks/results/lowrank_memory.{json,png}.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import common

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
args = parser.parse_args()
CASES = {"K=2": (1, 8), "K=32": (16, 1)}  # queries, batch rows
KINDS = ("inference", "lowrank", "copies")
SEQ, LR, EPS = 128, 1e-6, 1e-3


def measure(kind: str, queries: int, batch: int) -> dict[str, float]:
    import torch

    import zo_scale
    from zo_scale.core import perturbed_forward

    model = common.opt_125m("fp32")
    ids = common.lm_batch(batch, SEQ)
    groups = 2 * queries
    if kind == "inference":
        def op() -> None:
            with torch.no_grad():
                common.stacked_lm_losses(model, ids, groups)
    else:
        if kind == "copies":
            perturbed_forward.low_rank_only = lambda moves: False
        zo = zo_scale.LOZO(model.named_parameters(), lr=LR, eps=EPS, rank=2, nu=50, queries=queries, lazy=True,
                           perturb="in_forward", model=model)
        op = lambda: zo.step(lambda k: common.stacked_lm_losses(model, ids, k))  # noqa: E731
    for _ in range(2):  # steady state: the first steps compile their sweep kernels (compiler memory)
        op()
    gc.collect()
    model_rss = common.rss_mib()
    common.reset_peak_rss()
    for _ in range(2):
        op()
    peak = common.peak_rss_mib()
    return {"model_rss_mib": model_rss, "peak_mib": peak, "above_model_mib": peak - model_rss}


if args.child:
    print(json.dumps(measure(**json.loads(args.child))))
    sys.exit(0)

results: dict[str, dict[str, object]] = {}
for case, (queries, batch) in CASES.items():
    row: dict[str, object] = {"queries": queries, "batch": batch, "rows": 2 * queries * batch}
    for kind in KINDS:
        row[kind] = m = common.run_child(Path(__file__), ["--child", json.dumps(
            {"kind": kind, "queries": queries, "batch": batch})])
        print(f"{case:5s} {kind:9s} peak {m['peak_mib']:7.0f} MiB, above model {m['above_model_mib']:7.0f} MiB",
              flush=True)
    base = row["inference"]["above_model_mib"]
    row["ratios_above_model_vs_inference"] = {k: row[k]["above_model_mib"] / base for k in ("lowrank", "copies")}
    print(f"{case:5s} " + "  ".join(f"{k} x{v:.3f}" for k, v in row["ratios_above_model_vs_inference"].items()))
    results[case] = row

settings = {"model": "OPTForCausalLM(OPTConfig()) random init, eval mode", "dtype": "fp32", "seq": SEQ,
            "cases": {k: {"queries": q, "batch": b} for k, (q, b) in CASES.items()}, "rank": 2, "nu": 50,
            "lr": LR, "eps": EPS, "lazy": True, "warmup_steps": 2, "steps": 2,
            "measure": "fresh process per (case, kind); peak = ru_maxrss over 2 steps after 2 warmup steps, counter "
                       "reset via /proc/self/clear_refs before them; above_model = peak - VmRSS before them"}
notes = ["MiB = 2**20 bytes. The model's fp32 weights are 478 MiB; OPT's tied embedding / LM head (154 MB) is the "
         "largest tensor.",
         "inference: one forward over the K stacked copies of the batch with the per-group loss, under torch.no_grad."]
print("wrote", common.write_json("lowrank_memory", settings, results, notes))

fig, ax = common.new_figure()
width = 0.25
colors = {"inference": "tab:gray", "lowrank": "tab:blue", "copies": "tab:olive"}
for i, kind in enumerate(KINDS):
    xs = [j + (i - 1) * width for j in range(len(CASES))]
    bars = ax.bar(xs, [results[c][kind]["above_model_mib"] for c in CASES], width, label=kind, color=colors[kind])
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
ax.set_xticks(range(len(CASES)), [f"{c} ({results[c]['rows']} x {SEQ} rows)" for c in CASES])
ax.set_ylabel("peak RSS above the model, MiB (lower is better)")
ax.legend(fontsize=8)
ax.set_title(f"LOZO step inside the forward: peak memory, OPT-125m shape, fp32\n{common.machine_label()}",
             fontsize=10)
print("wrote", common.save_figure(fig, "lowrank_memory"))
