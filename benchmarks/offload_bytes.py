"""Bytes over the slow link per step under ZeRO-3 offload, through the trainer: what pending updates save.

Two ranks (``torchrun``, gloo) train the launcher test's wide tiny LLaMA (256 x 2048 MLP matrices, whose
2-rank partitions are 1 MiB: the smallest DeepSpeed swaps to NVMe files) with ``optim.perturb=in_forward``
for ``--steps`` steps, one run per (offload, method):

    zo-sgd       ZO-SGD, each update landed in the next forward and written back: a read and a write a step
    zo-sgd-N     ZO-SGD with ``optim.pending_steps=N`` (``--pending``): the partitions written every N-th step,
                 the updates due landed on transient copies in between
    lozo         LOZO (rank 2, nu = ``--nu``): the matrices written once a V window (pending_window.py), the
                 1-D parameters every step

offload ``nvme`` (``ds_configs/zero3_offload_nvme.json``, files under ``--scratch``) and ``cpu``
(``ds_configs/zero3_offload_cpu.json``). Counted per step by the trainer (``metrics.jsonl``, rank 0):

- NVMe: ``swapped_bytes_per_step``, partition bytes read from and written to the swap files, over this
  rank's bytes of the swapped partitions;
- CPU offload: reads, ``gathered_bytes_per_step`` over the model's bytes (each gather reads every rank's
  partition of a parameter once: 1.00 is the model read once), and writes, ``stored_bytes_per_step`` (the
  forward's stores into the host partitions) over this rank's partition bytes. On a GPU these are the
  PCIe transfers; on this CPU the same copies between host buffers.

Each ratio is the mean over steps 1 .. steps - 1 (step 0 has no update pending). The bounds the design
aims at: 1 + 1/N for ZO-SGD with N pending steps, (nu + 1) / nu plus the 1-D parameters for LOZO.
Writes ``benchmarks/results/offload_bytes.{json,png}``. About 10 minutes on 2 cores (NVMe runs need
libaio)::

    .venv/bin/python benchmarks/offload_bytes.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def methods(pending: list[int], nu: int) -> dict[str, list[str]]:
    """Each method's optimizer overrides."""
    out = {"zo-sgd": ["optim.rule=sgd"]}
    out |= {f"zo-sgd-{n}": ["optim.rule=sgd", f"optim.pending_steps={n}"] for n in pending}
    out["lozo"] = ["optim.rule=sgd", "optim.sampler=lowrank", f"optim.nu={nu}"]
    return out


def build_model(folder: Path) -> dict[str, int]:
    """The wide tiny LLaMA of tests/backends/test_launchers.py, saved with the byte tokenizer; its bytes (fp32):
    all, and those of the tensors whose 2-rank partitions DeepSpeed swaps to NVMe (1 MiB and more)."""
    from zo_scale.models import build_byte_tokenizer, build_tiny_model

    model = build_tiny_model("llama", seed=3, hidden_size=256, intermediate_size=2048)
    model.save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    sizes = [p.numel() * 4 for p in model.parameters()]
    return {"model_bytes": sum(sizes), "swapped_model_bytes": sum(b for b in sizes if b // 2 >= 1 << 20)}


def ds_config(offload: str, scratch: Path) -> Path:
    config = json.loads((ROOT / "ds_configs" / f"zero3_offload_{offload}.json").read_text())
    if offload == "nvme":
        config["zero_optimization"]["offload_param"]["nvme_path"] = str(scratch / "nvme")
    path = scratch / f"{offload}.json"
    path.write_text(json.dumps(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(offload: str, method: list[str], model: Path, scratch: Path, steps: int) -> list[dict]:
    """One 2-rank run; its train rows of metrics.jsonl (one a step)."""
    out = scratch / "run"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(scratch / "nvme", ignore_errors=True)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/train.py",
           "--deepspeed", str(ds_config(offload, scratch)), f"model.name={model}", "task.name=sst2-demo",
           "task.num_train=64", "task.num_eval=4", "task.max_length=64", "run.batch_size=8", "run.eval_batch_size=4",
           f"run.steps={steps}", "run.log_every=1", "run.progress=false", f"run.output_dir={out}",
           "optim.perturb=in_forward", "optim.lr=1e-3", "optim.eps=1e-3", *method]
    print(" ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        log = proc.stdout[-3000:] + proc.stderr[-3000:]
        sys.exit(f"{offload} {' '.join(method)} failed ({proc.returncode}):\n{log}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def ratios(offload: str, rows: list[dict], sizes: dict[str, int]) -> dict[str, float | list[float]]:
    """Read, written and their sum per step over the model (steps 1 ..), and the per-step series."""
    later = rows[1:]
    if offload == "nvme":
        share = sizes["swapped_model_bytes"] / 2
        series = [r["swapped_bytes_per_step"] / share for r in rows]
        return {"read_plus_written_over_model": sum(series[1:]) / len(later), "per_step": series}
    share = sizes["model_bytes"] / 2
    read = [r["gathered_bytes_per_step"] / sizes["model_bytes"] for r in rows]
    written = [r["stored_bytes_per_step"] / share for r in rows]
    return {"read_over_model": sum(read[1:]) / len(later), "written_over_model": sum(written[1:]) / len(later),
            "read_plus_written_over_model": (sum(read[1:]) + sum(written[1:])) / len(later),
            "per_step_read": read, "per_step_written": written}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=101, help="with nu = 50: two windows folded (steps 50, 100)")
    parser.add_argument("--nu", type=int, default=50)
    parser.add_argument("--pending", default="4,20", help="comma-separated optim.pending_steps values")
    parser.add_argument("--offloads", default="nvme,cpu")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "zo_scale_offload_bytes")
    args = parser.parse_args()
    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)
    sizes = build_model(args.scratch / "wide-llama")
    by_method = methods([int(n) for n in args.pending.split(",")], args.nu)
    results: dict[str, dict] = {}
    for offload in args.offloads.split(","):
        for name, overrides in by_method.items():
            rows = run(offload, overrides, args.scratch / "wide-llama", args.scratch, args.steps)
            result = results[f"{offload} {name}"] = ratios(offload, rows, sizes)
            print(f"{offload} {name}: read + written / model {result['read_plus_written_over_model']:.3f}", flush=True)
    notes = [
        "2 ranks (torchrun, gloo, OMP_NUM_THREADS=1), the wide tiny LLaMA of tests/backends/test_launchers.py (fp32), "
        "optim.perturb=in_forward, optim.lr=1e-3, batch 8 x 64 tokens; metrics.jsonl of rank 0, one row a step.",
        "nvme: swapped_bytes_per_step over this rank's bytes of the partitions DeepSpeed swaps (1 MiB and more; the "
        "rest stay in memory). cpu: gathered_bytes_per_step over the model's bytes (reads) plus stored_bytes_per_step "
        "over this rank's partition bytes (writes).",
        "read_plus_written_over_model: the mean over steps 1 .. steps - 1 (step 0 reads only: nothing is pending).",
        f"lozo: optim.sampler=lowrank, optim.rank=2, optim.nu={args.nu}: its 1-D parameters are written every step.",
    ]
    settings = {k: str(v) for k, v in vars(args).items()} | sizes
    print("wrote", common.write_json("offload_bytes", settings, results, notes))
    plot(results, args)
    shutil.rmtree(args.scratch, ignore_errors=True)


def plot(results: dict[str, dict], args: argparse.Namespace) -> None:
    fig, ax = common.new_figure(8, 4)
    labels = list(results)
    values = [r["read_plus_written_over_model"] for r in results.values()]
    bars = ax.barh(labels, values, color="#4c72b0")
    for bar, value in zip(bars, values, strict=True):
        ax.text(value, bar.get_y() + bar.get_height() / 2, f" {value:.3f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="k", ls=":", label="the model read once")
    ax.invert_yaxis()
    ax.set_xlabel("partition bytes read + written per step / model bytes (mean over steps 1 ..)")
    ax.set_title(f"ZeRO-3 offload, 2 ranks, in_forward, {args.steps} steps", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    common.save_figure(fig, "offload_bytes")


if __name__ == "__main__":
    main()
