"""Scale-out on one CPU machine: bytes communicated per step, step time on 1 vs 2 ranks, ZeRO-3 gathers.

Each (mode, world size) runs ``scale_out_worker.py`` under ``torchrun`` (gloo) on the OPT-125m-shaped
model with a global batch of ``--rows`` x ``--seq`` tokens: one rank takes all rows with
``--threads`` torch threads; two ranks take half the rows each, with half the threads each (the
machine's cores shared, not doubled: on 2 cores, 2 ranks cannot be faster than 1 except by
threading better). Modes: ZO replicated data parallel, first-order DDP (SGD), ZO over ZeRO-3 (in
place, and with ``perturb="in_forward"``: one forward, one gather per step), and on 1 rank ZeRO-3
with CPU offload and with NVMe offload (both ways), to compare with ZeRO-3 kept in memory. NVMe runs
count the partition bytes read from and written to the swap files per step.

Reported per run: median step time over ``--steps`` after one warmup step, the payload bytes each
rank hands to collectives per step, and for ZeRO-3 the collectives of one profiled step.

Run (about 6 minutes on 2 cores; NVMe modes need DeepSpeed's async_io op, i.e. libaio):
    .venv/bin/python benchmarks/scale_out.py
Writes benchmarks/results/scale_out.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
# mode -> the world sizes it runs on
MODES = {"zo-replicated": (1, 2), "fo-ddp": (1, 2), "zo-zero3": (1, 2), "zo-zero3-in-forward": (1, 2),
         "zo-zero3-offload": (1,), "zo-zero3-offload-in-forward": (1,),
         "zo-zero3-nvme": (1,), "zo-zero3-nvme-in-forward": (1,)}


def run(mode: str, world: int, rows: int, seq: int, steps: int, threads: int, port: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // world))}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(world), "--master_port",
           str(port), str(HERE / "scale_out_worker.py"), "--mode", mode, "--rows", str(rows // world),
           "--seq", str(seq), "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} on {world} rank(s) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    results = []
    for i, (mode, worlds) in enumerate(MODES.items()):
        for world in worlds:
            r = run(mode, world, args.rows, args.seq, args.steps, args.threads, 29700 + 2 * i + world)
            print(f"{mode:14s} {world} rank(s): {r['step_s_median']:.2f} s/step, "
                  f"{r['bytes_sent_per_step_per_rank']:,} B/step/rank")
            results.append(r)
    by = {(r["mode"], r["world_size"]): r for r in results}
    zo_bytes = by[("zo-replicated", 2)]["bytes_sent_per_step_per_rank"]
    ddp_bytes = by[("fo-ddp", 2)]["bytes_sent_per_step_per_rank"]
    z3 = by[("zo-zero3", 2)]
    model_bytes = z3["parameters"] * 4
    summary = {
        "ddp_bytes_over_zo_bytes": ddp_bytes / zo_bytes,
        "two_rank_over_one_rank_step_time": {m: by[(m, 2)]["step_s_median"] / by[(m, 1)]["step_s_median"]
                                             for m, worlds in MODES.items() if 2 in worlds},
        "zero3_gathered_bytes_over_model_bytes": {m: by[(m, 2)]["gathered_bytes_per_step"] / model_bytes
                                                  for m in ("zo-zero3", "zo-zero3-in-forward")},
        "one_rank_offload_over_zero3_step_time": {
            perturb: by[(f"zo-zero3-offload{suffix}", 1)]["step_s_median"]
            / by[(f"zo-zero3{suffix}", 1)]["step_s_median"]
            for perturb, suffix in (("in_place", ""), ("in_forward", "-in-forward"))},
        "one_rank_nvme_over_zero3_step_time": {
            perturb: by[(f"zo-zero3-nvme{suffix}", 1)]["step_s_median"] / by[(f"zo-zero3{suffix}", 1)]["step_s_median"]
            for perturb, suffix in (("in_place", ""), ("in_forward", "-in-forward"))},
        "nvme_swapped_bytes_over_model_bytes": {
            perturb: by[(f"zo-zero3-nvme{suffix}", 1)]["swapped_bytes_per_step"] / model_bytes
            for perturb, suffix in (("in_place", ""), ("in_forward", "-in-forward"))},
        "zero3_in_forward_over_in_place_step_time": {
            w: by[("zo-zero3-in-forward", w)]["step_s_median"] / by[("zo-zero3", w)]["step_s_median"] for w in (1, 2)},
        "zero3_allgathers_per_step": z3["collectives_per_step"].get("c10d::_allgather_base_", 0),
        "zero3_allgathers_per_decoder_layer_per_step":
            z3["collectives_per_step"].get("c10d::_allgather_base_", 0) / z3["decoder_layers"],
    }
    notes = [
        "bytes: payload handed to all-reduce per step per rank; ZO sends its 2 float64 losses, DDP every gradient.",
        "ZeRO-3 gathers every parameter once per forward, so a ZO step (2 forwards) gathers the model twice, "
        "and once with perturb='in_forward' (1 forward over the batch stacked twice); DeepSpeed coalesces "
        "parameters into prefetch buckets, so all-gather calls per layer can be below 1.",
        "gathered bytes: the outputs of the all-gathers, counted by Zero3Runtime (all ranks' partitions).",
        "swapped bytes (NVMe, 1 rank): partition bytes read from and written to the swap files per step, counted "
        "by Zero3Runtime around DeepSpeed's swapper; partitions under DeepSpeed's minimum swap size (1 MiB) stay "
        "in CPU memory. In place: 2 forwards read, 2 sweeps read and write. in_forward with ZO-SGD (lazy): the "
        "forward reads each partition and writes it back with the last step's update landed.",
        "2 ranks on 2 cores split the same cores: step-time ratios measure overheads, not scaling.",
    ]
    settings = vars(args) | {"model": "OPTForCausalLM(OPTConfig()) fp32, random init", "backend": "gloo"}
    print("wrote", common.write_json("scale_out", settings, {"runs": results, "summary": summary}, notes))
    print(json.dumps(summary, indent=2))

    fig, (ax_t, ax_b) = common.new_figure(11, 4.2, ncols=2)
    runs = [(m, w) for m, worlds in MODES.items() for w in worlds]
    labels = [m.replace("-in-forward", "\nin_forward") + f"\n{w} rank{'s' if w > 1 else ''}" for m, w in runs]
    ax_t.bar(labels, [by[run]["step_s_median"] for run in runs],
             color=["#8fa9d6" if w > 1 else "#4c72b0" for _, w in runs])
    ax_t.set_ylabel("seconds per step (median)")
    ax_t.set_title(f"step time, global batch {args.rows}x{args.seq}, {args.threads} cores")
    ax_t.tick_params(axis="x", labelsize=7)
    ax_b.bar(["ZO replicated", "FO DDP"], [zo_bytes, ddp_bytes], color=["#4c72b0", "#dd8452"])
    ax_b.set_yscale("log")
    ax_b.set_ylabel("bytes sent per step per rank (log)")
    ax_b.set_title(f"communication, 2 ranks: DDP / ZO = {ddp_bytes / zo_bytes:.2g}x")
    for x, v in enumerate((zo_bytes, ddp_bytes)):
        ax_b.annotate(f"{v:,.0f} B", (x, v), ha="center", va="bottom")
    fig.savefig(common.RESULTS_DIR / "scale_out.png", dpi=120)


if __name__ == "__main__":
    main()
