"""One rank of the distributed hybrid ZO-FO tests (launched under torchrun by tests/train/test_hybrid.py and
tests/backends/test_hybrid_zero3.py).

``--runtime replicated``: every rank holds the whole model (DistributedRuntime), the FO gradients are
averaged by one all-reduce. ``--runtime zero3``: DeepSpeed ZeRO-3 partitions (Zero3Runtime) with the
FO optimizer handed to DeepSpeed (``load_model(fo_parameters=..., fo_optimizer_factory=...)``).

For each case ``model:k:zo:fo:batching`` (see hybrid_cases.py): load the saved tiny model with
``from_pretrained``, run STEPS hybrid steps, gather the weights on rank 0 (after every step for
'nan' cases, to see the skipped step) and save there {losses, FO losses, initial and final weights,
whether the ranks' weights agree (replicated), comm and gathered bytes per step, skip counts}.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from hybrid_cases import STEPS, fo_factory, loss_fn, make_zo, rows  # noqa: E402
from two_ranks import leave_worker  # noqa: E402

from zo_scale.train.hybrid import HybridOptimizer, split_fo_parameters  # noqa: E402

warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def load(path: Path) -> tuple[torch.nn.Module, None]:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), None


def run_case(case: str, runtime_name: str, model_dir: Path, out_dir: Path, config: Path | None) -> None:
    model_name, k, zo_name, fo_name, batching = case.split(":")
    k = int(k)
    if runtime_name == "zero3":
        from zo_scale.backends.zero3 import Zero3Runtime

        runtime = Zero3Runtime(config)
        model, _ = runtime.load_model(lambda: load(model_dir / model_name),
                                      fo_parameters=lambda m: split_fo_parameters(m, k)[0],
                                      fo_optimizer_factory=fo_factory(fo_name))
        fo_named, zo_named = split_fo_parameters(model, k)  # requires_grad was restored: the same split
        fo = runtime.fo_optimizer
    else:
        from zo_scale.backends.replicated import DistributedRuntime

        runtime = DistributedRuntime()
        model, _ = load(model_dir / model_name)
        fo_named, zo_named = split_fo_parameters(model, k)
        fo = fo_factory(fo_name)(fo_named) if fo_named else None
    model.eval()
    engine = type(runtime.engine.optimizer).__name__ if runtime_name == "zero3" else None
    rank, world = runtime.rank, runtime.world_size
    full = runtime.full_state_dict if runtime_name == "zero3" else lambda m: {
        n: p.detach().clone() for n, p in m.named_parameters()}
    initial = full(model)
    zo = make_zo(zo_name, zo_named, model, **runtime.optimizer_kwargs()) if zo_named else None
    opt = HybridOptimizer(zo, fo, [p for _, p in fo_named], runtime)
    batch = rows(batching, rank, world)
    losses, fo_losses, per_step, sent, gathered = [], [], [], [], []
    for step in range(STEPS):
        before, gathered_before = runtime.comm_bytes, runtime.gathered_bytes
        losses.append(opt.step(lambda groups=None, step=step: loss_fn(model, batch, batching, step, rank, groups)))
        sent.append(runtime.comm_bytes - before)
        gathered.append(runtime.gathered_bytes - gathered_before)
        fo_losses.append(opt.last_fo_loss)
        if batching == "nan":
            opt.flush()
            per_step.append(full(model))
    opt.flush()
    final = full(model)
    ranks_agree = None
    if runtime_name == "replicated":  # every rank's full copy must be the same, bit for bit
        copies = runtime.gather(final)
        if rank == 0:
            ranks_agree = all(torch.equal(c[n], final[n]) for c in copies for n in final)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if rank == 0:  # plain containers only: the tests read them with torch.load(weights_only=True)
        torch.save({"losses": losses, "fo_losses": fo_losses, "initial": initial, "final": final,
                    "per_step": per_step, "ranks_agree": ranks_agree, "comm_bytes": sent, "gathered_bytes": gathered,
                    "world": world,
                    "fo_names": [n for n, _ in fo_named], "zo_names": [n for n, _ in zo_named],
                    "fo_skipped": opt.fo_skipped_steps, "zo_skipped": zo.skipped_steps if zo else 0,
                    "requires_grad": flags, "engine_optimizer": engine},
                   out_dir / f"{runtime_name}_{case.replace(':', '_')}.pt")
    if runtime_name == "zero3":
        runtime.engine.destroy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime", choices=("replicated", "zero3"), required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path)
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for case in args.cases:
        run_case(case, args.runtime, args.model_dir, args.out, args.config)
    leave_worker()


if __name__ == "__main__":
    main()
