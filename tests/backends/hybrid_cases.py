"""What the distributed hybrid ZO-FO tests run, shared by the ranks (hybrid_worker.py) and the 1-process reference.

A case is ``model:k:zo:fo:batching``: a tiny model from zero3_cases.MODELS, k FO blocks, the ZO and FO
optimizers by name (below), and how the fixed batch is shared: 'split' (rank r takes rows
[r B/W, (r+1) B/W): data parallel), 'same' (every rank the whole batch) or 'nan' (split, and at
step NAN_STEP rank 1's loss is NaN: every rank must skip both updates of that step together).
No DeepSpeed import here: the reference side runs without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from zero3_cases import BATCH, build_model, fixed_batch  # noqa: F401 - re-exported for the worker and tests

import zo_scale
from zo_scale.backends.runtime import Runtime
from zo_scale.train.hybrid import HybridOptimizer, make_fo_optimizer, split_fo_parameters

STEPS, SEED, NAN_STEP = 5, 7, 2


def make_zo(name: str, named_params: Iterable[tuple[str, torch.nn.Parameter]], model: torch.nn.Module,
            **kwargs: Any) -> zo_scale.ZOOptimizer:
    if name == "zosgd":
        return zo_scale.ZOSGD(named_params, lr=1e-3, eps=1e-3, seed=SEED, **kwargs)
    if name == "zosgd-lazy":  # the hybrid flushes the pending update before each FO pass
        return zo_scale.ZOSGD(named_params, lr=1e-3, eps=1e-3, seed=SEED, lazy=True, **kwargs)
    if name == "zosgd-in-forward":  # the pair in one forward over the batch stacked twice (loss_fn(groups=2))
        return zo_scale.ZOSGD(named_params, lr=1e-3, eps=1e-3, seed=SEED, lazy=True, perturb="in_forward",
                              model=model, **kwargs)
    raise ValueError(f"unknown ZO optimizer {name!r}")


def fo_factory(name: str) -> Callable[[list[tuple[str, torch.nn.Parameter]]], torch.optim.Optimizer]:
    """(name, param) list -> the FO optimizer: AdamW moves every element by about lr; SGD by lr * grad."""
    if name == "adamw":
        return lambda named: make_fo_optimizer(named, "adamw", lr=1e-2)
    if name == "sgd":
        return lambda named: make_fo_optimizer(named, "sgd", lr=1.0)
    raise ValueError(f"unknown FO optimizer {name!r}")


def rows(batching: str, rank: int, world: int) -> torch.Tensor:
    batch = fixed_batch()
    if batching == "same":
        return batch
    n = BATCH // world
    return batch[rank * n : (rank + 1) * n]


def stacked_losses(model: torch.nn.Module, batch: torch.Tensor, groups: int) -> torch.Tensor:
    """The mean next-token loss of each of ``groups`` stacked copies of ``batch``, shape (groups,)."""
    ids = batch.repeat(groups, 1)
    logits = model(input_ids=ids).logits[:, :-1].float()
    per_row = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(-1)
    return per_row.view(groups, -1).mean(1)


def loss_fn(model: torch.nn.Module, batch: torch.Tensor, batching: str, step: int, rank: int,
            groups: int | None = None) -> torch.Tensor:
    """The batch's LM loss; with ``groups`` = K (the ZO step of perturb='in_forward') the loss of each of K
    stacked copies of the batch, shape (K,) (every row has the same number of tokens: the mean of the
    rows' means is the batch's mean)."""
    loss = model(input_ids=batch, labels=batch).loss if groups is None else stacked_losses(model, batch, groups)
    if batching == "nan" and step == NAN_STEP and rank == 1:
        return loss * float("nan")
    return loss


def reference(case: str) -> dict[str, Any]:
    """The 1-process run on the full batch (no DeepSpeed, no process group), 1 thread like each rank."""
    model_name, k, zo_name, fo_name, batching = case.split(":")
    model = build_model(model_name)
    fo_named, zo_named = split_fo_parameters(model, int(k))
    opt = HybridOptimizer(make_zo(zo_name, zo_named, model) if zo_named else None,
                          fo_factory(fo_name)(fo_named) if fo_named else None, [p for _, p in fo_named], Runtime())
    batch = fixed_batch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses, fo_losses = [], []
        for step in range(STEPS):
            # in the 'nan' case rank 1's NaN makes the ranks' mean NaN: here the whole batch's loss is NaN
            losses.append(opt.step(lambda groups=None, step=step: loss_fn(model, batch, batching, step, 1, groups)))
            fo_losses.append(opt.last_fo_loss)
        opt.flush()
    finally:
        torch.set_num_threads(threads)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "fo_losses": fo_losses, "final": final,
            "fo_names": [n for n, _ in fo_named], "zo_names": [n for n, _ in zo_named],
            "fo_skipped": opt.fo_skipped_steps, "zo_skipped": opt.zo.skipped_steps if opt.zo else 0}
