"""One rank of benchmarks/scale_out.py (run under torchrun): time a few training steps of one mode.

Modes, all on the OPT-125m-shaped model, each rank with ``--rows`` rows of ``--seq`` tokens:
    zo-replicated  ZO-SGD, every rank the whole model; the step's losses all-reduced (DistributedRuntime)
    fo-ddp         first-order SGD under DistributedDataParallel (gradients all-reduced in buckets)
    zo-zero3       ZO-SGD over ZeRO-3 partitions (Zero3Runtime, ds_configs/zero3.json)
    zo-zero3-in-forward          the same with perturb="in_forward" (closure: common.stacked_lm_losses)
    zo-zero3-offload[-in-forward]  the two above with the partitions in CPU memory (zero3_offload_cpu.json)
    zo-zero3-nvme[-in-forward]     ... and in files (zero3_offload_nvme.json, nvme_path a temporary folder)
Bytes: the payload handed to the collectives per step, per rank (ZO: the runtime's count of its
loss all-reduces; DDP: the gradient buckets, counted by a comm hook around DDP's own all-reduce
hook). ZeRO-3 also counts the bytes it all-gathers per step (Zero3Runtime.gathered_bytes), the
partition bytes it reads from and writes to NVMe (Zero3Runtime.swapped_bytes) and its collectives in
one step under the torch profiler. Rank 0 prints one JSON line.
"""


import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import common
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", category=FutureWarning)


def zo_step_fn(mode: str, ids: torch.Tensor) -> tuple[object, torch.nn.Module, object]:
    """(runtime, model, step function) for the ZO modes."""
    import zo_scale

    if mode.startswith("zo-zero3"):
        from zo_scale.backends.zero3 import Zero3Runtime

        name = "zero3_offload_cpu" if "offload" in mode else "zero3_offload_nvme" if "nvme" in mode else "zero3"
        config = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
        if "nvme" in mode:
            config["zero_optimization"]["offload_param"]["nvme_path"] = tempfile.mkdtemp(prefix="zo-nvme-")
        runtime = Zero3Runtime(config)
    else:
        from zo_scale.backends.replicated import DistributedRuntime

        runtime = DistributedRuntime()
    if mode.startswith("zo-zero3"):  # constructed inside zero.Init, as the trainer does (from_config)
        model, _ = runtime.load_model(lambda: (common.opt_125m_from_config(), None))
    else:
        model, _ = runtime.load_model(lambda: (common.opt_125m("fp32"), None))
    perturb = "in_forward" if mode.endswith("in-forward") else "in_place"
    opt = zo_scale.ZOSGD(model.named_parameters(), lr=1e-6, eps=1e-3, lazy=True, perturb=perturb, model=model,
                         **runtime.optimizer_kwargs())
    if perturb == "in_forward":
        return runtime, model, lambda: opt.step(lambda groups: common.stacked_lm_losses(model, ids, groups))
    return runtime, model, lambda: opt.step(lambda: model(input_ids=ids, labels=ids).loss)


def ddp_step_fn(ids: torch.Tensor) -> tuple[dict[str, int], torch.nn.Module, object]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    model = common.opt_125m("fp32")
    ddp = DistributedDataParallel(model)
    counter = {"bytes": 0}

    def counting_hook(state: dict[str, int], bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(counter, counting_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-6)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return float(loss)

    return counter, model, step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True, choices=["zo-replicated", "fo-ddp", "zo-zero3", "zo-zero3-in-forward",
                                                          "zo-zero3-offload", "zo-zero3-offload-in-forward",
                                                          "zo-zero3-nvme", "zo-zero3-nvme-in-forward"])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    ids = common.lm_batch(args.rows, args.seq, seed=int(os.environ.get("RANK", "0")))
    if args.mode == "fo-ddp":
        counter, model, step = ddp_step_fn(ids)
        sent = lambda: counter["bytes"]  # noqa: E731
    else:
        runtime, model, step = zo_step_fn(args.mode, ids)
        sent = lambda: runtime.comm_bytes  # noqa: E731
    step()  # warmup (ZeRO-3 records its fetch trace over the first step)
    times, bytes_per_step, gathered, swapped = [], [], [], []
    zero3 = args.mode.startswith("zo-zero3")
    for _ in range(args.steps):
        before = sent()
        gathered_before, swapped_before = (runtime.gathered_bytes, runtime.swapped_bytes) if zero3 else (0, 0)
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        bytes_per_step.append(sent() - before)
        if zero3:
            gathered.append(runtime.gathered_bytes - gathered_before)
            swapped.append(runtime.swapped_bytes - swapped_before)
    gathers = {}
    if args.mode.startswith("zo-zero3"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        ops = collections.Counter(e.name for e in prof.events() if e.name.startswith("c10d::"))
        gathers = {"collectives_per_step": dict(ops), "gathered_bytes_per_step": statistics.median(gathered),
                   "swapped_bytes_per_step": statistics.median(swapped)}
    if dist.get_rank() == 0:
        n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
        print(json.dumps({
            "mode": args.mode, "world_size": dist.get_world_size(), "rows_per_rank": args.rows, "seq": args.seq,
            "step_s_median": statistics.median(times), "step_s": times,
            "bytes_sent_per_step_per_rank": statistics.median(bytes_per_step), "parameters": n_params,
            "decoder_layers": model.config.num_hidden_layers, "torch_threads": torch.get_num_threads(), **gathers,
        }))
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
