"""Peak memory: a ZO step vs inference, and an FO AdamW step vs a ZO step, on an OPT-125m-shaped model.

Model: ``OPTForCausalLM(OPTConfig())`` (OPT-125m's shape, random init, eval mode: no dropout) in
``--dtype``; one fixed batch of ``--batch`` x seq random token ids, loss = the model's LM loss.
Measured ops, each run ``--steps`` times (the second step is steady state: AdamW's moments exist):

    inference   2 forwards under torch.inference_mode()
    zo          zo_scale.ZOSGD(model.named_parameters(), lr=1e-6, eps=1e-3).step(closure)   (in place)
    zo_in_forward  the same with perturb="in_forward": one forward over the batch stacked twice
                (closure: common.stacked_lm_losses), so twice the activations of one forward
    fo_adamw    loss.backward(); torch.optim.AdamW(model.parameters()).step(); zero_grad()

How (CPU, Linux): every (op, seq) runs in a fresh Python process (this script with ``--child``), so
peaks never mix. The child builds the model, records its RSS (VmRSS: "model RSS", which includes
Python + torch), resets the kernel's peak-RSS counter to the current RSS (``/proc/self/clear_refs``,
so the model build's transients do not count), runs the op, then reads the peak RSS with
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (VmHWM recorded as a cross-check). Reported:

    peak_mib          raw peak RSS of the process during the op
    above_model_mib   peak_mib - model RSS: what the op needs on top of the loaded model

Ratios: zo / inference (raw and above-model) and fo_adamw / zo (raw and above-model).

Run (2-core CPU: about 5 min at batch 8, seq 128 and 512):
    .venv/bin/python benchmarks/memory.py                 # fp32, batch 8, seq 128 and 512, 2 steps
    .venv/bin/python benchmarks/memory.py --quick         # smoke run: batch 2, seq 64 and 128, 1 step

Writes benchmarks/results/memory_<dtype>[_quick].{json,png}.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import common

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dtype", choices=common.DTYPES, default="fp32")
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512])
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--quick", action="store_true", help="batch 2, seq 64 and 128, 1 step")
parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
args = parser.parse_args()
if args.quick:
    args.batch, args.seqs, args.steps = 2, [64, 128], 1
KINDS = ("inference", "zo", "zo_in_forward", "fo_adamw")
LR_ZO, EPS_ZO, LR_FO = 1e-6, 1e-3, 1e-5

# -----------------------------------------------------------------------------
# child: one measurement in this fresh process


def measure(kind: str, batch: int, seq: int, dtype: str, steps: int) -> dict[str, float | bool]:
    import torch

    import zo_scale

    model = common.opt_125m(dtype)
    ids = common.lm_batch(batch, seq)
    loss = lambda: model(input_ids=ids, labels=ids).loss
    if kind == "inference":
        def op() -> None:
            with torch.inference_mode():
                loss()
                loss()
    elif kind == "zo":
        zo = zo_scale.ZOSGD(model.named_parameters(), lr=LR_ZO, eps=EPS_ZO)
        op = lambda: zo.step(loss)
    elif kind == "zo_in_forward":
        zo = zo_scale.ZOSGD(model.named_parameters(), lr=LR_ZO, eps=EPS_ZO, perturb="in_forward", model=model)
        op = lambda: zo.step(lambda groups: common.stacked_lm_losses(model, ids, groups))
    else:
        adamw = torch.optim.AdamW(model.parameters(), lr=LR_FO)  # moments allocated at the first step

        def op() -> None:
            loss().backward()
            adamw.step()
            adamw.zero_grad(set_to_none=True)

    gc.collect()
    model_rss = common.rss_mib()
    load_peak = common.peak_rss_mib()
    reset = common.reset_peak_rss()
    for _ in range(steps):
        op()
    peak = common.peak_rss_mib()
    return {"model_rss_mib": model_rss, "load_peak_mib": load_peak, "peak_reset": reset, "peak_mib": peak,
            "vmhwm_mib": common.hwm_mib(), "above_model_mib": peak - model_rss}


if args.child:
    print(json.dumps(measure(**json.loads(args.child))))
    sys.exit(0)

# -----------------------------------------------------------------------------
# parent: one child per (seq, op); this process imports no torch until the children are done

name = f"memory_{args.dtype}" + ("_quick" if args.quick else "")
results: dict[str, dict[str, object]] = {}
for seq in args.seqs:
    row: dict[str, object] = {}
    for kind in KINDS:
        spec = {"kind": kind, "batch": args.batch, "seq": seq, "dtype": args.dtype, "steps": args.steps}
        row[kind] = m = common.run_child(Path(__file__), ["--child", json.dumps(spec)])
        print(f"seq {seq:4d} {kind:9s} peak {m['peak_mib']:7.0f} MiB (VmHWM {m['vmhwm_mib']:7.0f})  "
              f"model {m['model_rss_mib']:6.0f} MiB  above model {m['above_model_mib']:7.0f} MiB", flush=True)
    inf, zo, fo, fwd = row["inference"], row["zo"], row["fo_adamw"], row["zo_in_forward"]
    row["ratios"] = {
        "zo_over_inference_raw": zo["peak_mib"] / inf["peak_mib"],
        "zo_over_inference_above_model": zo["above_model_mib"] / inf["above_model_mib"],
        "zo_in_forward_over_inference_raw": fwd["peak_mib"] / inf["peak_mib"],
        "zo_in_forward_over_inference_above_model": fwd["above_model_mib"] / inf["above_model_mib"],
        "fo_adamw_over_zo_raw": fo["peak_mib"] / zo["peak_mib"],
        "fo_adamw_over_zo_above_model": fo["above_model_mib"] / zo["above_model_mib"],
    }
    print(f"seq {seq:4d} " + "  ".join(f"{k} x{v:.2f}" for k, v in row["ratios"].items()), flush=True)
    # for reading the numbers: the fp32 logits of one forward (the LM loss makes a second tensor this size)
    row["logits_mib"] = args.batch * seq * 50272 * 4 / 2**20
    results[f"seq{seq}"] = row

settings = {
    "model": "OPTForCausalLM(OPTConfig()) random init, eval mode",
    "dtype": args.dtype,
    "batch": args.batch,
    "seqs": args.seqs,
    "steps_per_measurement": args.steps,
    "loss": "model(input_ids=ids, labels=ids).loss, random ids, one fixed batch",
    "zo": f"ZOSGD(lr={LR_ZO}, eps={EPS_ZO}), in place",
    "zo_in_forward": f"ZOSGD(lr={LR_ZO}, eps={EPS_ZO}, perturb='in_forward'), closure common.stacked_lm_losses",
    "fo": f"AdamW(lr={LR_FO}), zero_grad(set_to_none=True)",
    "measure": "fresh process per (seq, op); peak = ru_maxrss after the op, peak counter reset after model "
               "load via /proc/self/clear_refs; above_model = peak - VmRSS after model load",
    "quick": args.quick,
}
notes = [
    "MiB = 2**20 bytes. model_rss_mib includes the Python interpreter and torch (not only the weights: "
    "125.2M fp32 parameters are 478 MiB; AdamW's two moments + the gradients are 3 x that).",
    "logits_mib: batch x seq x vocab fp32 logits of one forward, for scale: with vocab 50272 they dominate "
    "the above-model peak of inference and ZO.",
]
print("wrote", common.write_json(name, settings, results, notes))

# -----------------------------------------------------------------------------
# plot: raw peak and above-model peak per op, grouped by seq

fig, axes = common.new_figure(11, 4.5, ncols=2)
width = 0.2
colors = {"inference": "tab:gray", "zo": "tab:blue", "zo_in_forward": "tab:cyan", "fo_adamw": "tab:red"}
for ax, key, title in ((axes[0], "peak_mib", "raw peak RSS"), (axes[1], "above_model_mib", "peak RSS above model")):
    for i, kind in enumerate(KINDS):
        xs = [j + (i - 1.5) * width for j in range(len(args.seqs))]
        ys = [results[f"seq{s}"][kind][key] for s in args.seqs]
        bars = ax.bar(xs, ys, width, label=kind, color=colors[kind])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(args.seqs)), [f"seq {s}" for s in args.seqs])
    ax.set_ylabel("MiB (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
ratio_text = "; ".join(
    f"seq {s}: ZO/inference x{results[f'seq{s}']['ratios']['zo_over_inference_above_model']:.2f}, "
    f"FO-AdamW/ZO x{results[f'seq{s}']['ratios']['fo_adamw_over_zo_above_model']:.2f}" for s in args.seqs)
fig.suptitle(f"Peak memory (peak RSS, fresh process per bar), OPT-125m shape, {args.dtype}, batch {args.batch}\n"
             f"above model: {ratio_text}\n{common.machine_label()}", fontsize=10)
print("wrote", common.save_figure(fig, name))
