"""Noise throughput: zo_scale's counter-based noise vs torch.randn, over OPT-125m's parameter list.

One "pass" generates one noise tensor per parameter of an OPT-125m-shaped model (196 tensors, 125.2M
elements; shapes from ``OPTForCausalLM(OPTConfig())``), which is what one ZO sweep over the model does.
Measured, as elements per second (median of repeated passes after a warmup pass; the methods are
timed round-robin so drift in machine speed hits them all alike):

    generate only
      torch.randn          torch.randn(shape, generator=g), g a torch.Generator reseeded per pass  (baseline)
      zo normal            zo_scale.core.noise.normal(seed, stream, 0, numel)
      zo rademacher        zo_scale.core.noise.rademacher(seed, stream, 0, numel)
    generate and add into the parameter (what a ZO pass really does)
      torch.randn + add_   p.add_(torch.randn(shape, generator=g), alpha=eps)                      (baseline)
      zo add_noise_ normal      noise.add_noise_(p.view(-1), "normal", ...)  (fused, chunked)
      zo add_noise_ rademacher  noise.add_noise_(p.view(-1), "rademacher", ...)

Ratios are throughput / torch.randn throughput (> 1: faster than randn), all measured in the same run.

Run:
    .venv/bin/python benchmarks/noise_throughput.py            # full: fp32, 9 repeats (about 40 s on 2 cores)
    .venv/bin/python benchmarks/noise_throughput.py --dtype bf16
    .venv/bin/python benchmarks/noise_throughput.py --threads 1   # torch.randn is single-threaded; zo noise is not
    .venv/bin/python benchmarks/noise_throughput.py --quick    # smoke run: 2 layers, 2 repeats

Writes benchmarks/results/noise_throughput_<dtype>[_t<threads>][_quick].{json,png}.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import common
import torch
from transformers import OPTConfig, OPTForCausalLM

from zo_scale.core import noise

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dtype", choices=common.DTYPES, default="fp32")
parser.add_argument("--repeats", type=int, default=9)
parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
parser.add_argument("--quick", action="store_true", help="2 decoder layers instead of 12, 2 repeats")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

layers = 2 if args.quick else OPTConfig().num_hidden_layers
repeats = 2 if args.quick else args.repeats
dtype = common.torch_dtype(args.dtype)
name = f"noise_throughput_{args.dtype}" + (f"_t{args.threads}" if args.threads else "")
name += "_quick" if args.quick else ""
EPS = 1e-3
SEED = 1234

# -----------------------------------------------------------------------------
# the parameter list: OPT-125m's named parameters (meta device: shapes only), then real tensors to add into

with torch.device("meta"):
    shapes = [(n, p.shape) for n, p in OPTForCausalLM(OPTConfig(num_hidden_layers=layers)).named_parameters()]
params = [torch.zeros(shape, dtype=dtype) for _, shape in shapes]
numel = sum(p.numel() for p in params)
print(f"{len(params)} tensors, {numel / 1e6:.1f}M elements, {args.dtype}, {torch.get_num_threads()} threads")

# -----------------------------------------------------------------------------
# one pass of each method over the whole list


def randn_pass() -> None:
    g = torch.Generator().manual_seed(SEED)
    for p in params:
        torch.randn(p.shape, generator=g, dtype=dtype)


def randn_add_pass() -> None:
    g = torch.Generator().manual_seed(SEED)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g, dtype=dtype), alpha=EPS)


def zo_pass(kind: str) -> Callable[[], None]:
    def run() -> None:
        for stream, p in enumerate(params):
            noise.generate(kind, SEED, stream, 0, p.numel(), dtype)

    return run


def zo_add_pass(kind: str) -> Callable[[], None]:
    def run() -> None:
        for stream, p in enumerate(params):
            noise.add_noise_(p.view(-1), kind, SEED, stream, 0, EPS)

    return run


methods: dict[str, tuple[str, Callable[[], None]]] = {  # label -> (baseline label, pass)
    "torch.randn": ("torch.randn", randn_pass),
    "zo normal": ("torch.randn", zo_pass("normal")),
    "zo rademacher": ("torch.randn", zo_pass("rademacher")),
    "torch.randn + add_": ("torch.randn + add_", randn_add_pass),
    "zo add_noise_ normal": ("torch.randn + add_", zo_add_pass("normal")),
    "zo add_noise_ rademacher": ("torch.randn + add_", zo_add_pass("rademacher")),
}

# -----------------------------------------------------------------------------
# measure

timings = common.time_interleaved({label: run for label, (_, run) in methods.items()}, warmup=1, repeats=repeats)
results: dict[str, dict[str, object]] = {}
for label, t in timings.items():
    results[label] = {"median_s": t.median_s, "times_s": t.times_s, "elements_per_s": numel / t.median_s}
    print(f"{label:26s} {t.median_s * 1e3:8.1f} ms/pass  {numel / t.median_s / 1e6:8.1f} M elements/s")
for label, (baseline, _) in methods.items():
    results[label]["baseline"] = baseline
    results[label]["ratio_vs_baseline"] = results[label]["elements_per_s"] / results[baseline]["elements_per_s"]
    results[label]["ratio_vs_randn"] = results[label]["elements_per_s"] / results["torch.randn"]["elements_per_s"]
    print(f"{label:26s} x{results[label]['ratio_vs_baseline']:.2f} vs {baseline}")

settings = {
    "model_shape": "OPTForCausalLM(OPTConfig())" + (f" with num_hidden_layers={layers}" if args.quick else ""),
    "num_tensors": len(params),
    "numel": numel,
    "dtype": args.dtype,
    "warmup_passes": 1,
    "timing": "round-robin over the methods, median of repeats",
    "repeats": repeats,
    "torch_threads": torch.get_num_threads(),
    "noise_chunk_elements": noise.CHUNK,
    "quick": args.quick,
}
notes = ["ratio_vs_baseline: throughput / the baseline's throughput (generate-only vs torch.randn, "
         "generate+add vs torch.randn + add_); > 1 is faster than torch."]
print("wrote", common.write_json(name, settings, results, notes))

# -----------------------------------------------------------------------------
# plot: throughput per method, ratio to its baseline on each bar

fig, ax = common.new_figure()
labels = list(methods)
common.hbar_with_ratios(ax, labels, [numel / timings[k].median_s / 1e6 for k in labels],
                        [[numel / t / 1e6 for t in timings[k].times_s] for k in labels],
                        [results[k]["ratio_vs_baseline"] for k in labels],
                        ["tab:gray" if methods[k][0] == k else "tab:blue" for k in labels])
ax.set_xlabel("throughput (million elements / s; bar: median, dots: repeats; higher is better)")
ax.set_title(f"Noise throughput over OPT-125m's parameters ({numel / 1e6:.0f}M elements, {args.dtype})\n"
             f"gray: torch baseline; xN: ratio to the baseline of its group\n{common.machine_label()}", fontsize=10)
print("wrote", common.save_figure(fig, name))
