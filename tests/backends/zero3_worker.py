"""One rank of the ZeRO-3 equivalence test (launched by tests/backends/test_zero3.py under torchrun).

For each case ``model:optimizer:batching`` on the command line: load the saved tiny model with
``from_pretrained`` under ZeRO-3, run ``--steps`` ZO steps on the fixed batch, profile the
collectives of the last (steady-state) step, gather the weights on rank 0 and save there
{losses, step records, initial and final weights, collectives}. Batching 'split' gives rank r rows
[r*b, (r+1)*b) of the batch (data parallel); 'same' gives every rank the whole batch; 'persist' splits
it with a non-zero persistence threshold (small parameters kept whole on every rank, trained replicated).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from zo_scale.backends import zero3

sys.path.insert(0, str(Path(__file__).parent))
from two_ranks import leave_worker  # noqa: E402
from zero3_cases import BATCH, PERSISTENCE_THRESHOLD, fixed_batch, make_optimizer  # noqa: E402

# DeepSpeed calls torch.distributed.all_gather_into_tensor, which this torch marks deprecated: noise.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def collectives(prof: profile) -> dict[str, int]:
    """How many times each c10d op ran in the profiled region (every collective goes through one)."""
    return dict(collections.Counter(e.name for e in prof.events() if e.name.startswith("c10d::")))


def gathered_bytes(prof: profile) -> int:
    """Bytes of the all-gather outputs in the profiled region (the full tensors assembled)."""
    total = 0
    for e in prof.events():
        if e.name == "c10d::_allgather_base_" and e.input_shapes and e.input_shapes[0]:
            total += torch.Size(e.input_shapes[0]).numel() * 4  # fp32 here
    return total


def run_case(case: str, model_dir: Path, steps: int, out_dir: Path, config: Path) -> None:
    model, opt_name, batching = case.split(":")
    ds = json.loads(config.read_text())
    if batching == "persist":
        ds["zero_optimization"].update(stage3_param_persistence_threshold=PERSISTENCE_THRESHOLD,
                                       stage3_model_persistence_threshold=10**9)
    runtime = zero3.Zero3Runtime(ds)  # the process group comes up with the first case
    rank, world = runtime.rank, runtime.world_size
    batch = fixed_batch()
    if batching in ("split", "persist"):
        rows = BATCH // world
        batch = batch[rank * rows : (rank + 1) * rows]
    module, _ = runtime.load_model(
        lambda: (AutoModelForCausalLM.from_pretrained(model_dir / model, dtype=torch.float32), None))
    initial = runtime.full_state_dict(module)
    opt = make_optimizer(opt_name, module.named_parameters(), **runtime.optimizer_kwargs())

    def closure() -> torch.Tensor:
        return module(input_ids=batch, labels=batch).loss

    losses, records, counts, nbytes = [], [], {}, 0
    for step in range(steps):
        if step == steps - 1:  # steady state: DeepSpeed records its fetch trace over the first forwards
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                losses.append(opt.step(closure))
            counts, nbytes = collectives(prof), gathered_bytes(prof)
        else:
            losses.append(opt.step(closure))
        records.append(dataclasses.asdict(opt.last_record))
    opt.flush()
    final = runtime.full_state_dict(module)
    if rank == 0:  # plain containers only: the test reads them with torch.load(weights_only=True)
        torch.save({"losses": losses, "records": records, "initial": initial, "final": final,
                    "collectives": counts, "gathered_bytes": nbytes, "world": world,
                    "persistent": sorted(n for n, p in module.named_parameters() if p.ds_persist)},
                   out_dir / f"{case.replace(':', '_')}.pt")
    runtime.engine.destroy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    for case in args.cases:
        run_case(case, args.model_dir, args.steps, args.out, args.config)
    leave_worker()


if __name__ == "__main__":
    main()
