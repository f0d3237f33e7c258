"""Peak memory and step time of the ways to fine-tune: full / LoRA / quantized-base ZO vs FO AdamW.

Model: OPT-125m's shape with random weights (``OPTForCausalLM(OPTConfig())``, saved once to a
temporary folder) loaded through ``zo_scale.models.load_model("tiny-opt", weights=folder, dtype=...,
quantization=...)`` (the name only picks the byte tokenizer, which is not used), eval mode.
One fixed batch of ``--batch`` x ``--seq`` random token ids; loss = the model's LM loss. Variants:

    inference_fp32   2 forwards under torch.inference_mode(), fp32                  (baseline)
    inference_int8   the same over the int8 model; inference_nf4: over the NF4 model
    zo_full_fp32     ZOSGD(model.named_parameters()) (MeZO), fp32
    zo_full_bf16     the same in bf16
    zo_lora_fp32     ZOSGD over LoRA (r 8, q_proj and v_proj; apply_peft), fp32 base
    zo_lora_int8     the same over an int8 base (bitsandbytes LLM.int8)
    zo_lora_nf4      the same over an NF4 base (4-bit, blocks of 64, fp32 compute)
    qzo_int8         ZOSGD(quantized_scales(model)): int8 row scales + float parameters (QZO-style)
    qzo_nf4          the same with NF4 block scales
    fo_adamw_fp32    loss.backward(); torch.optim.AdamW(model.parameters()).step(); zero_grad(), fp32

How (CPU, Linux): each variant runs in a fresh process (this script with ``--child``). The child
imports torch, transformers, peft, bitsandbytes and zo_scale and records its RSS ("runtime"), loads
the model (and adapter), copies its float tensors out of the checkpoint's memory map (see
``unmap_checkpoint``), frees what loading left behind (``gc`` + glibc ``malloc_trim``), records
its RSS ("model"), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), runs
``--warmup`` + ``--steps`` steps and reads the peak (``getrusage(RUSAGE_SELF).ru_maxrss``). A child
during which other processes took more than 5% of the CPU is rerun (``--retries`` times at most) and
the quietest attempt kept. Reported:

    peak_mib           raw peak RSS during the steps
    net_peak_mib       peak_mib - runtime RSS: the model plus what the steps need, without Python/torch
    step_s_median      median wall time of the timed steps (after the warmup ones)
    accounted_mib      bytes counted from tensors: weights (codes + scales + float parameters, each
                       storage once), trainable tensors, gradients, optimizer state, and for FO the
                       tensors autograd saves for backward (saved_tensors_hooks, each storage once)

and each as a ratio to ``inference_fp32`` measured in the same run (no timed asserts anywhere).
Separately (``--loss-steps``, cheap): the loss after N ZO steps on the tiny models and the batch of
tests/models/test_quantized.py, for fp32 full ZO vs int8 / NF4 QZO (full and scales only) vs LoRA.

Run (2-core CPU: about 5 min):
    .venv/bin/python benchmarks/tuning_memory.py               # batch 4 x 64, 1 warmup + 3 timed steps
    .venv/bin/python benchmarks/tuning_memory.py --quick       # smoke run: batch 2 x 32, 1 + 1 steps

Writes benchmarks/results/tuning_memory[_quick].{json,png}.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import common

if TYPE_CHECKING:
    import torch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--seq", type=int, default=64)
parser.add_argument("--warmup", type=int, default=1)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--loss-steps", type=int, default=100)
parser.add_argument("--retries", type=int, default=2,
                    help="rerun a variant whose child saw other processes take >5%% of the CPU; keep the quietest")
parser.add_argument("--quick", action="store_true", help="batch 2 x 32, 1 warmup + 1 timed step, 20 loss steps")
parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
args = parser.parse_args()
if args.quick:
    args.batch, args.seq, args.warmup, args.steps, args.loss_steps = 2, 32, 1, 1, 20

# name: (op, dtype, quantization, trained tensors)
VARIANTS = {
    "inference_fp32": ("inference", "fp32", "none", None),
    "inference_int8": ("inference", "fp32", "int8", None),
    "inference_nf4": ("inference", "fp32", "nf4", None),
    "zo_full_fp32": ("zo", "fp32", "none", "full"),
    "zo_full_bf16": ("zo", "bf16", "none", "full"),
    "zo_lora_fp32": ("zo", "fp32", "none", "lora"),
    "zo_lora_int8": ("zo", "fp32", "int8", "lora"),
    "zo_lora_nf4": ("zo", "fp32", "nf4", "lora"),
    "qzo_int8": ("zo", "fp32", "int8", "scales"),
    "qzo_nf4": ("zo", "fp32", "nf4", "scales"),
    "fo_adamw_fp32": ("fo_adamw", "fp32", "none", "full"),
}
BASELINE = "inference_fp32"
LR_ZO, EPS_ZO, LR_LORA, EPS_LORA, LR_FO = 1e-6, 1e-3, 1e-4, 1e-2, 1e-5  # MeZO's settings; irrelevant to memory
MIB = 2**20

# -----------------------------------------------------------------------------
# children


def trim_heap() -> None:
    """Return freed heap pages to the OS, so 'model RSS' is not inflated by what loading freed."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def unique_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the tensors, each memory region once (tied weights, views)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


def unmap_checkpoint(model: torch.nn.Module) -> None:
    """Copy every float tensor of ``model`` out of the checkpoint's memory map into process memory.

    from_pretrained maps the safetensors file; the pages a load touches stay resident (counted in RSS)
    while any tensor still maps the file. A quantized load touches all of it (to quantize) and keeps
    the mapping alive through its float embeddings, so its RSS would carry the fp32 source pages; an
    fp32 load touches nothing until the first forward. Copying puts every variant on the same footing:
    its weights are resident, once. bitsandbytes' code tensors are already in process memory.
    """
    import bitsandbytes as bnb

    done: set[int] = set()
    for module in model.modules():
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is None or id(t) in done or not t.is_floating_point():
                continue
            if not isinstance(t, (bnb.nn.Int8Params, bnb.nn.Params4bit)):
                t.data = t.data.clone()  # tied weights are one Parameter: copied once, still shared
            done.add(id(t))


def prepare(folder: str) -> dict[str, float]:
    model = common.opt_125m("fp32")
    model.save_pretrained(folder)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def measure(variant: str, folder: str, batch: int, seq: int, warmup: int, steps: int) -> dict[str, object]:
    import bitsandbytes  # noqa: F401  (every child imports the same libraries before 'runtime' is read)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import zo_scale
    from zo_scale.adapters.peft_tuning import PeftSettings, apply_peft, trainable_named_parameters
    from zo_scale.models import load_model, quantized_scales

    op, dtype, quantization, trained = VARIANTS[variant]
    ids = common.lm_batch(batch, seq)
    trim_heap()
    runtime_rss = common.rss_mib()
    model, _ = load_model("tiny-opt", weights=folder, dtype=dtype, quantization=quantization)
    unmap_checkpoint(model)
    if trained == "lora":
        model = apply_peft(model, PeftSettings(method="lora"), seed=0)  # r 8, alpha 16, q_proj and v_proj
    weights_bytes = unique_bytes(model.state_dict().values())
    loss = lambda: model(input_ids=ids, labels=ids).loss
    extra: dict[str, float] = {}
    if op == "inference":
        params: list = []

        def step() -> None:
            with torch.inference_mode():
                loss()
                loss()
    elif op == "zo":
        params = {"full": lambda: list(model.named_parameters()), "lora": lambda: trainable_named_parameters(model),
                  "scales": lambda: quantized_scales(model)}[trained]()
        lr, eps = (LR_LORA, EPS_LORA) if trained == "lora" else (LR_ZO, EPS_ZO)
        optimizer = zo_scale.ZOSGD(params, lr=lr, eps=eps, seed=0)
        step = lambda: optimizer.step(loss)
    else:
        params = list(model.named_parameters())
        adamw = torch.optim.AdamW(model.parameters(), lr=LR_FO)  # moments allocated at the first step
        saved: list = []

        def step() -> None:
            saved.clear()
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                value = loss()
            extra["saved_activations_bytes"] = unique_bytes(saved)
            saved.clear()
            value.backward()
            extra["grads_bytes"] = unique_bytes(p.grad for p in model.parameters())
            adamw.step()
            adamw.zero_grad(set_to_none=True)
            extra["optimizer_state_bytes"] = unique_bytes(
                v for s in adamw.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim())

    trim_heap()
    model_rss = common.rss_mib()
    reset = common.reset_peak_rss()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = common.peak_rss_mib()
    trainable_bytes = unique_bytes(t for _, t in params)
    accounted = weights_bytes + sum(extra.values())  # trainable tensors are part of the weights
    return {
        "runtime_rss_mib": runtime_rss, "model_rss_mib": model_rss, "peak_reset": reset, "peak_mib": peak,
        "vmhwm_mib": common.hwm_mib(), "net_peak_mib": peak - runtime_rss, "above_model_mib": peak - model_rss,
        "step_s_median": statistics.median(times), "step_s": times,
        "weights_mib": weights_bytes / MIB, "trainable_mib": trainable_bytes / MIB,
        "trainable_tensors": len(params), "accounted_mib": accounted / MIB,
        **{k.replace("_bytes", "_mib"): v / MIB for k, v in extra.items()},
        # since this child started: says whether this variant's step times are to be trusted
        "cpu_fraction_taken_by_other_processes": common.cpu_taken_by_others(),
    }


def loss_curves(steps: int) -> dict[str, dict]:
    """Loss per ZO step on the tiny models and the 8-token batch of tests/models/test_quantized.py."""
    import torch

    import zo_scale
    from zo_scale.adapters.peft_tuning import PeftSettings, apply_peft, trainable_named_parameters
    from zo_scale.models import load_model, quantized_scales

    g = torch.Generator().manual_seed(0)
    vocab = torch.randperm(256, generator=g)[:8] + 3
    ids = vocab[torch.randint(0, 8, (4, 32), generator=g)]
    runs = {  # name: (quantization, trained tensors, lr, eps)
        "zo_full_fp32": ("none", "full", 3e-3, 1e-3),
        "qzo_int8": ("int8", "scales", 3e-3, 1e-3),
        "qzo_nf4": ("nf4", "scales", 3e-3, 1e-3),
        "qzo_int8_scales_only": ("int8", "scales_only", 1e-2, 1e-3),
        "qzo_nf4_scales_only": ("nf4", "scales_only", 1e-2, 1e-3),
        "zo_lora_fp32": ("none", "lora", 0.1, 1e-2),
        "zo_lora_int8": ("int8", "lora", 0.1, 1e-2),
        "zo_lora_nf4": ("nf4", "lora", 0.1, 1e-2),
    }
    out: dict[str, dict[str, list[float]]] = {}
    for arch in ("tiny-opt", "tiny-llama"):
        out[arch] = {}
        for name, (quantization, trained, lr, eps) in runs.items():
            model, _ = load_model(arch, quantization=quantization)
            if trained == "lora":
                model = apply_peft(model, PeftSettings(method="lora"), seed=0)
                params = trainable_named_parameters(model)
            elif trained == "full":
                params = list(model.named_parameters())
            else:
                params = quantized_scales(model, scales_only=trained == "scales_only")
            optimizer = zo_scale.ZOSGD(params, lr=lr, eps=eps, seed=0)
            closure = lambda m=model: m(input_ids=ids, labels=ids).loss
            out[arch][name] = [optimizer.step(closure) for _ in range(steps)]
            print(f"{arch:10s} {name:22s} lr {lr:g} eps {eps:g}: loss {out[arch][name][0]:.3f} -> "
                  f"{out[arch][name][-1]:.3f}", file=sys.stderr, flush=True)
    return {"runs": {k: {"quantization": v[0], "trained": v[1], "lr": v[2], "eps": v[3]} for k, v in runs.items()},
            "losses": out}


if args.child:
    spec = json.loads(args.child)
    task = spec.pop("task")
    result = {"prepare": prepare, "measure": measure, "losses": loss_curves}[task](**spec)
    print(json.dumps(result))
    sys.exit(0)

# -----------------------------------------------------------------------------
# parent: spawns the children; imports no torch until they are done (its peak RSS would carry over)


def child(task: str, **spec: object) -> dict:
    return common.run_child(Path(__file__), ["--child", json.dumps({"task": task, **spec})])


name = "tuning_memory" + ("_quick" if args.quick else "")
folder = tempfile.mkdtemp(prefix="tuning_memory_opt125m_")
try:
    info = child("prepare", folder=folder)
    results: dict[str, dict] = {}
    for variant in VARIANTS:
        # On a shared machine another job can double a step time: rerun a disturbed variant and keep the
        # quietest attempt (memory comes from the same attempt; it does not depend on other processes).
        attempts = []
        while len(attempts) <= args.retries and (not attempts or min(attempts) > 0.05):
            m = child("measure", variant=variant, folder=folder, batch=args.batch, seq=args.seq,
                      warmup=args.warmup, steps=args.steps)
            attempts.append(m["cpu_fraction_taken_by_other_processes"])
            if attempts[-1] == min(attempts):
                results[variant] = m
        m = results[variant]
        m["cpu_fraction_taken_by_other_processes_per_attempt"] = attempts
        print(f"{variant:15s} peak {m['peak_mib']:6.0f} MiB  net {m['net_peak_mib']:6.0f} MiB  "
              f"weights {m['weights_mib']:5.0f} MiB  accounted {m['accounted_mib']:6.0f} MiB  "
              f"step {m['step_s_median']:6.2f} s  (others took {m['cpu_fraction_taken_by_other_processes']:.0%} of "
              "the CPU)", flush=True)
finally:
    shutil.rmtree(folder, ignore_errors=True)
base = results[BASELINE]
for m in results.values():
    m["ratios_to_inference_fp32"] = {
        "peak_raw": m["peak_mib"] / base["peak_mib"],
        "peak_net": m["net_peak_mib"] / base["net_peak_mib"],
        "accounted": m["accounted_mib"] / base["accounted_mib"],
        "step_time": m["step_s_median"] / base["step_s_median"],
    }
losses = common.run_child(Path(__file__), ["--child", json.dumps({"task": "losses", "steps": args.loss_steps})])

settings = {
    "model": "OPTForCausalLM(OPTConfig()) random init (OPT-125m shape), saved once, loaded by "
             "zo_scale.models.load_model(weights=folder, dtype=..., quantization=...), eval mode",
    "parameters": info["parameters"],
    "batch": args.batch, "seq": args.seq, "warmup_steps": args.warmup, "timed_steps": args.steps,
    "loss": "model(input_ids=ids, labels=ids).loss, random ids, one fixed batch",
    "variants": {k: dict(zip(("op", "dtype", "quantization", "trained"), v, strict=True)) for k, v in VARIANTS.items()},
    "zo": f"ZOSGD eager; full / QZO lr {LR_ZO} eps {EPS_ZO}; LoRA (r 8, alpha 16, q_proj v_proj) lr {LR_LORA} "
          f"eps {EPS_LORA}",
    "fo": f"AdamW(lr={LR_FO}) over every parameter, zero_grad(set_to_none=True)",
    "quantization": "bitsandbytes 0.50.2: int8 = BitsAndBytesConfig(load_in_8bit=True) (threshold 6); nf4 = "
                    "load_in_4bit, nf4, fp32 compute, no double quant, CPU repacking off (keep_4bit_layout)",
    "measure": "fresh process per variant; runtime RSS after imports; model RSS after load, copying the float "
               "tensors out of the checkpoint mmap, malloc_trim; peak = "
               "ru_maxrss after the steps, counter reset after model load via /proc/self/clear_refs",
    "loss_steps": args.loss_steps,
    "retries": args.retries,
    "quick": args.quick,
}
notes = [
    "MiB = 2**20 bytes. net_peak_mib = peak - runtime RSS (Python, torch, transformers, peft, bitsandbytes "
    "imported, nothing built): the model plus what the steps need.",
    "accounted_mib: weights (every state_dict storage once: int8/uint8 codes, scales, float parameters, LoRA) "
    "+ for FO the gradients, the AdamW moments and the tensors autograd saved for backward. ZO keeps no "
    "gradients, no state (ZO-SGD) and no saved tensors: its accounted bytes are its weights.",
    "OPT-125m ties lm_head to the token embedding (38.6M of its 125.2M parameters, kept in float by "
    "bitsandbytes), so the quantized models shrink less than the linear layers do: about 85M parameters "
    "are quantized.",
    "bitsandbytes on CPU: int8 layers quantize activations to int8 and multiply with torch._int_mm; NF4 "
    "layers with the CPU repacking off dequantize their weight to fp32 at every forward. Step times of "
    "quantized models measure these CPU kernels, not GPU ones.",
    "loss_curves: tiny models (hidden 64, 2 layers) on the 8-token batch of tests/models/test_quantized.py; "
    "the lrs are those of the tests.",
    "Peak RSS of one variant moves by up to ~100 MiB from run to run (allocator and page-fault timing; seen "
    "on this machine: qzo_int8 net peak 551 MiB in one run, 449 MiB in the next): differences of that size "
    "between variants are noise. accounted_mib is exact.",
    "machine.cpu_fraction_taken_by_other_processes covers the whole run, discarded attempts and the loss "
    "curves included; each variant's own cpu_fraction_taken_by_other_processes (its kept attempt) says "
    "whether its step time can be trusted (above ~0.05: no).",
    "A ZO step is 2 forwards + 3 passes over the trained tensors (noise generation dominates, see step_time); "
    "at this small batch those passes over 125M parameters cost about as much as FO's backward + AdamW, so "
    "ZO's advantage here is memory, not time. LoRA and QZO train fewer tensors (1.1 MiB, ~155 MiB) and their "
    "passes are cheaper.",
]
print("wrote", common.write_json(name, settings, {"variants": results, "loss_curves": losses}, notes))

# -----------------------------------------------------------------------------
# plot: net peak memory and step time per variant (ratios to inference fp32), and the tiny-model loss curves

fig, axes = common.new_figure(17, 5.5, ncols=3)
labels = list(VARIANTS)
colors = ["tab:gray" if k.startswith("inference") else "tab:red" if k.startswith("fo") else
          "tab:green" if k.startswith("qzo") else "tab:orange" if "lora" in k else "tab:blue" for k in labels]
net = [results[k]["net_peak_mib"] for k in labels]
common.hbar_with_ratios(axes[0], labels, net, [[v] for v in net],
                        [results[k]["ratios_to_inference_fp32"]["peak_net"] for k in labels], colors)
axes[0].set_xlabel("peak RSS - runtime RSS, MiB (lower is better)")
axes[0].set_title("memory: model + step (ratio to inference fp32)", fontsize=10)
common.hbar_with_ratios(axes[1], labels, [results[k]["step_s_median"] for k in labels],
                        [results[k]["step_s"] for k in labels],
                        [results[k]["ratios_to_inference_fp32"]["step_time"] for k in labels], colors)
axes[1].set_xlabel("seconds per step (2 forwards for inference; lower is better)")
axes[1].set_title("step time (ratio to inference fp32)", fontsize=10)
styles = {"tiny-opt": "-", "tiny-llama": "--"}
for arch, curves in losses["losses"].items():
    for i, (run, curve) in enumerate(curves.items()):
        axes[2].plot(curve, styles[arch], color=f"C{i}", label=run if arch == "tiny-opt" else None, linewidth=1)
axes[2].set_xlabel("ZO step")
axes[2].set_ylabel("loss at theta (mean of the pair)")
axes[2].set_title("tiny models, 8-token batch (solid: tiny-opt, dashed: tiny-llama)", fontsize=10)
axes[2].legend(fontsize=7)
fig.suptitle(f"Fine-tuning memory and speed, OPT-125m shape, batch {args.batch} x {args.seq}, "
             f"each bar a fresh process\n{common.machine_label()}", fontsize=10)
print("wrote", common.save_figure(fig, name))
