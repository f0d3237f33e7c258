"""Build the ZO optimizer and its lr schedule from the ``optim`` section of a config, and decide where its
perturbed points live (``optim.perturb``: in place, in the forward, or auto, :func:`choose_perturb`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from zo_scale.core.directions import (
    BlockSampler,
    DenseSampler,
    DirectionSampler,
    LayerSubsetSampler,
    LowRankSampler,
    MagnitudeSampler,
    ScaledSampler,
    SparseSampler,
)
from zo_scale.core.estimators import EvolutionStrategies
from zo_scale.core.optimizer import ZOOptimizer
from zo_scale.core.schedules import lr_multiplier
from zo_scale.core.updates import (
    SGD,
    AcceleratedDirectional,
    Adam,
    DiagonalHessian,
    LozoMomentum,
    Momentum,
    Sign,
    SignMomentum,
    UpdateRule,
)
from zo_scale.models import model_head
from zo_scale.train.config import Config, ConfigError, OptimConfig
from zo_scale.train.objectives import DECODING_LOSSES
from zo_scale.train.scales_file import read_scales

SAMPLERS = ("normal", "rademacher", "sparse", "magnitude", "lowrank", "block", "lezo")


def build_sampler(cfg: OptimConfig) -> DirectionSampler:
    if cfg.scales is not None:
        if cfg.sampler not in ("normal", "rademacher"):
            raise ConfigError(f"optim.scales (ZO Fine-tuner's perturbation scales) scales dense noise per tensor: it "
                              f"needs optim.sampler=normal or rademacher (got {cfg.sampler!r})")
        return ScaledSampler(read_scales(cfg.scales)[0], DenseSampler(cfg.sampler))
    if cfg.sampler in ("normal", "rademacher"):
        return DenseSampler(cfg.sampler)
    if cfg.sampler == "sparse":
        return SparseSampler(cfg.sparsity, cfg.resample_every)
    if cfg.sampler == "magnitude":
        if cfg.resample_every != 1:
            raise ConfigError("optim.resample_every is the random mask's period; sampler=magnitude's mask follows "
                              f"the weights every step (got resample_every={cfg.resample_every})")
        return MagnitudeSampler(cfg.sparsity)
    if cfg.sampler == "lowrank":
        if cfg.nu < 1:
            raise ConfigError(f"optim.nu (LOZO's period of V, in steps) must be >= 1, got {cfg.nu}")
        if cfg.resample_every != 1:
            raise ConfigError("optim.resample_every is the sparse mask's period; with sampler=lowrank, V's period "
                              f"(LOZO's nu) is optim.nu (got resample_every={cfg.resample_every})")
        return LowRankSampler(cfg.rank, cfg.nu)
    if cfg.sampler == "block":
        return BlockSampler()
    if cfg.sampler == "lezo":
        if not 0.0 < cfg.layer_fraction <= 1.0:
            raise ConfigError(f"optim.layer_fraction (of the transformer layers LeZO perturbs per step) must be in "
                              f"(0, 1], got {cfg.layer_fraction}")
        return LayerSubsetSampler(cfg.layer_fraction)
    raise ConfigError(f"optim.sampler: unknown {cfg.sampler!r}; choose one of {SAMPLERS}")


def build_rule(cfg: OptimConfig) -> UpdateRule:
    rules: dict[str, Any] = {
        "sgd": SGD, "sign": Sign, "sign-momentum": lambda: SignMomentum(cfg.momentum),
        "momentum": lambda: Momentum(cfg.momentum), "adam": lambda: Adam(*cfg.betas),
        "lozo-m": lambda: LozoMomentum(cfg.momentum), "hizoo": lambda: DiagonalHessian(cfg.hessian_smoothing),
        "ardd": lambda: AcceleratedDirectional(cfg.ardd_dimension or None),
    }
    if cfg.ardd_dimension < 0:
        raise ConfigError(f"optim.ardd_dimension (ARDD's n; 0: the number of trained elements) must be >= 0, "
                          f"got {cfg.ardd_dimension}")
    if cfg.rule not in rules:
        raise ConfigError(f"optim.rule: unknown {cfg.rule!r}; choose one of {tuple(rules)}")
    if (cfg.rule == "hizoo") != (cfg.estimator == "hizoo"):
        raise ConfigError("HiZOO is a rule and an estimator together: set optim.rule=hizoo and optim.estimator=hizoo "
                          f"(got rule={cfg.rule!r}, estimator={cfg.estimator!r})")
    if cfg.rule == "lozo-m" and cfg.sampler != "lowrank":
        raise ConfigError("optim.rule=lozo-m keeps its momentum in LOZO's low-rank factor: it needs "
                          f"optim.sampler=lowrank (got {cfg.sampler!r})")
    return rules[cfg.rule]()


MAGNITUDE_NEEDS_IN_FORWARD = ("optim.sampler=magnitude (Sparse-MeZO) needs optim.perturb=in_forward, which cannot "
                              "run here")
HALF_PRECISION = ("bfloat16", "bf16", "float16", "fp16")
# what the perturbed forward saves a ZeRO-3 step, by offload_param.device
ZERO3_GAINS = {
    "none": "ZeRO-3 gathers the model once a step instead of twice",
    "cpu": "ZeRO-3 uploads the CPU-offloaded model and gathers it once a step instead of twice",
    "nvme": "ZeRO-3 reads the NVMe-offloaded model and gathers it once a step instead of twice",
}


class PerturbChoice(NamedTuple):
    """What ``optim.perturb=auto`` became, and why (in words, for the log)."""

    perturb: str
    why: str


class Fit(NamedTuple):
    """The planner's verdict on a run with ``optim.perturb=in_forward``: ``fits`` the device's memory, and
    ``numbers`` says so in words (the stacked step's bytes, the peak and the memory there is)."""

    fits: bool
    numbers: str


def in_forward_blocker(cfg: Config, runtime: str = "single") -> str | None:
    """Why ``optim.perturb=in_forward`` cannot run this config on ``runtime`` (the runtime's ``name``), or
    None: the stacked batch's row groups must not see each other (one prompt encoder, masked-LM positions;
    greedy decoding keeps a KV cache per row, so each group decodes at its own point), and each perturbed point
    must be module parameters copied whole (not quantized scales, not HiZOO's per-partition Hessian under
    ZeRO-3)."""
    reasons = {
        "peft.method=prompt: the prompt encoder runs once for the whole batch, not per row group":
            cfg.peft.method == "prompt",
        "ZO on quantized scales: they are attributes of the weights, not module parameters":
            cfg.model.quantization != "none" and cfg.peft.method == "none",
        "optim.estimator=jvp evaluates no perturbed points": cfg.optim.estimator == "jvp",
        "optim.rule=hizoo under ZeRO-3: each rank keeps the Hessian of its own partition only, and the copies "
        "are of the whole gathered parameter": cfg.optim.rule == "hizoo" and runtime == "zero3",
        # BERT's learned positions are one row of ids for the whole batch, and the scoring projects onto
        # the vocabulary at the mask positions of the whole batch: neither splits into row groups.
        "a masked LM: its position embeddings and mask-position scoring see the whole batch, not row groups":
            model_head(cfg.model.name) == "masked",
    }
    return next((reason for reason, applies in reasons.items() if applies), None)


def in_forward_unsupported(cfg: Config, runtime: str = "single") -> str | None:
    """Why ``optim.perturb=in_forward`` cannot run this config on ``runtime`` (the runtime's ``name``; then the
    run takes the in-place step), or None (also for a run that asks for in place). A ConfigError where the
    run needs it: ``optim.sampler=magnitude`` has no in-place step."""
    if cfg.optim.sampler == "magnitude" and cfg.optim.perturb == "in_place":
        raise ConfigError("optim.sampler=magnitude (Sparse-MeZO) masks z by the weights themselves, which the "
                          "in-place step moves between its points: set optim.perturb=in_forward (or auto)")
    if cfg.optim.sampler == "magnitude" and cfg.peft.method != "none":
        raise ConfigError(f"optim.sampler=magnitude with peft.method={cfg.peft.method}: an adapter starts at zero "
                          "(LoRA's B) or constant, where a threshold fixed at the first step masks out every element "
                          "after it; Sparse-MeZO is for full-parameter tuning")
    if cfg.optim.perturb != "in_forward":
        return None
    reason = in_forward_blocker(cfg, runtime)
    if reason is not None and cfg.optim.sampler == "magnitude":
        raise ConfigError(f"{MAGNITUDE_NEEDS_IN_FORWARD}: {reason}")
    return reason


def in_forward_gains(cfg: Config, runtime: str = "single", offload: str = "none") -> list[str]:
    """What the perturbed forward saves this run over the in-place step, in words (empty: nothing).

    Under ZeRO-3 (``runtime`` "zero3", ``offload`` its ``offload_param.device`` or "none") each forward
    gathers every parameter, and offload moves it to the GPU first: one forward a step instead of two halves
    that traffic. Half-precision weights without ``optim.master_weights`` are rounded by every in-place
    round trip (+eps z, -2 eps z, +eps z: 21 of 21 tensors of tiny-llama moved in 10 steps at lr 0 in
    bfloat16); in the forward they never move."""
    gains = [ZERO3_GAINS[offload]] if runtime == "zero3" else []
    if cfg.model.dtype in HALF_PRECISION and not cfg.optim.master_weights:
        gains.append(f"{cfg.model.dtype} weights without optim.master_weights stay put, where each in-place "
                     "round trip (+eps, -2 eps, +eps) rounds them")
    if cfg.task.loss in DECODING_LOSSES and cfg.optim.sampler == "lowrank":
        gains.append(f"task.loss={cfg.task.loss} along low-rank directions decodes the K row groups together, "
                     "reading each weight once a token without copies of it, where in place decodes K times")
    return gains


def choose_perturb(cfg: Config, fit: Callable[[], Fit], runtime: str = "single", offload: str = "none"
                   ) -> PerturbChoice:
    """What ``optim.perturb=auto`` means for this run on ``runtime`` with ``offload`` (see
    :func:`in_forward_gains`). The rule, in order:

    1. ``optim.sampler=magnitude`` has no in-place step: in_forward, or a ConfigError saying why it cannot run;
    2. ``optim.pending_steps`` > 1 lands updates in the forward: in_forward, or a ConfigError as for 1;
    3. in_forward cannot run this config (:func:`in_forward_blocker`): in_place;
    4. ``hybrid.fo_layers=-1`` (backprop alone) has no ZO step to place: in_place;
    5. ``task.loss=f1`` or ``reward`` along dense directions outside ZeRO-3: in_place (the copies would be made
       at every decoding step);
    6. in_forward saves nothing here (float32 or master weights, no ZeRO-3, no decoding loss along low-rank
       directions):
       in_place, which stacks no batch;
    7. ``fit()`` (called only here: it builds the model's shape) says the planner's peak with the batch
       stacked K times does not fit the device: in_place; else in_forward.
    """
    blocker = in_forward_blocker(cfg, runtime)
    if cfg.optim.sampler == "magnitude":
        if blocker is not None:
            raise ConfigError(f"{MAGNITUDE_NEEDS_IN_FORWARD}: {blocker}")
        return PerturbChoice("in_forward", "auto: optim.sampler=magnitude masks z by the weights, which only the "
                                           "perturbed forward leaves in place between its points")
    if cfg.optim.pending_steps > 1:
        if blocker is not None:
            raise ConfigError(f"optim.pending_steps={cfg.optim.pending_steps} lands the updates inside the perturbed "
                              f"forward, which cannot run here: {blocker}")
        return PerturbChoice("in_forward", f"auto: optim.pending_steps={cfg.optim.pending_steps} lands the updates "
                                           "inside the perturbed forward")
    if blocker is not None:
        return PerturbChoice("in_place", f"auto: in_forward cannot run here: {blocker}")
    if cfg.hybrid.fo_layers == -1:
        return PerturbChoice("in_place", "auto: hybrid.fo_layers=-1 trains by backprop alone, there is no ZO step")
    if cfg.task.loss in DECODING_LOSSES and cfg.optim.sampler != "lowrank" and runtime != "zero3":
        return PerturbChoice("in_place", f"auto: task.loss={cfg.task.loss} runs task.max_new_tokens forwards a "
                                         "point, and along dense directions the perturbed forward copies every "
                                         "parameter at each of them; in place moves the weights twice a point")
    gains = in_forward_gains(cfg, runtime, offload)
    if not gains:
        return PerturbChoice("in_place", f"auto: {cfg.model.dtype} weights"
                                         f"{' with master weights' if cfg.optim.master_weights else ''}, no ZeRO-3: "
                                         "in place loses nothing and stacks no batch")
    verdict = fit()
    if not verdict.fits:
        return PerturbChoice("in_place", f"auto: in_forward would pay ({'; '.join(gains)}), but {verdict.numbers}")
    return PerturbChoice("in_forward", f"auto: {'; '.join(gains)}; {verdict.numbers}")


def build_optimizer(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimConfig, seed: int, total_steps: int, **kwargs: Any
) -> tuple[ZOOptimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer over the named trainable parameters, and its LambdaLR schedule.

    ``optim.perturb=auto`` is the trainer's to resolve (:func:`choose_perturb`, before the run is recorded);
    a caller without a runtime gets ZOOptimizer's default, in place (what a seed log written before
    ``optim.perturb`` existed ran)."""
    try:
        estimator = EvolutionStrategies(cfg.fitness) if cfg.estimator == "es" else cfg.estimator
        optimizer = ZOOptimizer(
            list(named_params), cfg.lr, cfg.eps, rule=build_rule(cfg), sampler=build_sampler(cfg),
            estimator=estimator, queries=cfg.queries, weight_decay=cfg.weight_decay, seed=seed, lazy=cfg.lazy,
            conservative=cfg.conservative, master_weights=cfg.master_weights, kernel=cfg.kernel,
            perturb="in_place" if cfg.perturb == "auto" else cfg.perturb, pending_steps=cfg.pending_steps, **kwargs,
        )
        schedule = build_schedule(optimizer, cfg, total_steps)
    except ValueError as e:
        raise ConfigError(f"optim: {e}") from None
    return optimizer, schedule


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``optim.schedule`` with warmup as a LambdaLR: each group's lr is its initial lr times the multiplier."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.schedule, total_steps, cfg.warmup_steps))
