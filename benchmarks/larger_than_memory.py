"""Fine-tune a model larger than this machine's memory: ZeRO-3 with NVMe parameter offload, from the CLI.

A LLaMA-2-13B-shaped model (``model.name=random:llama-2-13b``: the shipped architecture config, random
init, 13.0B parameters, 26 GB in bf16) on a machine with 24 GB of RAM. transformers builds it inside
``deepspeed.zero.Init`` with ``offload_param.device=nvme``: each parameter is partitioned and swapped out
to its file as it is constructed, so the model never exists whole in memory. Then ``deepspeed
launch/train.py`` (the launcher and the CLI a user runs) takes a few ZO steps (``optim.perturb=in_forward``)
and saves the checkpoint (the HF folder streamed one parameter at a time). One run per method, the same disk:

    zo-sgd   ZO-SGD, the update landing in the forward: each step reads every partition and writes it back
    lozo     LOZO (rank 2, nu = ``--nu``), each matrix's updates held in its pending window
             (zo_scale/core/pending_window.py): a step reads every partition, and writes the matrices back
             only where V is redrawn (every nu steps, the window folded in the forward)
    zo-sgd-pending  ZO-SGD with ``optim.pending_steps`` = ``--pending`` (N): a step reads every partition and
             writes it back every N-th step; in between the forward lands the updates due on transient copies
             (one sweep of compute per update due, per partition read)

and the ratios of their step times: LOZO's steps that hold (read only) and that fold (read and write) over
ZO-SGD's steps that write, and a window of nu = 50 steps estimated from those two (49 holding steps and one
fold, per step); ZO-SGD with pending steps over the same, averaged over one cycle of N steps (t = 2 .. N + 1).
The first step of each run has nothing pending (it only reads), and the first step that
writes compiles the sweep kernel that writes (tens of seconds on this CPU): both are left out of the ratios.

Measured, from the run itself: the peak resident set of the whole job (launcher and ranks, sampled every
0.5 s by this script, and the ranks' own high-water marks from ``summary.json``) over the model's bytes;
partition bytes read + written per step and seconds per step (``metrics.jsonl``); the seconds of each
phase (build, evaluation, steps, save, from the trainer's log timestamps); and, for scale, this disk's
sequential read and write speed (a file of ``--probe-gb`` written and read back with the page cache
dropped from it by ``posix_fadvise``). Writes ``benchmarks/results/larger_than_memory.{json,png}``
(``larger_than_memory_trial_<n>_layers`` with ``--layers n``).

Needs about 2.2x the model's bytes of free disk under ``--scratch`` (the swap files plus the saved
checkpoint), deleted after each method's run unless ``--keep``. Not run by CI: about 40 minutes on 2 cores::

    .venv/bin/python benchmarks/larger_than_memory.py                   # llama-2-13b, bf16, 5 steps a method
    .venv/bin/python benchmarks/larger_than_memory.py --layers 1 --probe-gb 0.5   # a 1.3 GB trial of the shapes
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import common
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent


class TreeRSS:
    """The largest summed resident set of a process and all its descendants, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.root, self.interval, self.peak, self.samples = psutil.Process(pid), interval, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                for proc in [self.root, *self.root.children(recursive=True)]:
                    total += proc.memory_info().rss
            except psutil.Error:  # a process ended between the listing and the read
                pass
            self.peak = max(self.peak, total)
            self.samples.append((time.time(), total))
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def disk_speed(folder: Path, gigabytes: float) -> dict[str, float]:
    """Sequential write (fsync'd) and read speed of ``folder``'s disk, bytes/s, with 8 MiB requests."""
    path, block = folder / "probe.bin", os.urandom(8 << 20)
    count = int(gigabytes * 2**30) // len(block)
    started = time.perf_counter()
    with path.open("wb") as f:
        for _ in range(count):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - started
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from the disk, not from the page cache
    started = time.perf_counter()
    while os.read(fd, len(block)):
        pass
    read_s = time.perf_counter() - started
    os.close(fd)
    path.unlink()
    size = count * len(block)
    return {"write_bytes_per_s": size / write_s, "read_bytes_per_s": size / read_s, "probe_bytes": size}


def architecture(args: argparse.Namespace, scratch: Path) -> tuple[str, dict[str, int]]:
    """The model name to train (a config.json when ``--layers`` cuts the architecture) and its sizes."""
    import torch

    from zo_scale.models.architectures import architecture_config, meta_model

    config = architecture_config(args.arch)
    name = args.arch
    if args.layers:
        config.num_hidden_layers = args.layers
        name = str(scratch / "config.json")
        config.to_json_file(name)
    numels = [p.numel() for p in meta_model(config, torch.bfloat16).parameters()]
    bytes_per = 2 if args.dtype in ("bfloat16", "float16") else 4
    return name, {"parameters": sum(numels), "model_bytes": sum(numels) * bytes_per,
                  "largest_parameter": max(numels), "layers": config.num_hidden_layers}


def ds_config(scratch: Path, args: argparse.Namespace) -> Path:
    """The planner's NVMe-offload config (ds_configs/zero3_offload_nvme.json, swap buffers fitted to the
    largest parameter: DeepSpeed swaps a whole partition into one buffer), swap files under ``scratch``."""
    from zo_scale.models.architectures import architecture_config
    from zo_scale.plan.memory import RunSettings
    from zo_scale.plan.memory import ds_config as planned
    from zo_scale.plan.shapes import ModelShape

    config = architecture_config(args.arch)
    if args.layers:
        config.num_hidden_layers = args.layers
    settings = RunSettings(mode="zero3", offload="nvme", gpus=1, dtype=args.dtype)
    path = scratch / "ds_config.json"
    path.write_text(json.dumps(planned(settings, ModelShape.of(config), nvme_path=str(scratch / "nvme")), indent=2))
    return path


PHASES = [  # (phase, the trainer log line that ends it)
    ("build the model into NVMe offload", r"model .* trainable elements"),
    ("zero-shot evaluation", r"zero-shot eval accuracy"),
]


def log_phases(log: str, started: float, ended: float) -> dict[str, float]:
    """Seconds of each phase from the trainer's ``HH:MM:SS`` log timestamps (1 s resolution)."""
    day = datetime.fromtimestamp(started).date()
    stamps = []
    for phase, pattern in PHASES:
        match = re.search(r"^(\d\d:\d\d:\d\d) .*" + pattern, log, re.M)
        if match:
            stamps.append((phase, datetime.combine(day, datetime.strptime(match[1], "%H:%M:%S").time()).timestamp()))
    phases, last = {}, started
    for phase, stamp in stamps:
        phases[phase] = stamp - last
        last = stamp
    phases["steps, final evaluation and save"] = ended - last
    return phases


METHODS = {  # the optimizer overrides of each method's run
    "zo-sgd": ["optim.rule=sgd"],
    "lozo": ["optim.rule=sgd", "optim.sampler=lowrank"],  # + optim.nu
    "zo-sgd-pending": ["optim.rule=sgd"],  # + optim.pending_steps
}


def run_method(method: str, args: argparse.Namespace, name: str, sizes: dict[str, int]) -> tuple[dict, TreeRSS, float]:
    """One launch of ``method`` under --scratch: its results (memory, bytes and seconds per step, phases), its
    memory samples and its start time."""
    out = args.scratch / "run"
    shutil.rmtree(args.scratch / "nvme", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    extra = [*METHODS[method], *([f"optim.nu={args.nu}"] if method == "lozo" else []),
             *([f"optim.pending_steps={args.pending}"] if method == "zo-sgd-pending" else [])]
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", "29781", str(ROOT / "launch" / "train.py"),
           "--deepspeed", str(ds_config(args.scratch, args)),
           f"model.name=random:{name}", f"model.dtype={args.dtype}", "task.name=sst2-demo", "task.num_train=16",
           "task.num_eval=2", f"task.max_length={args.seq}", f"run.batch_size={args.batch}", "run.eval_batch_size=2",
           f"run.steps={args.steps}", "run.log_every=1", "run.progress=false", f"run.output_dir={out}",
           "optim.perturb=in_forward", "optim.lr=1e-6", "optim.eps=1e-3", *extra]
    print(" ".join(cmd), flush=True)
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={k: v for k, v in os.environ.items() if k != "TORCH_LOGS"})
    rss = TreeRSS(proc.pid)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        print(line, end="", flush=True)
    proc.wait()
    ended = time.time()
    rss.stop()
    log = "".join(lines)
    if proc.returncode != 0:
        sys.exit(f"the {method} run failed (exit {proc.returncode})")

    summary = json.loads((out / "summary.json").read_text())
    train = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    model_dir = Path(summary["model"])
    index = model_dir / "model.safetensors.index.json"  # absent when the model fits one shard
    tensor_bytes = json.loads(index.read_text())["metadata"]["total_size"] if index.exists() else None
    saved = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    model_bytes = sizes["model_bytes"]
    rank_peak = max(p["host_rss"] for p in summary["peak_memory_bytes"])
    results = {
        "command": " ".join(cmd),
        "job_peak_rss_bytes": rss.peak,
        "job_peak_rss_over_model_bytes": rss.peak / model_bytes,
        "rank_peak_rss_bytes": rank_peak,
        "rank_peak_rss_over_model_bytes": rank_peak / model_bytes,
        "swapped_bytes_per_step": [r["swapped_bytes_per_step"] for r in train],
        "swapped_bytes_per_step_over_model_bytes": [r["swapped_bytes_per_step"] / model_bytes for r in train],
        "s_per_step": [1 / r["steps_per_s"] for r in train],
        "swap_bytes_per_s_in_a_step": [r["swapped_bytes_per_step"] * r["steps_per_s"] for r in train],
        "phases_s": log_phases(log, started, ended),
        "total_s": ended - started,
        "checkpoint": {"tensor_bytes": tensor_bytes, "file_bytes": saved,
                       "files": len(list(model_dir.glob("*.safetensors")))},
        "losses": [r["loss"] for r in train],
    }
    if not args.keep:
        shutil.rmtree(args.scratch / "nvme", ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return results, rss, started


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def compare(runs: dict[str, dict], nu: int, pending: int) -> dict[str, float]:
    """LOZO's holding and folding steps over ZO-SGD's writing steps, the first step of each kind left out where it
    compiles (ZO-SGD's step 1, LOZO's first fold), and a window of 50 steps from them; ZO-SGD with pending steps
    over the same, its steps and bytes averaged over the cycle t = 2 .. pending + 1 (one write in it)."""
    if "zo-sgd" not in runs:
        return {}
    sgd = mean(runs["zo-sgd"]["s_per_step"][2:])
    out = {"zo_sgd_s_per_writing_step": sgd}
    if "lozo" in runs:
        steps = runs["lozo"]["s_per_step"]
        held = mean([s for t, s in enumerate(steps) if t and t % nu])
        fold = mean([s for t, s in enumerate(steps) if t > nu and not t % nu])
        out |= {"lozo_holding_s_per_step": held, "lozo_folding_s_per_step": fold,
                "lozo_holding_over_zo_sgd": held / sgd, "lozo_folding_over_zo_sgd": fold / sgd,
                "lozo_window_of_50_over_zo_sgd_estimated": (49 * held + fold) / 50 / sgd}
    if "zo-sgd-pending" in runs:
        run, cycle = runs["zo-sgd-pending"], slice(2, 2 + pending)
        out |= {"zo_sgd_pending_s_per_step": mean(run["s_per_step"][cycle]),
                "zo_sgd_pending_over_zo_sgd": mean(run["s_per_step"][cycle]) / sgd,
                "zo_sgd_pending_swapped_over_model_bytes": mean(run["swapped_bytes_per_step_over_model_bytes"][cycle])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llama-2-13b", help="a shipped architecture (zo_scale.models.ARCHITECTURES)")
    parser.add_argument("--layers", type=int, default=0, help="cut the architecture to this many blocks (0: all)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32, help="task.max_length")
    parser.add_argument("--methods", default="zo-sgd,lozo,zo-sgd-pending", help=f"comma-separated, of {list(METHODS)}")
    parser.add_argument("--nu", type=int, default=2, help="LOZO's nu: with 5 steps, steps 2 and 4 fold (V redrawn)")
    parser.add_argument("--pending", type=int, default=3,
                        help="zo-sgd-pending's optim.pending_steps: with 5 steps, step 3 writes (t = 2 .. 4: a cycle)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "zo_scale_larger_than_memory")
    parser.add_argument("--probe-gb", type=float, default=4.0, help="size of the disk-speed probe file")
    parser.add_argument("--keep", action="store_true", help="keep the swap files and the checkpoint")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        sys.exit(f"--methods: unknown {sorted(unknown)}; choose from {list(METHODS)}")

    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)
    name, sizes = architecture(args, args.scratch)
    need = 2.2 * sizes["model_bytes"]
    free = shutil.disk_usage(args.scratch).free
    if free < need:
        sys.exit(f"--scratch {args.scratch}: {free / 1e9:.0f} GB free, the run needs about {need / 1e9:.0f} GB")
    disk = disk_speed(args.scratch, args.probe_gb)
    print("disk:", {k: f"{v / 1e9:.2f} GB/s" if k.endswith("per_s") else v for k, v in disk.items()}, flush=True)
    runs, samples = {}, {}
    for method in methods:
        runs[method], rss, started = run_method(method, args, name, sizes)
        samples[method] = [(t - started, b) for t, b in rss.samples]
    results = {**sizes, "machine_ram_bytes": psutil.virtual_memory().total,
               "model_over_machine_ram": sizes["model_bytes"] / psutil.virtual_memory().total, "disk": disk,
               "runs": runs, **compare(runs, args.nu, args.pending)}
    notes = [
        f"one rank under the deepspeed launcher (--num_gpus 1 on a CPU machine), ZeRO-3 NVMe parameter offload "
        f"(ds_configs/zero3_offload_nvme.json, nvme_path under --scratch, buffer_size fitted to the largest "
        f"parameter), model.name=random:{args.arch}, {args.dtype}, optim.perturb=in_forward with optim.rule=sgd; "
        f"one run per method, one after the other on the same disk (LOZO: optim.sampler=lowrank, optim.nu={args.nu}; "
        f"zo-sgd-pending: optim.pending_steps={args.pending}).",
        "job_peak_rss: launcher + rank, summed, sampled every 0.5 s; rank_peak_rss: the rank's own ru_maxrss "
        "(summary.json peak_memory_bytes). Neither counts the page cache, which the swap files fill.",
        "swapped_bytes_per_step: partition bytes read + written by the NVMe swapper in the step (metrics.jsonl).",
        "lozo_*_over_zo_sgd: LOZO's steps t > 0 with t % nu != 0 (holding: reads only) and t > nu with t % nu == 0 "
        "(folding: reads and writes; the first fold, t = nu, compiles the fold's kernel) over the mean of ZO-SGD's "
        "steps t > 1 (step 0 has nothing pending, step 1 compiles the landing kernel); "
        "lozo_window_of_50_over_zo_sgd_estimated: (49 holding + 1 folding) / 50 over it, computed from those "
        "measured steps, not run.",
        "zo_sgd_pending_*: the mean over steps t = 2 .. pending + 1 (pending - 1 steps that land the due updates on "
        "transient copies and one that lands them all and writes) over the same ZO-SGD mean.",
        "the loss of a random-init model means nothing; its memory, bytes and seconds are the real model's.",
    ]
    settings = {k: str(v) for k, v in vars(args).items()}
    print("wrote", common.write_json(result_name(args), settings, results, notes))
    print(json.dumps({k: v for k, v in results.items() if k not in ("disk", "runs")}, indent=2))
    plot(samples, results, args)
    if not args.keep:
        shutil.rmtree(args.scratch, ignore_errors=True)


def result_name(args: argparse.Namespace) -> str:
    """larger_than_memory for the whole architecture; a trial cut to ``--layers`` blocks writes its own files."""
    return "larger_than_memory" + (f"_trial_{args.layers}_layers" if args.layers else "")


def plot(samples: dict[str, list[tuple[float, int]]], results: dict, args: argparse.Namespace) -> None:
    fig, ax = common.new_figure(8, 4)
    gib = 2**30
    for (method, points), color in zip(samples.items(), ["#4c72b0", "#55a868", "#8172b2"], strict=False):
        peak = results["runs"][method]["job_peak_rss_over_model_bytes"]
        ax.plot([t / 60 for t, _ in points], [b / gib for _, b in points], color=color,
                label=f"{method}: job resident memory (launcher + rank), peak {peak:.2f}x the model")
    ax.axhline(results["model_bytes"] / gib, color="#c44e52", ls="--", label="model bytes")
    ax.axhline(results["machine_ram_bytes"] / gib, color="k", ls=":", label="machine RAM")
    ax.set_xlabel("minutes since launch")
    ax.set_ylabel("GiB")
    ratio = results.get("lozo_holding_over_zo_sgd")
    ax.set_title(f"{args.arch}{f' ({args.layers} blocks)' if args.layers else ''}, {args.dtype}, ZeRO-3 NVMe offload"
                 + (f"\nLOZO step (holding) / ZO-SGD step: {ratio:.2f}x" if ratio else ""), fontsize=10)
    ax.legend(loc="center right", fontsize=8)
    common.save_figure(fig, result_name(args))


if __name__ == "__main__":
    main()
