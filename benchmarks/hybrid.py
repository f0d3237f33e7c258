"""Hybrid ZO-FO on an OPT-125m-shaped model: peak memory and step time as the FO part grows from 0 to 12 blocks.

Model: ``common.opt_125m()`` (OPT-125m's shape: 12 blocks, hidden 768, vocab 50272, lm_head tied to
the token embedding; random init, fp32, eval mode), one fixed batch of ``--batch`` x ``--seq`` random
token ids, loss = the model's LM loss. For k in ``--ks`` (``all`` = 12):

    k = 0     pure ZO: ZOSGD(lr=1e-6, eps=1e-3) over every parameter (2 forwards a step)
    0 < k     HybridOptimizer: the last k blocks + the final norm by AdamW(lr=1e-5), the rest (the
              tied embedding/head included) by ZOSGD: 1 forward + backward at theta, then the ZO pair
    k = all   pure FO: AdamW over every parameter (1 forward + backward a step, no ZO)
    k in_forward  for each k of ``--in-forward-ks``: the same with ZOSGD(perturb="in_forward"): the ZO
              pair is one forward over the batch stacked twice (closure: common.stacked_lm_losses)

Memory (each variant in a fresh process, as in ``memory.py``): build the model and optimizer, record
RSS, reset the peak-RSS counter (``/proc/self/clear_refs``), run ``--mem-steps`` steps (the second
is steady state: AdamW's moments exist), read ``ru_maxrss``. Also, during the FO pass of the last
step, the bytes autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``; each
storage counted once, parameters left out: they exist anyway). Baseline: one inference forward
(``torch.inference_mode()``) on the same batch.

Step time (one process, one model, every variant its own optimizer over it; taken round-robin, see
``common.time_interleaved``): median of ``--repeats`` after ``--warmup``. Baseline: 2 forwards under
``torch.inference_mode()`` (what a ZO step cannot do without). The in-place ZO optimizers are not lazy:
the hybrid flushes a lazy one before every FO pass, so lazy saves nothing there. The in_forward ones
are (``lazy=True``): the update lands in the FO pass's forward, with no pass of its own.

``--threads 1`` on a shared machine: a ZO sweep is thousands of small ops (64K-element noise chunks),
each an OpenMP parallel region; with 2 threads on 2 cores and another process busy, every region
waits for a descheduled thread. Measured here under such load: 3 sweeps over OPT-125m took 9-27 s
with 2 threads and 1.15 s with 1 (1.8 s with 2 threads on a quiet machine, see docs/benchmarks.md). Forwards
(a few large GEMMs) suffer far less, so 2-thread ratios on a busy machine overstate the ZO cost.

Run (about 10-11 minutes on 2 quiet cores):
    .venv/bin/python benchmarks/hybrid.py
    .venv/bin/python benchmarks/hybrid.py --threads 1  # on a shared machine, see above
    .venv/bin/python benchmarks/hybrid.py --quick      # smoke run: batch 1 x 32, ks 0 1 all, 1 in_forward, 1 repeat
Writes benchmarks/results/hybrid[_quick].{json,png}.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
from pathlib import Path

import common

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--seq", type=int, default=128)
parser.add_argument("--ks", nargs="+", default=["0", "1", "2", "4", "all"])
parser.add_argument("--in-forward-ks", nargs="*", default=["1"], help="ks also run with perturb='in_forward'")
parser.add_argument("--mem-steps", type=int, default=2)
parser.add_argument("--warmup", type=int, default=1)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
parser.add_argument("--quick", action="store_true", help="batch 1 x 32, ks 0 1 all, 1 repeat, 1 memory step")
parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one memory measurement, JSON spec
args = parser.parse_args()
if args.quick:
    args.batch, args.seq, args.ks, args.mem_steps, args.warmup, args.repeats = 1, 32, ["0", "1", "all"], 1, 0, 1
LR_ZO, EPS_ZO, LR_FO = 1e-6, 1e-3, 1e-5
BLOCKS = 12
IN_FORWARD = " in_forward"  # the suffix of a kind whose ZO pair runs inside one forward
KINDS = [*args.ks, *(k + IN_FORWARD for k in args.in_forward_ks)]


def k_value(kind: str) -> int:
    k = kind.removesuffix(IN_FORWARD)
    return -1 if k == "all" else int(k)


def label(kind: str) -> str:
    k = kind.removesuffix(IN_FORWARD)
    text = {"0": "k=0 (pure ZO)", "all": f"k=all={BLOCKS} (pure FO)"}.get(k, f"k={k}")
    return text + (", in_forward" if kind.endswith(IN_FORWARD) else "")


def make_step(model, kind: str):  # -> (step function of a loss_fn, FO parameter count)
    import zo_scale
    from zo_scale.train.hybrid import HybridOptimizer, make_fo_optimizer, split_fo_parameters

    fo_named, zo_named = split_fo_parameters(model, k_value(kind))
    in_forward = {"perturb": "in_forward", "model": model, "lazy": True} if kind.endswith(IN_FORWARD) else {}
    zo = zo_scale.ZOSGD(zo_named, lr=LR_ZO, eps=EPS_ZO, seed=0, **in_forward) if zo_named else None
    fo = make_fo_optimizer(fo_named, "adamw", lr=LR_FO) if fo_named else None
    opt = HybridOptimizer(zo, fo, [p for _, p in fo_named])
    return opt.step, sum(p.numel() for _, p in fo_named)


def lm_loss(model, ids, groups: int | None = None):
    """The batch's LM loss; with ``groups`` = K (the ZO step of perturb='in_forward') each of K stacked copies'."""
    return model(input_ids=ids, labels=ids).loss if groups is None else common.stacked_lm_losses(model, ids, groups)


# -----------------------------------------------------------------------------
# child: one memory measurement in this fresh process


def measure(kind: str, batch: int, seq: int, steps: int, threads: int) -> dict[str, float | int | bool]:
    import torch

    if threads:
        torch.set_num_threads(threads)

    model = common.opt_125m("fp32")
    ids = common.lm_batch(batch, seq)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage pointer -> bytes, for the FO pass being counted
    counting = [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if counting[0]:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in param_storages:
                saved[ptr] = t.untyped_storage().nbytes()
        return t

    def loss_fn(groups: int | None = None) -> torch.Tensor:  # the ZO forwards run under no_grad: nothing saved
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return lm_loss(model, ids, groups)

    fo_numel = 0
    if kind == "inference":
        def op() -> None:
            with torch.inference_mode():
                loss_fn()
    else:
        step, fo_numel = make_step(model, kind)
        op = lambda: step(loss_fn)

    gc.collect()
    model_rss = common.rss_mib()
    reset = common.reset_peak_rss()
    for i in range(steps):
        counting[0] = i == steps - 1  # count the last (steady-state) step only
        saved.clear()
        op()
    peak = common.peak_rss_mib()
    return {"model_rss_mib": model_rss, "peak_reset": reset, "peak_mib": peak, "vmhwm_mib": common.hwm_mib(),
            "above_model_mib": peak - model_rss, "saved_for_backward_mib": sum(saved.values()) / 2**20,
            "saved_storages": len(saved), "fo_parameters": fo_numel}


if args.child:
    print(json.dumps(measure(**json.loads(args.child))))
    sys.exit(0)

# -----------------------------------------------------------------------------
# parent: memory children first (this process imports no torch until they are done), then timing

name = "hybrid" + ("_quick" if args.quick else "")
memory: dict[str, dict] = {}
for kind in ["inference", *KINDS]:
    spec = {"kind": kind, "batch": args.batch, "seq": args.seq, "steps": 1 if kind == "inference" else args.mem_steps,
            "threads": args.threads}
    memory[kind] = m = common.run_child(Path(__file__), ["--child", json.dumps(spec)])
    print(f"memory {kind:13s} peak {m['peak_mib']:6.0f} MiB  above model {m['above_model_mib']:6.0f} MiB  "
          f"saved for backward {m['saved_for_backward_mib']:6.1f} MiB  FO params {m['fo_parameters'] / 1e6:.1f}M",
          flush=True)
inference_above = memory["inference"]["above_model_mib"]
for kind in KINDS:
    m = memory[kind]
    m["above_model_over_inference"] = m["above_model_mib"] / inference_above
    m["peak_over_inference_peak"] = m["peak_mib"] / memory["inference"]["peak_mib"]
    # what FO adds in state: its gradients and AdamW's two moments, fp32
    m["fo_grad_and_adam_state_mib"] = 3 * 4 * m["fo_parameters"] / 2**20

import torch  # noqa: E402 - after the memory children, see above

if args.threads:
    torch.set_num_threads(args.threads)
model = common.opt_125m("fp32")
ids = common.lm_batch(args.batch, args.seq)
loss_fn = functools.partial(lm_loss, model, ids)


def two_forwards() -> None:
    with torch.inference_mode():
        loss_fn()
        loss_fn()


fns = {"2 forwards": two_forwards}
for kind in KINDS:
    step, _ = make_step(model, kind)
    fns[kind] = lambda step=step: step(loss_fn)
timings = common.time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
base = timings["2 forwards"]
times = {kind: {"median_s": t.median_s, "times_s": t.times_s, "over_two_forwards": t.median_s / base.median_s}
         for kind, t in timings.items()}
for kind, t in times.items():
    print(f"time {kind:13s} {t['median_s']:6.2f} s  x{t['over_two_forwards']:.2f} of 2 forwards", flush=True)
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
for kind in KINDS:  # one more step of each: what a GPU pays per launch, per host read, per byte of ZO pass
    w = times[kind]["work_per_step"] = common.work_per_step(fns[kind], model_bytes)
    print(f"work {kind:13s} {w['aten_ops']:6d} aten ops, {w['zo_kernel_calls']:4d} compiled ZO kernel calls, "
          f"{w['host_reads']:4d} host reads; its ZO passes move {w['zo_bytes_per_model_bytes']:.2f}x the model's bytes")

settings = {
    "model": "OPTForCausalLM(OPTConfig()) random init, fp32, eval mode (12 blocks, tied lm_head)",
    "batch": args.batch, "seq": args.seq, "ks": args.ks, "in_forward_ks": args.in_forward_ks,
    "memory_steps": args.mem_steps,
    "warmup": args.warmup, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
    "zo": f"ZOSGD(lr={LR_ZO}, eps={EPS_ZO}); in_forward kinds lazy=True", "fo": f"AdamW(lr={LR_FO}), weight_decay 0",
    "split": "zo_scale.train.hybrid.split_fo_parameters(model, k): last k blocks + final norm FO; "
             "the tied embedding/head stays ZO for 0 < k < 12",
    "memory_baseline": "one forward under torch.inference_mode()", "time_baseline": "2 forwards under inference_mode",
    "quick": args.quick,
}
notes = [
    "MiB = 2**20 bytes. above_model = peak RSS - RSS after building the model (Python + torch + 478 MiB of weights).",
    "saved_for_backward_mib: unique storages autograd keeps for the FO backward (parameters excluded). With "
    "vocab 50272 the LM head's input, the logits and the loss's log-softmax are saved at every k > 0: "
    "batch x seq x 50272 x 4 bytes is the size of one logits tensor.",
    "fo_grad_and_adam_state_mib: 12 bytes per FO parameter (fp32 gradient + AdamW's 2 moments).",
    "work_per_step (common.work_per_step), counted on one more step of each: aten ops (the FO pass's backward "
    "included; on a GPU each is a kernel launch), host reads, compiled ZO kernel calls, and the bytes the ZO "
    "passes read and write over the model's bytes.",
    "k > 0 and k < 12 steps are 3 forwards + a backward through the last k blocks and the head; k = all is "
    "1 forward + a full backward + AdamW. 'k in_forward': 1 forward + that backward, then 1 forward over the "
    "batch stacked twice (the ZO pair, a transient perturbed copy of each ZO module's weights per row group).",
]
results = {"memory": memory, "time": times, "logits_mib": args.batch * args.seq * 50272 * 4 / 2**20}
print("wrote", common.write_json(name, settings, results, notes))

# -----------------------------------------------------------------------------
# plot: memory above the model (and what autograd saved) | step time over 2 forwards

fig, (ax_mem, ax_time) = common.new_figure(13, 4.8, ncols=2)
kinds = ["inference", *KINDS]
labels = ["inference (1 fwd)", *(label(k) for k in KINDS)]
above = [memory[k]["above_model_mib"] for k in kinds]
saved = [memory[k]["saved_for_backward_mib"] for k in kinds]
state = [memory[k].get("fo_grad_and_adam_state_mib", 0.0) for k in kinds]
x = range(len(kinds))
ax_mem.bar(x, above, color=["#999999", *["#4c72b0"] * len(KINDS)], label="peak RSS above the model")
ax_mem.bar([i - 0.2 for i in x], saved, width=0.25, color="#dd8452", label="saved for backward")
ax_mem.bar([i + 0.2 for i in x], state, width=0.25, color="#55a868", label="FO grads + AdamW moments")
for i, k in enumerate(kinds):
    if k != "inference":
        ax_mem.text(i, above[i], f"x{memory[k]['above_model_over_inference']:.2f}", ha="center", va="bottom")
ax_mem.set_xticks(list(x), labels, rotation=20, ha="right")
ax_mem.set_ylabel("MiB")
ax_mem.set_title(f"memory above the model (x = / inference), batch {args.batch}x{args.seq}")
ax_mem.legend(fontsize=8)
tkinds = list(times)
common.hbar_with_ratios(ax_time, [("2 forwards (inference)" if k == "2 forwards" else label(k)) for k in tkinds],
                        [times[k]["median_s"] for k in tkinds], [times[k]["times_s"] for k in tkinds],
                        [times[k]["over_two_forwards"] for k in tkinds],
                        ["#999999", *["#4c72b0"] * (len(tkinds) - 1)])
ax_time.set_xlabel("seconds per step (median; dots: repeats)")
ax_time.set_title("step time (x = / 2 forwards)")
fig.suptitle(f"hybrid ZO-FO, OPT-125m shape fp32: last k blocks by AdamW, the rest by ZO-SGD. {common.machine_label()}",
             fontsize=9)
print("wrote", common.save_figure(fig, name))
