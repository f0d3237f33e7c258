"""Rank 0's memory while a ZeRO-3 checkpoint's weights are saved: gathered whole vs streamed in shards.

Two gloo ranks hold a LLaMA-shaped model (fp32, random init, partitioned at construction through
``from_config``) of ``--hidden`` x ``--layers``. Each way of saving runs
in its own ``torchrun`` job (so one's memory cannot hide the other's):

- gathered (the baseline, zo-scale's save before streaming): ``Zero3Runtime.full_state_dict`` copies every
  full parameter to rank 0, then ``save_pretrained(state_dict=...)`` writes them;
- streamed: ``Zero3Runtime.save_model``, one parameter gathered at a time and appended to its shard
  file (of at most ``--shard``) while gathered.

Rank 0's resident set (VmRSS) is sampled every 2 ms by a thread during the save; reported: its peak,
and the peak minus the RSS just before the save (what the save itself holds; freed heap is handed
back to the OS first, with malloc_trim), both over the model's bytes, for each model size
(``--layers``: 8 and 16, about 2.2 and 3.8 GB). The workers run with ``MALLOC_MMAP_THRESHOLD_`` =
1 MiB (``--mmap-threshold``): with glibc's dynamic threshold, tensors freed during the save (the
gathered parameters under 32 MiB) stay in the process's heap, reusable but resident, and RSS then
grows with the number of parameters saved although none is held. Writes
benchmarks/results/checkpoint_memory.{json,png}. About 4 minutes on 2 cores:

    .venv/bin/python benchmarks/checkpoint_memory.py
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRSS:
    """The largest VmRSS seen while inside (sampled by a thread every ``interval`` s)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def worker(args: argparse.Namespace) -> None:
    """One rank: build the model under ZeRO-3, save it the chosen way, rank 0 prints one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from zo_scale.backends.zero3 import Zero3Runtime

    runtime = Zero3Runtime(ROOT / "ds_configs" / "zero3.json")
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers[0], num_attention_heads=args.hidden // 128,
                         num_key_value_heads=args.hidden // 128,
                         vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    model, _ = runtime.load_model(lambda: (AutoModelForCausalLM.from_config(config, dtype=torch.float32), None))
    model_bytes = sum(p.ds_numel * 4 for p in model.parameters())
    largest = max(p.ds_numel * 4 for p in model.parameters())
    folder = Path(args.out) / args.way
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back to the OS: RSS before = what is held now
    runtime.barrier()
    started = time.perf_counter()
    with PeakRSS() as peak:
        if args.way == "gathered":
            state = runtime.full_state_dict(model)
            if runtime.is_main:
                model.save_pretrained(folder, state_dict=state, max_shard_size=args.shard)
            del state
        else:
            runtime.save_model(model, folder, common_size(args.shard))
    seconds = time.perf_counter() - started
    runtime.barrier()
    if runtime.is_main:
        files = sorted(folder.glob("*.safetensors"))
        print(json.dumps({"way": args.way, "model_bytes": model_bytes, "largest_parameter_bytes": largest,
                          "shard_limit_bytes": common_size(args.shard), "rss_before_bytes": peak.before,
                          "rss_peak_bytes": peak.peak, "save_s": seconds, "files": len(files),
                          "largest_file_bytes": max(f.stat().st_size for f in files)}))
    runtime.close()


def common_size(text: str) -> int:
    from zo_scale.models.sharded_safetensors import parse_size

    return parse_size(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16], help="one model per layer count")
    parser.add_argument("--shard", default="256MB")
    parser.add_argument("--mmap-threshold", type=int, default=1 << 20,
                        help="MALLOC_MMAP_THRESHOLD_ of the workers (0: glibc's dynamic default)")
    parser.add_argument("--way", choices=["gathered", "streamed"], help=argparse.SUPPRESS)  # worker only
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way is not None:
        worker(args)
        return
    runs = []
    for layers in args.layers:
        for way in ("gathered", "streamed"):
            with tempfile.TemporaryDirectory(prefix="zo-ckpt-", dir=ROOT) as out:
                cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                       str(29750 + len(runs)), __file__, "--way", way, "--out", out, "--hidden", str(args.hidden),
                       "--layers", str(layers), "--shard", args.shard]
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                if args.mmap_threshold:
                    env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{way} failed:\n{proc.stderr[-4000:]}")
            runs.append({"layers": layers, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(runs[-1])
    summary = {}
    for layers in args.layers:
        by = {r["way"]: r for r in runs if r["layers"] == layers}
        model_bytes = by["gathered"]["model_bytes"]
        summary[f"{layers} layers"] = {
            "model_bytes": model_bytes,
            **{way: {"peak_rss_over_model_bytes": r["rss_peak_bytes"] / model_bytes,
                     "save_held_over_model_bytes": (r["rss_peak_bytes"] - r["rss_before_bytes"]) / model_bytes,
                     "save_held_over_largest_parameter": (r["rss_peak_bytes"] - r["rss_before_bytes"])
                     / r["largest_parameter_bytes"], "save_s": r["save_s"]} for way, r in by.items()},
            "streamed_over_gathered_peak_rss": by["streamed"]["rss_peak_bytes"] / by["gathered"]["rss_peak_bytes"]}
    notes = [
        "rank 0 of 2 gloo ranks, ZeRO-3 (ds_configs/zero3.json), model partitioned at construction: each rank "
        "holds half the model before the save (rss_before).",
        "gathered: full_state_dict (every full parameter copied to rank 0) then save_pretrained; streamed: "
        "Zero3Runtime.save_model (one parameter gathered at a time, its bytes appended to its shard file).",
        "save_held: peak RSS during the save minus RSS just before it; the streamed bound is the gathered "
        "parameter in hand (the largest: largest_parameter_bytes) and the all-gather's buffers, whatever the "
        "shard size and the model size.",
        "MALLOC_MMAP_THRESHOLD_ fixed (settings.mmap_threshold) so freed tensors leave RSS; with glibc's dynamic "
        "default one streamed run (16 layers) held 1489 MiB instead of 496 MiB: freed heap kept resident.",
    ]
    settings = vars(args) | {"model": "LlamaForCausalLM(from_config), fp32, untied, vocab 32000", "ranks": 2}
    settings.pop("way"), settings.pop("out")
    print("wrote", common.write_json("checkpoint_memory", settings, {"runs": runs, "summary": summary}, notes))
    print(json.dumps(summary, indent=2))

    fig, ax = common.new_figure(7, 4)
    gib = 2**30
    labels = [f"{r['way']}\n{r['model_bytes'] / gib:.1f} GiB model" for r in runs]
    ax.bar(labels, [r["rss_before_bytes"] / gib for r in runs], color="#c7d3e8", label="before the save")
    ax.bar(labels, [(r["rss_peak_bytes"] - r["rss_before_bytes"]) / gib for r in runs],
           bottom=[r["rss_before_bytes"] / gib for r in runs], color="#4c72b0", label="held by the save (peak)")
    ax.set_ylabel("rank 0 resident memory (GiB)")
    ax.set_title(f"ZeRO-3 save, 2 ranks, shards of {args.shard}")
    ax.legend()
    fig.savefig(common.RESULTS_DIR / "checkpoint_memory.png", dpi=120)


if __name__ == "__main__":
    main()
