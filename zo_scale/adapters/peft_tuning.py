"""PEFT for ZO: LoRA, prefix tuning and prompt tuning through the ``peft`` library.

``apply_peft`` wraps a causal LM with ``peft.get_peft_model``, which freezes every base weight
(``requires_grad=False``) and adds the adapter weights; ``trainable_named_parameters`` hands exactly
those to a :class:`~zo_scale.core.optimizer.ZOOptimizer`, so the ZO sweep perturbs and updates the
adapter only and the base stays bitwise unchanged::

    model = apply_peft(model, PeftSettings(method="lora"))
    optimizer = ZOSGD(trainable_named_parameters(model), lr=1e-4, eps=1e-2)

Methods (``PeftSettings.method``):

- ``"lora"``: W x + (alpha / r) B A x on ``target_modules`` (default q_proj and v_proj, which OPT,
  LLaMA and Mistral all name so); B starts at zero, so the wrapped model starts as the base model.
- ``"prefix"``: ``num_virtual_tokens`` learned key/value vectors per layer, prepended to the
  attention cache (no reparametrisation MLP).
- ``"prompt"``: ``num_virtual_tokens`` learned input embeddings prepended to the sequence (logits
  then cover the virtual tokens too; peft pads the labels with -100 for them).
- ``"none"``: the model is returned as it is (full fine-tuning).

MeZO's suggested hyperparameters (Malladi et al., 2023, OPT models): LoRA (r=8, alpha=16) lr 1e-4 or
5e-5 with eps 1e-2; prefix tuning lr 1e-2 or 1e-3 with eps 1e-1.

.. note::
    Adapter dropout is 0 by default and should stay so: the two forwards of a ZO step must evaluate
    the same function, and dropout draws a new mask on each (in train mode).

.. note::
    peft names parameters ``base_model.model.<name>``; the ZO core strips that prefix
    (:func:`zo_scale.core.shards.canonical_name`), so a LoRA weight's noise stream depends on its
    name in the unwrapped model only (e.g. ``model.decoder.layers.0.self_attn.q_proj.lora_A.default.weight``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from transformers import PreTrainedModel

from zo_scale.models.architectures import DEFAULT_LORA_TARGETS

METHODS = ("none", "lora", "prefix", "prompt")


@dataclass
class PeftSettings:
    """Which adapter to add and its size.

    ``method``: one of ``METHODS``; ``lora_r``/``lora_alpha``/``lora_dropout``: LoRA rank, scale
    numerator (the update is scaled by alpha / r) and dropout; ``target_modules``: names (or name
    suffixes) of the modules LoRA wraps, None for the architecture's default (``DEFAULT_LORA_TARGETS``);
    ``num_virtual_tokens``: length of the learned prefix or prompt.
    """

    method: str = "none"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # keep 0: both forwards of a ZO step must see the same function
    target_modules: list[str] | None = None  # LoRA only
    num_virtual_tokens: int = 10  # prefix and prompt only


def _lora_targets(model: torch.nn.Module, settings: PeftSettings) -> list[str]:
    """The target module names, checked to exist in ``model`` (peft matches a name or a '.'-suffix)."""
    if settings.target_modules is not None:
        targets = list(settings.target_modules)
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_LORA_TARGETS:
            raise ValueError(f"no default LoRA target modules for model_type {model_type!r} "
                             f"(known: {', '.join(DEFAULT_LORA_TARGETS)}); set target_modules")
        targets = DEFAULT_LORA_TARGETS[model_type]
    if not targets:
        raise ValueError("target_modules is empty; name at least one module for LoRA")
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
        raise ValueError(f"LoRA target module(s) {missing} not found in the model ({type(model).__name__}); "
                         f"its module names end in: {', '.join(leaves)}")
    return targets


def _peft_config(model: torch.nn.Module, settings: PeftSettings) -> PeftConfig:
    if settings.method != "lora" and settings.target_modules is not None:
        raise ValueError(f"target_modules applies to method 'lora' only, not {settings.method!r}")
    if settings.method == "lora":
        if settings.lora_r < 1:
            raise ValueError(f"Invalid lora_r: {settings.lora_r} (must be >= 1)")
        if not 0.0 <= settings.lora_dropout < 1.0:
            raise ValueError(f"Invalid lora_dropout: {settings.lora_dropout} (must be in [0, 1))")
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=settings.lora_r, lora_alpha=settings.lora_alpha,
                          lora_dropout=settings.lora_dropout, target_modules=_lora_targets(model, settings))
    if settings.num_virtual_tokens < 1:
        raise ValueError(f"Invalid num_virtual_tokens: {settings.num_virtual_tokens} (must be >= 1)")
    if settings.method == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens)
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens)


def apply_peft(model: PreTrainedModel, settings: PeftSettings, seed: int | None = None) -> torch.nn.Module:
    """``model`` wrapped in a ``peft.PeftModel`` with its base frozen (``model`` itself for method 'none').

    The base model's modules are modified in place (LoRA wraps them), so keep no other use of it.
    ``seed``: draw the adapter's initial weights (LoRA A, the prefix/prompt embeddings; peft makes them
    on CPU) from this seed, leaving the global RNG as it was: every rank then starts from the same
    adapter. None draws from the global RNG, as peft does.
    Raises ValueError for an unknown method, a missing target module or an invalid size.
    """
    if settings.method not in METHODS:
        raise ValueError(f"unknown PEFT method {settings.method!r}; choose one of {', '.join(METHODS)}")
    if settings.method == "none":
        if settings.target_modules is not None:
            raise ValueError("target_modules applies to method 'lora' only, not 'none'")
        return model
    config = _peft_config(model, settings)
    with torch.random.fork_rng(devices=[], enabled=seed is not None), warnings.catch_warnings():
        if seed is not None:
            torch.manual_seed(seed)
        # peft asks the model a question transformers 5 renamed: a deprecation warning per call, not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter with ``requires_grad``: the ones ZO should train, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _require_peft(model: torch.nn.Module) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise ValueError(f"expected a model wrapped by apply_peft (a peft.PeftModel), got {type(model).__name__}")
    return model


def save_adapter(model: torch.nn.Module, folder: str | Path) -> None:
    """Write the adapter weights and config to ``folder`` in peft's format (``adapter_config.json`` and
    ``adapter_model.safetensors``); load with ``peft.PeftModel.from_pretrained(base_model, folder)``."""
    _require_peft(model).save_pretrained(str(folder))


def merge_and_export(model: torch.nn.Module, folder: str | Path) -> PreTrainedModel:
    """Fold LoRA into the base weights (W + (alpha / r) B A) and save the plain model to ``folder``.

    Returns the merged model; ``model`` is consumed (peft merges in place). The folder loads with
    ``AutoModelForCausalLM.from_pretrained`` or ``load_model(name, weights=folder)``. Prefix and prompt
    tuning add inputs rather than weights, so they cannot be merged: ValueError (use ``save_adapter``).
    """
    peft_model = _require_peft(model)
    method = peft_model.peft_config[peft_model.active_adapter].peft_type.value
    if method != "LORA":
        raise ValueError(f"cannot merge a {method} adapter into the base weights (only LoRA merges); "
                         "save it with save_adapter instead")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(folder))
    return merged
