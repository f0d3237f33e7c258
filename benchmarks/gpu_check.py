"""GPU check: everything a CUDA machine must show for the sweep kernel, in one run of a few minutes.

1. The CUDA tests (``pytest tests -k cuda``: compiled vs eager vs CPU bit for bit on the device).
2. ``benchmarks/sweep_kernel.py --device cuda``: noise-add / plain add_ (fp32, bf16), ops and kernel
   launches per sweep.
3. For an OPT-1.3B-shaped and a LLaMA-2-7B-shaped model (random init, bf16, built on the GPU):
   time of one ZO step (``zo_scale.ZOSGD`` defaults, lazy as the trainer runs it) / two forwards,
   peak GPU memory of the step / one inference forward, and CUDA kernel launches per step
   (torch.profiler) for the compiled sweep, for the eager reference sweep, and for the compiled sweep
   with ``perturb="in_forward"`` (one forward over the batch stacked twice, closure
   ``common.stacked_lm_losses``).
4. The memory planner on the GPU: the CUDA context (``nvidia-smi``'s view, total - free, of a process
   that has only initialised CUDA) and ``zo-scale train`` on an OPT-1.3B shape cut to 8 blocks
   (``random:``, bf16, 2 steps, in place and in_forward): the trainer's ``torch.cuda.max_memory_allocated``
   against ``zo-scale plan``'s per-GPU bytes without the CUDA context (the allocator does not count it).

Run on the GPU machine (from the repository root, after ``make install`` or with torch + transformers):
    python benchmarks/gpu_check.py                 # writes benchmarks/results/gpu_check_cuda.json (+ $OUT/)
    python benchmarks/gpu_check.py --quick         # tiny shapes: a smoke run, also on a CPU
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common
import torch
from torch.profiler import ProfilerActivity, profile

import zo_scale

ROOT = Path(__file__).resolve().parents[1]
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--seq", type=int, default=128)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--quick", action="store_true", help="tiny models, CPU allowed")
parser.add_argument("--skip-tests", action="store_true")
args = parser.parse_args()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if device.type != "cuda" and not args.quick:
    sys.exit("gpu_check.py needs a CUDA device (or --quick for a smoke run)")
name = f"gpu_check_{device.type}" + ("_quick" if args.quick else "")


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(kind: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    if args.quick:
        shapes = {"opt-1.3b": OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                        vocab_size=1000),
                  "llama-2-7b": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=1000)}
    else:  # the public configs' shapes
        shapes = {"opt-1.3b": OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                                        vocab_size=50272),
                  "llama-2-7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                            num_attention_heads=32, vocab_size=32000)}
    cls = OPTForCausalLM if kind.startswith("opt") else LlamaForCausalLM
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 straight on the device: no fp32 copy
    try:
        with torch.device(device):
            model = cls(shapes[kind])
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def launches(fn) -> dict[str, int]:  # noqa: ANN001 - a callable
    """CUDA kernel launches and host<->device copies of one call (on a CPU: aten ops, and 0)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync()
    events = prof.key_averages()
    if device.type != "cuda":
        return {"kernels": sum(e.count for e in events if e.key.startswith("aten::")), "copies": 0}
    return {"kernels": sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                   "cuLaunchKernelEx")),
            "copies": sum(e.count for e in events if e.key.startswith("cudaMemcpy"))}


def measure(kind: str) -> dict[str, object]:
    model = build(kind)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    def two_forwards() -> None:
        with torch.inference_mode():
            loss()
            loss()

    out: dict[str, object] = {"params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            loss()
        sync()
        out["peak_bytes_one_forward"] = torch.cuda.max_memory_allocated()
    variants = {"compiled": {"kernel": "compiled"}, "eager": {"kernel": "eager"},
                "in_forward": {"kernel": "compiled", "perturb": "in_forward", "model": model}}
    for mode, kwargs in variants.items():
        opt = zo_scale.ZOSGD(model.named_parameters(), lr=1e-7, eps=1e-3, lazy=True, **kwargs)
        if mode == "in_forward":
            step = lambda opt=opt: opt.step(lambda groups: common.stacked_lm_losses(model, ids, groups))  # noqa: E731
        else:
            step = lambda opt=opt: opt.step(loss)  # noqa: E731
        step()
        step()  # warm: compiled, steady lazy state
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timings = common.time_interleaved({"step": lambda step=step: (step(), sync()),
                                           "2 forwards": lambda: (two_forwards(), sync())},
                                          warmup=0, repeats=args.repeats)
        row = {"step_s": timings["step"].median_s, "two_forwards_s": timings["2 forwards"].median_s,
               "ratio_step_vs_2_forwards": timings["step"].median_s / timings["2 forwards"].median_s,
               "launches_per_step": launches(step), "launches_two_forwards": launches(two_forwards)}
        if device.type == "cuda":
            row["peak_bytes_step"] = torch.cuda.max_memory_allocated()
            row["peak_step_vs_one_forward"] = row["peak_bytes_step"] / out["peak_bytes_one_forward"]
        opt.flush()
        out[mode] = row
        print(f"{kind} {mode:8s} step {row['step_s']:.3f} s = x{row['ratio_step_vs_2_forwards']:.3f} 2 forwards; "
              f"{row['launches_per_step']} launches per step ({row['launches_two_forwards']} for 2 forwards)")
    return out


def cuda_context_bytes() -> int:
    """Device memory a process takes by initialising CUDA and cuBLAS alone (total - free, before vs after)."""
    code = ("import torch; free0, total = torch.cuda.mem_get_info(); a = torch.ones(8, 8, device='cuda'); "
            "(a @ a).sum().item(); free1, _ = torch.cuda.mem_get_info(); print(free0 - free1)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def plan_check() -> dict[str, object]:
    import json
    import tempfile

    from zo_scale.models.architectures import architecture_config
    from zo_scale.plan.memory import CUDA_CONTEXT_BYTES, RunSettings, plan_memory
    from zo_scale.plan.shapes import ModelShape

    out: dict[str, object] = {"cuda_context_bytes": cuda_context_bytes(), "planner_cuda_context_bytes":
                              CUDA_CONTEXT_BYTES}
    with tempfile.TemporaryDirectory() as tmp:
        config = architecture_config("opt-1.3b")
        config.num_hidden_layers = 8
        config.to_json_file(f"{tmp}/config.json")
        shape = ModelShape.of(config)
        for perturb in ("in_place", "in_forward"):
            run = f"{tmp}/{perturb}"
            cmd = [sys.executable, "-m", "zo_scale.train.cli", "train", f"model.name=random:{tmp}/config.json",
                   "model.dtype=bfloat16", "model.device=cuda", "task.name=sst2-demo", "task.num_train=32",
                   "task.num_eval=8",
                   f"task.max_length={args.seq}", f"run.batch_size={args.batch}", f"run.eval_batch_size={args.batch}",
                   "run.steps=2", "run.progress=false", f"run.output_dir={run}", f"optim.perturb={perturb}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                out[perturb] = {"error": proc.stderr[-2000:]}
                continue
            measured = json.loads(open(f"{run}/summary.json").read())["peak_memory_bytes"][0]["device"]
            plan = plan_memory(shape, RunSettings(batch=args.batch, seq=args.seq, dtype="bfloat16", perturb=perturb))
            predicted = plan.per_gpu_bytes - plan.gpu["CUDA context"]
            out[perturb] = {"measured_max_allocated_bytes": measured, "predicted_bytes_without_context": predicted,
                            "predicted_over_measured": predicted / measured, "breakdown": plan.as_json()["breakdown"]}
            print(f"planner, {perturb}: predicted {predicted / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB")
    return out


started = time.time()
results: dict[str, object] = {}
if not args.skip_tests:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", str(ROOT / "tests" / "core"), "-k", "cuda"],
                          capture_output=True, text=True, cwd=ROOT)
    results["cuda_tests"] = {"returncode": proc.returncode, "tail": proc.stdout[-3000:]}
    print(proc.stdout[-1500:])
bench = [sys.executable, str(ROOT / "benchmarks" / "sweep_kernel.py"), "--device", str(device)]
proc = subprocess.run(bench + (["--quick"] if args.quick else []), capture_output=True, text=True, cwd=ROOT)
results["sweep_kernel"] = {"returncode": proc.returncode, "tail": proc.stdout[-4000:] + proc.stderr[-2000:]}
print(proc.stdout[-3000:], proc.stderr[-2000:])
for kind in ("opt-1.3b", "llama-2-7b"):
    results[kind] = measure(kind)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the model of measure() is gone: give its memory back before the next
if device.type == "cuda":
    results["planner"] = plan_check()
results["wall_s"] = time.time() - started
if device.type == "cuda":
    results["device_name"] = torch.cuda.get_device_name()
settings = {"batch": args.batch, "seq": args.seq, "repeats": args.repeats, "dtype": "bf16", "quick": args.quick,
            "optimizer": "zo_scale.ZOSGD(lr=1e-7, eps=1e-3, lazy=True): kernel compiled, eager; in_forward"}
notes = ["launches: cudaLaunchKernel / cuLaunchKernel events and cudaMemcpy* calls (on a CPU: aten ops)."]
path = common.write_json(name, settings, results, notes)
print("wrote", path)
if os.environ.get("OUT"):
    for p in [path, *sorted(common.RESULTS_DIR.glob(f"sweep_kernel_{device.type}*.json"))]:
        shutil.copy(p, os.environ["OUT"])
