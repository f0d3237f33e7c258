"""Sweep work per step: kernel calls, aten ops and host reads of a ZO step's own passes, per tensor vs flat buckets.

On a GPU every aten op on a device tensor is a kernel launch and every compiled call pays dynamo's guards
and a launch (0.1 to 0.3 ms), so a step whose sweeps issue one call per tensor spends more time launching
than computing at 7B. This counts, on an OPT-125m-shaped model (``OPTForCausalLM(OPTConfig())``, 196
tensors, random init, eval mode, fp32, a 1 x ``--seq`` batch), the work of one steady ZO-SGD step (lr 1e-6,
eps 1e-3, lazy) under the torch profiler, minus that of the step's own forwards run alone:

    per tensor, in_place     ZOSGD(..., lazy=True, flat=False): one compiled call per tensor of >= 64K
                             elements, the eager chunked sweep for smaller ones (the sweep before buckets)
    flat buckets, in_place   ZOSGD(..., lazy=True, kernel="compiled"): parameters as views of flat buckets
                             (zo_scale.core.flat_buckets), one compiled call per bucket and pass (on a GPU
                             'auto' does this; on a CPU it keeps the per-tensor sweep, which compiles less)
    per tensor, in_forward   perturb='in_forward', flat=False: each parameter's K copies made at its use
    flat buckets, in_forward perturb='in_forward', kernel="compiled": the copies of a window of consecutive
                             parameters at once

Subtracted: two forwards of the same closure (in_place), one forward of the stacked closure (in_forward),
each under torch.no_grad. Every variant's weights after its steps are compared with the per-tensor run of
the same perturb, bit for bit. Run:

    .venv/bin/python benchmarks/sweep_work.py            # about 4 min on a 2-core CPU (mostly compiles)

Writes benchmarks/results/sweep_work.{json,png}.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import common
import torch

import zo_scale
from zo_scale.core import flat_buckets

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seq", type=int, default=32)
parser.add_argument("--steps", type=int, default=3, help="steps before the counted one (the first compiles)")
args = parser.parse_args()
LR, EPS = 1e-6, 1e-3

ids = common.lm_batch(1, args.seq)
model_bytes = sum(p.numel() * p.element_size() for p in common.opt_125m("fp32").parameters())


def variant(perturb: str, flat: bool) -> tuple[torch.nn.Module, zo_scale.ZOOptimizer, Callable[[], object],
                                               Callable[[], object]]:
    """A fresh model and optimizer; the step to count and the forwards it contains, run alone."""
    model = common.opt_125m("fp32")
    opt = zo_scale.ZOSGD(model.named_parameters(), lr=LR, eps=EPS, lazy=True, perturb=perturb, model=model, flat=flat,
                         kernel="compiled" if flat else None)  # on a CPU 'auto' keeps the per-tensor sweep
    if perturb == "in_place":
        def closure() -> torch.Tensor:
            return model(input_ids=ids, labels=ids).loss

        def forwards() -> None:
            with torch.no_grad():
                closure()
                closure()
        return model, opt, lambda: opt.step(closure), forwards

    def stacked(groups: int) -> torch.Tensor:
        return common.stacked_lm_losses(model, ids, groups)

    def forward() -> None:
        with torch.no_grad():
            stacked(2)
    return model, opt, lambda: opt.step(stacked), forward


results: dict[str, dict[str, object]] = {}
finals: dict[str, list[torch.Tensor]] = {}
for perturb in ("in_place", "in_forward"):
    for flat in (False, True):
        label = f"{'flat buckets' if flat else 'per tensor'}, {perturb}"
        model, opt, step, forwards = variant(perturb, flat)
        for _ in range(args.steps):
            step()
        work = common.work_per_step(step, model_bytes)
        alone = common.work_per_step(forwards, model_bytes)
        opt.flush()
        finals[label] = [p.detach().clone() for p in model.parameters()]
        reference = finals[f"per tensor, {perturb}"]
        row = {key: work[key] - alone[key] for key in ("aten_ops", "zo_kernel_calls", "host_reads")}
        row.update(zo_bytes_per_model_bytes=work["zo_bytes_per_model_bytes"], buckets=len(opt.buckets),
                   equal_to_per_tensor=all(torch.equal(a, b) for a, b in zip(finals[label], reference, strict=True)))
        results[label] = row
        print(f"{label:26s} {row}")

settings = {"model": "OPTForCausalLM(OPTConfig()) random init, eval mode, fp32",
            "tensors": len(finals["per tensor, in_place"]), "batch": [1, args.seq], "rule": "ZO-SGD", "lazy": True,
            "lr": LR, "eps": EPS, "steps_before_the_counted_one": args.steps,
            "max_bucket_bytes": flat_buckets.MAX_BUCKET_BYTES, "copy_window_bytes": flat_buckets.COPY_WINDOW_BYTES}
notes = ["aten_ops, zo_kernel_calls (compiled sweep calls), host_reads (aten::_local_scalar_dense): the counted "
         "step minus its forwards run alone (common.work_per_step).",
         "equal_to_per_tensor: every weight after the steps equals the per-tensor run's, bit for bit."]
common.write_json("sweep_work", settings, results, notes)

fig, axes = common.new_figure(9.0, 3.8, ncols=2)
labels = list(results)
for ax, key, title in ((axes[0], "aten_ops", "aten ops per step (log)"),
                       (axes[1], "zo_kernel_calls", "compiled sweep calls per step")):
    ax.barh(labels, [results[label][key] for label in labels])
    ax.set_title(title)
    if key == "aten_ops":
        ax.set_xscale("log")
    for y, label in enumerate(labels):
        ax.annotate(str(results[label][key]), (results[label][key], y), va="center", fontsize=8)
axes[1].set_yticklabels([])
fig.suptitle(f"ZO sweep work per step, OPT-125m shape, fp32 ({common.machine_label()})", fontsize=10)
common.save_figure(fig, "sweep_work")
