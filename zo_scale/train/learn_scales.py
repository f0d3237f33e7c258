"""The meta-training recipe of ZO Fine-tuner's perturbation scales: config -> data -> model -> learn -> file.

    zo-scale learn-scales model.name=smollm2-135m task.name=copa run.steps=300 optim.lr=3e-5
    zo-scale train model.name=smollm2-135m task.name=sst2 optim.scales=runs/default/perturbation_scales.json

Once per base model (the paper meta-trains on COPA and reuses the scales on every task): the scales are
learned on the full weights of ``model.name`` along batches of ``task.name``, judged by the ZO step of
``optim.eps`` and ``optim.lr`` (:class:`~zo_scale.core.learned_scales.ScaleLearner`), and written to
``meta.output`` (:mod:`zo_scale.train.scales_file`). One process: the meta-step backpropagates through
the model, so a base model that needs ZeRO-3 to fine-tune is meta-trained where it fits with backprop.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from zo_scale.core.learned_scales import ScaleLearner
from zo_scale.models import load_model, model_head
from zo_scale.tasks import get_task, sample_splits
from zo_scale.train.config import Config, ConfigError
from zo_scale.train.loop import BatchOrder
from zo_scale.train.metrics import MetricsLog, plot_metrics
from zo_scale.train.objectives import make_objective, task_loss
from zo_scale.train.scales_file import write_scales
from zo_scale.train.select_runtime import resolve_model_dtype

log = logging.getLogger("zo_scale")


def _check(cfg: Config) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("zo-scale learn-scales runs in one process (it backpropagates through the whole model); "
                          "run it without a launcher")
    other = {"peft.method": cfg.peft.method != "none", "hybrid.fo_layers": cfg.hybrid.fo_layers != 0,
             "model.quantization": cfg.model.quantization != "none", "optim.scales": cfg.optim.scales is not None}
    if any(other.values()):
        raise ConfigError(f"zo-scale learn-scales learns scales for the full weights of the base model; unset "
                          f"{[k for k, v in other.items() if v]}")
    if cfg.optim.sampler not in ("normal", "rademacher"):
        raise ConfigError(f"the perturbation scales scale dense noise: optim.sampler=normal or rademacher "
                          f"(got {cfg.optim.sampler!r})")
    for key in ("steps", "batch_size", "log_every"):
        if getattr(cfg.run, key) < 1:
            raise ConfigError(f"run.{key} must be >= 1, got {getattr(cfg.run, key)}")


def learn_scales(cfg: Config) -> dict[str, Any]:
    """Meta-train the scales; returns a summary (the file's path, first and last meta-losses)."""
    _check(cfg)
    resolve_model_dtype(cfg, None)
    torch.manual_seed(cfg.run.seed)
    out = Path(cfg.run.output_dir)
    target = Path(cfg.meta.output) if cfg.meta.output else out / "perturbation_scales.json"
    task = get_task(cfg.task.name)
    task = task.on_hub() if cfg.task.source == "hub" else task
    loss_name = task_loss(task.kind, cfg.task.loss)
    train_ex, _, _ = sample_splits(task, cfg.task.num_train, 0, 1, cfg.run.seed, cfg.task.data_dir)
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype, seed=cfg.run.seed)
    objective = make_objective(task.kind, tokenizer, model_head(cfg.model.name), loss_name, cfg.task.max_length,
                               cfg.task.max_new_tokens)
    train_enc = objective.encode(train_ex)
    batches = BatchOrder(len(train_enc), cfg.run.batch_size, cfg.run.seed)
    try:
        learner = ScaleLearner(
            [(n, p) for n, p in model.named_parameters() if p.requires_grad], eps=cfg.optim.eps, zo_lr=cfg.optim.lr,
            lr=cfg.meta.lr, base_lr=cfg.meta.base_lr, base_momentum=cfg.meta.base_momentum,
            max_grad_norm=cfg.meta.max_grad_norm, restart_every=cfg.meta.restart_every, seed=cfg.run.seed,
            kind=cfg.optim.sampler)
    except ValueError as err:
        raise ConfigError(f"meta.*: {err}") from None
    log.info("learning perturbation scales for %d tensors of %s on %s (%d examples), %d meta-steps",
             len(learner.named), cfg.model.name, cfg.task.name, len(train_enc), cfg.run.steps)

    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl")
    meta_losses: list[tuple[int, float]] = []
    window: list[dict[str, float]] = []
    for t in tqdm(range(cfg.run.steps), desc="meta", unit="step", disable=not cfg.run.progress, dynamic_ncols=True):
        closure = functools.partial(objective.loss, model, [train_enc[i] for i in batches.indices(t)])
        window.append(learner.step(closure))
        if (t + 1) % cfg.run.log_every == 0 or t + 1 == cfg.run.steps:
            mean = {k: sum(w[k] for w in window) / len(window) for k in ("loss", "meta_loss")}
            spread = sorted(learner.scales().values())
            metrics.log(t + 1, "train", **mean, scale_min=spread[0], scale_max=spread[-1])
            meta_losses.append((t + 1, mean["meta_loss"]))
            window = []
    metrics.close()
    plot_metrics(out / "metrics.jsonl", out / "loss_curve.png",
                 f"perturbation scales: {cfg.model.name} on {cfg.task.name} (loss at theta +- eps z)")
    learned_with = {"task": cfg.task.name, "steps": cfg.run.steps, "batch_size": cfg.run.batch_size,
                    "seed": cfg.run.seed, "eps": cfg.optim.eps, "zo_lr": cfg.optim.lr, "sampler": cfg.optim.sampler,
                    **{f"meta.{k}": v for k, v in cfg.as_json()["meta"].items() if k != "output"}}
    write_scales(target, learner.scales(), cfg.model.name, learned_with, meta_losses)
    return {"scales_file": str(target), "tensors": len(learner.named), "steps": cfg.run.steps,
            "first_meta_loss": meta_losses[0][1], "last_meta_loss": meta_losses[-1][1],
            "scale_range": (min(learner.scales().values()), max(learner.scales().values()))}
