"""What a run trains: the full weights, PEFT adapters, or a quantized model's scales; and which of
those train by backprop (``hybrid.fo_layers``, :mod:`zo_scale.train.hybrid`) rather than ZO.

=====================  ===============  =========================================================
``peft.method``        ``quantization``  trained tensors
=====================  ===============  =========================================================
none                   none              every weight (full-parameter ZO)
lora / prefix / prompt none, int8, nf4   the adapter; the base frozen, bitwise unchanged
none                   int8, nf4         the quantization scales (w = delta * w_bar, QZO-style) and
                                         the weights bitsandbytes keeps in float (see
                                         :mod:`zo_scale.models.quantized`)
=====================  ===============  =========================================================

Under ZeRO-3 the adapters are replicated, not partitioned: ``apply_peft`` runs after DeepSpeed
has partitioned the base, so the adapter weights are ordinary tensors on every rank. Each rank
applies the same ZO update to its copy (same seed, same all-reduced losses), so the copies stay
identical without any exchange, and the forwards gather only the base. LoRA r=8 on q/v of a 66B
OPT is about 0.04% of the weights (tens of MB), so holding it on every rank costs little, and
partitioning it would add two small all-gathers per adapted projection per forward.

Quantized models train single-process or replicated; under ZeRO-3 they are refused:
DeepSpeed would partition bitsandbytes' int8/4-bit parameters as if they were float weights.

Hybrid ZO-FO takes the FO part out of what the table says trains (the last k blocks' share of it):
with full weights or an adapter, single-process or replicated; under ZeRO-3 with full weights only
(DeepSpeed's optimizer must own the FO partitions, and a replicated adapter has none). The scales
of a quantized model have no gradient path (the int8 matmul is not differentiated through them),
so hybrid over quantized full weights is refused: train an adapter over the quantized base instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from zo_scale.adapters.peft_tuning import PeftSettings, apply_peft, trainable_named_parameters
from zo_scale.backends.runtime import Runtime
from zo_scale.models import load_model
from zo_scale.train.checkpoint import reading
from zo_scale.train.config import Config, ConfigError
from zo_scale.train.select_runtime import resolve_device

log = logging.getLogger("zo_scale")

NamedTensors = list[tuple[str, torch.Tensor]]


@dataclass
class Trainable:
    """The model of a run and the tensors it trains, by name: ``named`` by ZO, ``fo_named`` by backprop.

    ``kind``: 'full', 'adapter' or 'scales'; ``folder``: the checkpoint folder its weights go to
    ('model' for a whole model, 'adapter' for peft's adapter format).
    """

    model: torch.nn.Module
    tokenizer: Any
    named: NamedTensors
    kind: str
    fo_named: NamedTensors = field(default_factory=list)

    @property
    def folder(self) -> str:
        return "adapter" if self.kind == "adapter" else "model"


def _check(cfg: Config, runtime: Runtime) -> None:
    quantized, adapter, hybrid = cfg.model.quantization != "none", cfg.peft.method != "none", cfg.hybrid.fo_layers
    if quantized and runtime.name == "zero3":
        raise ConfigError(f"model.quantization={cfg.model.quantization} with ZeRO-3: DeepSpeed would partition "
                          "bitsandbytes' quantized parameters as float weights; use dist.mode=replicated or single")
    if hybrid and quantized and not adapter:
        raise ConfigError("hybrid.fo_layers with model.quantization and no adapter: the quantized weights have no "
                          "gradient; set peft.method to train an adapter over the quantized base")
    if hybrid and adapter and runtime.name == "zero3":
        raise ConfigError("hybrid.fo_layers with peft under ZeRO-3: the adapter is replicated outside DeepSpeed, "
                          "whose optimizer would own the FO part; use hybrid with full weights under ZeRO-3, "
                          "or peft with dist.mode=replicated")


def _split(model: torch.nn.Module, k: int) -> tuple[NamedTensors, NamedTensors]:
    from zo_scale.train.hybrid import split_fo_parameters

    try:
        return split_fo_parameters(model, k)
    except ValueError as e:
        raise ConfigError(f"hybrid.fo_layers: {e}") from None


def fo_optimizer_factory(cfg: Config) -> Callable[[NamedTensors], torch.optim.Optimizer]:
    """Builds the torch optimizer of ``hybrid.*`` over the FO parameters it is given."""
    from zo_scale.train.hybrid import make_fo_optimizer

    def make(named: NamedTensors) -> torch.optim.Optimizer:
        h = cfg.hybrid
        try:
            return make_fo_optimizer(named, h.fo_optimizer, h.fo_lr, h.fo_weight_decay, h.fo_betas)
        except ValueError as e:
            raise ConfigError(f"hybrid: {e}") from None

    return make


def load_trainable(cfg: Config, runtime: Runtime, checkpoint: Path | None) -> Trainable:
    """The run's model (from ``checkpoint`` when resuming) and what trains, as the table above says."""
    _check(cfg, runtime)
    method, k = cfg.peft.method, cfg.hybrid.fo_layers
    weights = None
    if checkpoint is not None and method == "none" and cfg.model.quantization == "none":
        weights = checkpoint / "model"
    hooks: dict[str, Any] = {}
    if k and runtime.name == "zero3":  # DeepSpeed's optimizer takes the FO partitions when the engine is built
        hooks = {"fo_parameters": lambda m: _split(m, k)[0], "fo_optimizer_factory": fo_optimizer_factory(cfg)}
    model, tokenizer = runtime.load_model(lambda: load_model(
        cfg.model.name, cfg.model.dtype, resolve_device(cfg.model.device), seed=cfg.run.seed, weights=weights,
        quantization=cfg.model.quantization), **hooks)
    model.eval()  # ZO forwards run without dropout: both points of a pair must see the same function
    if method != "none":
        model = _with_adapter(model, cfg, checkpoint)
        kind = "adapter"
    elif cfg.model.quantization != "none":
        from zo_scale.models.quantized import quantized_scales

        named = quantized_scales(model)
        if checkpoint is not None:
            _load_trained(named, checkpoint / "model")
        return Trainable(model, tokenizer, named, "scales")
    else:
        kind = "full"
    fo_named, zo_named = _split(model, k) if k else ([], trainable_named_parameters(model))
    if k and not fo_named:
        raise ConfigError(f"hybrid.fo_layers={k}: nothing trainable is in the last {k} block(s) (a prefix or prompt "
                          "adapter lives outside the blocks); use hybrid.fo_layers=-1 for pure backprop, or 0")
    return Trainable(model, tokenizer, zo_named, kind, fo_named)


def _load_trained(named: NamedTensors, folder: Path) -> None:
    """Copy a quantized checkpoint's trained tensors (scales, float weights) into a freshly quantized base.

    transformers cannot save a model again that it loaded pre-quantized, so a resumed run quantizes
    the base as the first run did (the same codes) and takes only what trained from the checkpoint.
    bitsandbytes' int8 layers save their row scale as ``<layer>.SCB``, not ``<layer>.weight.SCB``.
    """
    from safetensors.torch import load_file

    saved = {}
    for file in sorted(folder.glob("*.safetensors")):
        with reading(file, folder.parent):
            saved.update(load_file(file))
    for name, tensor in named:
        key = name.replace(".weight.SCB", ".SCB")
        if key not in saved:
            raise ConfigError(f"{folder} has no {key!r}: it does not fit model.quantization of this run")
        with torch.no_grad():
            tensor.copy_(saved[key])


def _with_adapter(model: torch.nn.Module, cfg: Config, checkpoint: Path | None) -> torch.nn.Module:
    """``model`` wrapped with the configured adapter (its saved weights when resuming)."""
    from peft import load_peft_weights, set_peft_model_state_dict


    try:  # seeded: every rank starts from the same adapter
        model = apply_peft(model, PeftSettings(**asdict(cfg.peft)), seed=cfg.run.seed)
    except ValueError as e:
        raise ConfigError(f"peft: {e}") from None
    if checkpoint is not None:
        with reading(checkpoint / "adapter", checkpoint):
            saved = load_peft_weights(str(checkpoint / "adapter"), device="cpu")
        result = set_peft_model_state_dict(model, saved)
        if result.unexpected_keys:
            raise ConfigError(f"{checkpoint / 'adapter'} does not fit peft.* of this run: unexpected "
                              f"{result.unexpected_keys[:3]}")
    model.eval()
    return model
