"""ZOTrainer: a Hugging Face ``transformers.Trainer`` whose training step is a ZO step.

A Trainer script changes its import and passes ZO settings::

    from zo_scale.integrations import ZOTrainer

    trainer = ZOTrainer(model=model, args=TrainingArguments(learning_rate=1e-6, max_steps=20000, ...),
                        train_dataset=train, eval_dataset=dev, zo={"eps": 1e-3, "sampler": "rademacher"})
    trainer.train()

Everything else stays Trainer's: ``TrainingArguments`` give the lr and its schedule (with warmup),
weight decay, steps, batch size, seed, logging, evaluation and checkpoints (``save_pretrained`` plus
``optimizer.pt``: the ZO optimizer's state, its step count included, so ``resume_from_checkpoint``
continues the same directions). ``zo`` takes the keys of zo-scale's ``optim`` config section
(:class:`zo_scale.train.config.OptimConfig`: ``rule``, ``sampler``, ``estimator``, ``eps``,
``queries``, ...; defaults MeZO's: dense normal, central, ZO-SGD, eps 1e-3), except those Trainer owns.

A step: ``training_step`` runs ``ZOOptimizer.step(closure)``, the closure being Trainer's own
``compute_loss`` on the batch, under no_grad with the model in eval mode (dropout off: both points of
a pair must see the same function, as MeZO's trainer does). No backward, no ``.grad``; Trainer's
``optimizer.step()`` afterwards has nothing left to do (as accelerate does for LOMO, whose update also
happens in the training step). Under ``torchrun`` / ``accelerate launch`` each rank evaluates its own
batch at the same seeded points and the losses are averaged over the ranks: one all-reduce of a few
floats a step, no gradient all-reduce.

Refused, by name: gradient accumulation (a ZO step estimates from the losses of one batch: a larger
``per_device_train_batch_size`` gives what accumulation would), ``fp16=True`` (its gradient scaler
needs gradients; use ``bf16=True`` or a float16 model), ``TrainingArguments(deepspeed=...)``
(DeepSpeed's engine owns the backward and the step: ZeRO-3 ZO runs through ``deepspeed launch/train.py``,
see docs/trainer.md) and the optim keys Trainer owns (``lr``, ``weight_decay``, ``schedule``, ``warmup_steps``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import transformers

from zo_scale.backends.replicated import DistributedRuntime
from zo_scale.core.optimizer import ZOOptimizer
from zo_scale.train.build import build_rule, build_sampler
from zo_scale.train.config import ConfigError, OptimConfig, apply_key

# set through TrainingArguments, not ``zo``
TRAINER_OWNS = {"lr": "learning_rate", "weight_decay": "weight_decay", "schedule": "lr_scheduler_type",
                "warmup_steps": "warmup_steps", "lazy": "(none: Trainer evaluates and saves between any two "
                                                          "steps, so each update lands within its step)"}


class TrainerZOOptimizer(ZOOptimizer):
    """The ZO optimizer as Trainer drives it: ``step(closure)`` is the step; Trainer's ``step()`` without a
    closure, which follows each training step, finds it done (an error where no step ran since)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stepped = False

    def step(self, closure: Any = None, **kwargs: Any) -> float | None:  # type: ignore[override]
        if closure is None and not kwargs:
            if not self._stepped:
                raise RuntimeError("ZO optimizer stepped without a closure and no ZO step ran in training_step")
            self._stepped = False
            return None
        self._stepped = True
        return super().step(closure, **kwargs)


def zo_settings(zo: dict[str, Any] | None) -> OptimConfig:
    """``zo`` as an :class:`OptimConfig` (defaults MeZO's), checked key by key; Trainer's keys refused."""
    settings = OptimConfig(lazy=False)
    for key, value in (zo or {}).items():
        if key in TRAINER_OWNS:
            raise ConfigError(f"zo[{key!r}]: set it in TrainingArguments ({TRAINER_OWNS[key]})")
        apply_key(settings, "zo", key, value)
    if settings.perturb != "in_place":
        raise ConfigError("zo['perturb']: Trainer's compute_loss gives one loss per batch; perturb='in_forward' "
                          "needs the K row groups' losses (zo-scale's own trainer runs it)")
    if settings.sampler == "magnitude":
        raise ConfigError("zo['sampler']='magnitude' (Sparse-MeZO) masks z by the weights, which the in-place step "
                          "moves between its points: it needs perturb='in_forward' (zo-scale's own trainer runs it)")
    return settings


def _loss_reduce() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The mean over data-parallel ranks (one all-reduce of a step's losses) where the launcher started
    several; the process group is Trainer's (accelerate's)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return DistributedRuntime(dist.get_backend()).mean


class ZOTrainer(transformers.Trainer):
    """``transformers.Trainer`` with a ZO step (see the module docstring). ``zo``: the ZO settings, keys
    of zo-scale's ``optim`` section."""

    def __init__(self, *args: Any, zo: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.zo = zo_settings(zo)
        super().__init__(*args, **kwargs)
        args_ = self.args
        problems = {
            f"gradient_accumulation_steps={args_.gradient_accumulation_steps}: a ZO step estimates from one "
            "batch's losses; raise per_device_train_batch_size instead": args_.gradient_accumulation_steps != 1,
            "fp16=True: its gradient scaler needs gradients, a ZO step has none; use bf16=True or load the "
            "model in float16": args_.fp16,
            "deepspeed=...: DeepSpeed's engine owns the backward and the optimizer step; ZeRO-3 ZO runs "
            "through `deepspeed launch/train.py` (docs/scale-out.md)": bool(args_.deepspeed),
        }
        for problem, applies in problems.items():
            if applies:
                raise ValueError(f"ZOTrainer: TrainingArguments({problem})")

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            cfg = self.zo
            try:
                self.optimizer = TrainerZOOptimizer(
                    named, self.args.learning_rate, cfg.eps, rule=build_rule(cfg), sampler=build_sampler(cfg),
                    estimator=cfg.estimator, queries=cfg.queries, weight_decay=self.args.weight_decay,
                    seed=self.args.seed, conservative=cfg.conservative, master_weights=cfg.master_weights,
                    kernel=cfg.kernel, loss_reduce=_loss_reduce(), model=model,
                )
            except ValueError as e:
                raise ConfigError(f"zo: {e}") from None
        return self.optimizer

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        model.eval()
        inputs = self._prepare_inputs(inputs)

        def closure() -> torch.Tensor:
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs)

        loss = self.zo_optimizer.step(closure)
        return torch.tensor(loss, device=self.args.device)

    @property
    def zo_optimizer(self) -> TrainerZOOptimizer:
        """The ZO optimizer itself (Trainer's ``optimizer`` may be accelerate's wrapper of it)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _clip_grad_norm(self, model: torch.nn.Module) -> None:
        return None  # no gradients to clip or report

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> None:
        return None

