"""``zo-scale plan``: the memory plan of a run, as a table or (``--json``) one JSON object.

    zo-scale plan --model llama-2-70b --mode zero3 --offload cpu --gpus 8 --gpu-memory 80 --batch 16 --seq 512
    zo-scale plan --model opt-66b --gpus 1 --gpu-memory 24 --mode zero3 --offload nvme --json
    zo-scale plan --model ./my-model --tuning lora --quantization nf4 --gpu-memory 24

The model is a shipped architecture (``zo_scale.models.ARCHITECTURES``), a folder or config.json, or a
hub id; it is built on the meta device, so only its config is read. When it does not fit, the table
ends with the smallest ZeRO-3 layouts (GPUs, offload) that would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from zo_scale.core.estimators import ESTIMATORS
from zo_scale.models.architectures import architecture_config
from zo_scale.plan.memory import (
    DEVICES,
    DTYPE_BYTES,
    MODES,
    OFFLOADS,
    PERTURBS,
    QUANTIZATIONS,
    STATE_BYTES,
    TUNINGS,
    GiB,
    MemoryPlan,
    RunSettings,
    plan_memory,
)
from zo_scale.plan.shapes import ModelShape


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gib = lambda text: int(float(text) * GiB)
    parser.add_argument("--model", required=True, help="shipped architecture (e.g. llama-2-70b), folder, or hub id")
    parser.add_argument("--mode", choices=MODES, default="single")
    parser.add_argument("--offload", choices=OFFLOADS, default="none", help="where ZeRO-3 keeps the partitions")
    parser.add_argument("--gpus", type=int, default=1, help="ranks in all, one per GPU")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--device", choices=DEVICES, default="cuda", help="cpu: ranks compute on the CPU")
    parser.add_argument("--gpu-memory", type=gib, metavar="GiB", help="memory of each GPU")
    parser.add_argument("--host-memory", type=gib, metavar="GiB", help="RAM of each node")
    parser.add_argument("--nvme-space", type=gib, metavar="GiB", help="free NVMe space for the swap files")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step over all GPUs")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--answer-tokens", type=int, default=1, help="scored tokens at the end of each sequence")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    parser.add_argument("--tuning", choices=TUNINGS, default="full")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--fo-layers", type=int, default=0, metavar="K", help="hybrid: the last K blocks by backprop")
    parser.add_argument("--rule", choices=sorted(STATE_BYTES), default="sgd")
    parser.add_argument("--master-weights", action="store_true")
    parser.add_argument("--perturb", choices=PERTURBS, default="in_place")
    parser.add_argument("--estimator", choices=sorted(ESTIMATORS), default="central")
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--write-ds-config", type=Path, metavar="JSON", help="write the plan's DeepSpeed config")


def settings_of(args: argparse.Namespace) -> RunSettings:
    return RunSettings(
        mode=args.mode, offload=args.offload, gpus=args.gpus, nodes=args.nodes, device=args.device,
        gpu_memory=args.gpu_memory, host_memory=args.host_memory, nvme_space=args.nvme_space, batch=args.batch,
        seq=args.seq, answer_tokens=args.answer_tokens, dtype=args.dtype, tuning=args.tuning,
        quantization=args.quantization, lora_r=args.lora_r, fo_layers=args.fo_layers, rule=args.rule,
        master_weights=args.master_weights, perturb=args.perturb, estimator=args.estimator,
        queries=args.queries,
    )


def alternatives(shape: ModelShape, s: RunSettings) -> list[RunSettings]:
    """The fewest GPUs (up to 64, powers of two) that fit, for each ZeRO-3 offload, with s's GPU memory."""
    found, per_node = [], s.gpus // s.nodes
    for offload in ("none", "cpu", "nvme"):
        for gpus in (1, 2, 4, 8, 16, 32, 64):
            nodes = max(1, math.ceil(gpus / per_node))  # as many GPUs a node as given, more nodes
            if gpus % nodes:
                continue
            candidate = dataclasses.replace(s, mode="zero3", offload=offload, gpus=gpus, nodes=nodes,
                                            quantization="none")
            try:
                if not plan_memory(shape, candidate).problems():
                    found.append(candidate)
                    break
            except ValueError:
                break
    return found


def table(plan: MemoryPlan, model: str) -> str:
    s = plan.settings
    lines = [f"{model}: {plan.shape.parameters / 1e9:.2f}B parameters, {s.dtype}, {s.tuning}"
             f"{f' over {s.quantization}' if s.quantization != 'none' else ''}"
             f"{f', last {s.fo_layers} blocks by backprop' if s.fo_layers else ''}; {s.mode}"
             f"{f' offload {s.offload}' if s.offload != 'none' else ''}, {s.gpus} GPU(s) on {s.nodes} node(s); "
             f"batch {s.batch} x {s.seq} tokens, {s.perturb}, {s.rule}", ""]
    for where, terms, peak in (("per GPU" if s.device == "cuda" else "per rank (CPU)", plan.gpu, plan.per_gpu_bytes),
                               ("host RAM per node", plan.host, plan.host_bytes), ("NVMe", plan.nvme, plan.nvme_bytes)):
        if not terms:
            continue
        lines.append(f"{where}: peak {peak / GiB:.2f} GiB")
        for name, b in sorted(terms.items(), key=lambda kv: -kv[1]):
            when = f"  (during the {plan.phase[name]})" if name in plan.phase else ""
            lines.append(f"  {name:<42} {b / GiB:10.3f} GiB{when}")
    if s.device == "cpu":
        lines.append(f"each rank's resident set at its peak (its share of both): {plan.rank_bytes / GiB:.2f} GiB")
    problems = plan.problems()
    given = s.gpu_memory is not None or s.host_memory is not None or s.nvme_space is not None
    lines.append("")
    if problems:
        lines.append("does not fit: " + "; ".join(problems))
        for alt in alternatives(plan.shape, s):
            other = plan_memory(plan.shape, alt)
            lines.append(f"  fits: --mode zero3 --offload {alt.offload} --gpus {alt.gpus}  "
                         f"({other.per_gpu_bytes / GiB:.1f} GiB per GPU, {other.host_bytes / GiB:.1f} GiB host "
                         f"per node{f', {other.nvme_bytes / GiB:.0f} GiB NVMe' if other.nvme else ''})")
    else:
        lines.append("fits the given hardware" if given else "fits: give --gpu-memory / --host-memory to check")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the plan; raises ValueError (the CLI's exit 2) for settings the trainer would refuse."""
    settings = settings_of(args)
    settings.check()
    shape = ModelShape.of(architecture_config(args.model), settings.fo_layers)
    plan = plan_memory(shape, settings)
    if args.write_ds_config is not None:
        config = plan.ds_config
        if config is None:
            raise ValueError("--write-ds-config needs --mode zero3: other modes run without a DeepSpeed config")
        args.write_ds_config.write_text(json.dumps(config, indent=2) + "\n")
    print(json.dumps(plan.as_json(), indent=2) if args.json else table(plan, args.model))
    return 0
