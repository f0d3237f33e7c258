"""`load_model`: one entry point for built-in models, local folders and hub ids, optionally quantized."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from zo_scale.models.architectures import RANDOM_PREFIX, architecture_config, random_model
from zo_scale.models.quantized import (
    bnb_config,
    check_quantization,
    keep_4bit_layout,
    quiet_int8_cast_warning,
    saved_quantization,
)
from zo_scale.models.smollm2 import SMOLLM2_NAME, smollm2_folder
from zo_scale.models.tiny import (
    TINY_ARCHS,
    TINY_MASKED_ARCHS,
    build_byte_tokenizer,
    build_masked_tokenizer,
    build_tiny_masked_lm,
    build_tiny_model,
)

TINY_MODELS = {f"tiny-{arch}": arch for arch in TINY_ARCHS}
TINY_MASKED_MODELS = {f"tiny-{arch}": arch for arch in TINY_MASKED_ARCHS}
BUILTIN_MODELS = (SMOLLM2_NAME, *TINY_MODELS, *TINY_MASKED_MODELS)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(ValueError):
    """A model that cannot be loaded: not built in and not a loadable local folder or hub id, or asked for
    with settings it cannot take (an unknown quantization, one that contradicts the saved checkpoint)."""


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype for "float32"/"fp32", "bfloat16"/"bf16" or "float16"/"fp16"."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}") from None


def _checkpoint_quantization(weights: str | Path) -> str:
    """The quantization a ``save_pretrained`` folder was written in ('none' if it has no config.json)."""
    config_file = Path(weights) / "config.json"
    if not config_file.is_file():
        return "none"  # from_pretrained reports the missing folder or file in its own words
    try:
        return saved_quantization(json.loads(config_file.read_text()).get("quantization_config"))
    except ValueError as err:
        raise ModelLoadError(f"cannot load weights from {weights}: {err}") from None


def is_masked_lm(config: PretrainedConfig) -> bool:
    """Whether a model config is a masked LM's (RoBERTa, BERT, ...): its saved architecture is a
    ``*ForMaskedLM`` class. RoBERTa and BERT also have causal-LM classes; a checkpoint names the one
    it was trained as."""
    return any(arch.endswith("ForMaskedLM") for arch in getattr(config, "architectures", None) or ())


def model_head(name: str) -> str:
    """'masked' or 'causal': how model `name` (as :func:`load_model` takes it) scores a prompt, read
    from its config alone (no weights load). Raises ModelLoadError when there is no config to read."""
    if name in TINY_MASKED_MODELS:
        return "masked"
    if name in TINY_MODELS or name == SMOLLM2_NAME or name.startswith(RANDOM_PREFIX):
        return "causal"
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise _not_loadable(name, None, err) from err
    return "masked" if is_masked_lm(config) else "causal"


def model_config(name: str) -> PretrainedConfig:
    """The architecture config of model ``name`` (as :func:`load_model` takes it), without its weights: what
    a run sizes its memory from before the model loads (the NVMe swap buffers, the perturbed forward's fit).
    A tiny built-in is built for it (a few hundred kB); SmolLM2's folder is converted on first use, as its
    load would. ModelLoadError, as :func:`load_model`'s, when there is no config to read."""
    if name in TINY_MODELS:
        return build_tiny_model(TINY_MODELS[name]).config
    if name in TINY_MASKED_MODELS:
        return build_tiny_masked_lm(TINY_MASKED_MODELS[name]).config
    if name.startswith(RANDOM_PREFIX):
        try:
            return architecture_config(name.removeprefix(RANDOM_PREFIX))
        except ValueError as err:
            raise ModelLoadError(f"model {name}: {err}") from None
    try:
        return AutoConfig.from_pretrained(str(smollm2_folder()) if name == SMOLLM2_NAME else name)
    except (OSError, ValueError) as err:
        raise _not_loadable(name, None, err) from err


def largest_parameter(name: str) -> int:
    """Elements of the largest parameter tensor of model ``name``, counted on a meta-device build of its
    config (nothing allocated, nothing read but the config)."""
    config = model_config(name)
    auto = AutoModelForMaskedLM if model_head(name) == "masked" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return max(p.numel() for p in model.parameters())


def _not_loadable(name: str, weights: str | Path | None, err: Exception) -> ModelLoadError:
    if weights is not None and not Path(weights).is_dir():
        return ModelLoadError(f"cannot load model {name!r} with weights from {weights}: no such folder")
    if not Path(name).exists() and not _is_repo_id(name):  # a path, to nowhere: the hub's rules would not help
        return ModelLoadError(f"model {name!r}: no such folder ({Path(name).expanduser().absolute()}); give a "
                              f"built-in name ({', '.join(BUILTIN_MODELS)}), a model folder or a hub id")
    reason = next(iter(str(err).strip().splitlines()), type(err).__name__)
    return ModelLoadError(
        f"cannot load model {name!r}{f' with weights from {weights}' if weights else ''}: it is not a built-in "
        f"name ({', '.join(BUILTIN_MODELS)}) nor a loadable local folder or hub id ({reason})"
    )


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _from_pretrained(
    source: str | Path, torch_dtype: torch.dtype, quantization: str, device: str, prequantized: bool = False,
    masked: bool = False,
) -> PreTrainedModel:
    auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    if quantization == "none":
        return auto.from_pretrained(source, dtype=torch_dtype)
    # bitsandbytes quantizes while loading, onto the device named here (its layers cannot be moved by
    # .to() afterwards); `dtype` is that of the layers it leaves in float (embeddings, norms, lm_head).
    # A folder saved quantized brings its own quantization_config (transformers would ignore ours, warning;
    # an explicit quantization_config=None makes it skip the saved one and re-initialise the quantized layers).
    extra = {} if prequantized else {"quantization_config": bnb_config(quantization, torch_dtype)}
    return auto.from_pretrained(source, dtype=torch_dtype, device_map={"": device}, **extra)


def _random_model(arch: str, dtype: torch.dtype, seed: int, tokens: int, quantization: str) -> PreTrainedModel:
    if quantization != "none":
        raise ModelLoadError(f"model {RANDOM_PREFIX}{arch}: a randomly initialised model cannot be quantized on load; "
                             "use model.quantization=none")
    try:
        config = architecture_config(arch)
    except ValueError as err:
        raise ModelLoadError(f"model {RANDOM_PREFIX}{arch}: {err}") from None
    if config.vocab_size < tokens:
        raise ModelLoadError(f"model {RANDOM_PREFIX}{arch}: vocab_size {config.vocab_size} is smaller than the "
                             f"{tokens} tokens of the byte tokenizer it is trained with")
    return random_model(config, dtype, seed)


def load_model(
    name: str,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    weights: str | Path | None = None,
    quantization: str = "none",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal or masked LM (:func:`model_head` says which) and its tokenizer, ready for batched
    forward passes.

    `name` is a built-in (see `BUILTIN_MODELS`), a local HF folder or a hub id, or ``random:<arch>``:
    the architecture of a shipped config name (``zo_scale.models.ARCHITECTURES``, e.g. ``random:llama-2-13b``),
    a config.json or a hub id, randomly initialised, with the tiny models' byte tokenizer (see
    :mod:`zo_scale.models.architectures`). `seed` only affects the randomly initialised models.
    `weights`: a folder saved by ``save_pretrained`` (e.g. a checkpoint) to take the weights from
    instead; the tokenizer still comes from `name`. The model comes back in eval mode on `device`;
    the tokenizer pads on the left and always has a pad token; a masked LM's tokenizer must have a mask
    token (ModelLoadError otherwise).

    `quantization` ('none', 'int8' or 'nf4'; ``zo_scale.models.QUANTIZATIONS``) loads the base model
    through bitsandbytes (``pip install 'zo-scale[quant]'``) directly onto `device`: 'int8' is
    LLM.int8 (row-wise absmax, outlier threshold 6), 'nf4' is 4-bit NormalFloat with blocks of 64,
    compute in `dtype` and no double quantization; the linear layers are quantized, embeddings, norms
    and lm_head stay in `dtype`. A tiny built-in model is built, saved to a temporary folder and
    loaded back quantized. A `weights` folder saved from a quantized model loads as it was saved (its
    config.json names the quantization and, for NF4, the compute dtype), which must then equal
    `quantization`. Such a model saves only with ``save_pretrained(folder, save_original_format=False)``
    (transformers 5.23 cannot invert the bnb deserialisation of a pre-quantized load: NotImplementedError);
    one quantized on load saves plainly. See :mod:`zo_scale.models.quantized` for ZO over the quantized weights.
    Raises ModelLoadError (a ValueError) for an unknown quantization or a mismatch, and ImportError
    when bitsandbytes is missing.
    """
    torch_dtype = resolve_dtype(dtype)
    try:
        check_quantization(quantization)
    except ValueError as err:
        raise ModelLoadError(str(err)) from None
    saved = "none" if weights is None else _checkpoint_quantization(weights)
    if saved not in ("none", quantization):
        raise ModelLoadError(f"weights in {weights} were saved {saved}-quantized; load them with "
                             f"quantization={saved!r}, not {quantization!r}")
    if quantization != "none":
        bnb_config(quantization, torch_dtype)  # ImportError naming the extra before any loading starts
    source = str(smollm2_folder()) if name == SMOLLM2_NAME else name
    random_arch = name.removeprefix(RANDOM_PREFIX) if name.startswith(RANDOM_PREFIX) else None
    masked = model_head(name) == "masked"
    try:
        if name in TINY_MASKED_MODELS:
            tokenizer = build_masked_tokenizer()
        elif name in TINY_MODELS or random_arch is not None:
            tokenizer = build_byte_tokenizer()
        else:
            tokenizer = AutoTokenizer.from_pretrained(source)
        if weights is not None:
            model = _from_pretrained(weights, torch_dtype, quantization, device, saved != "none", masked)
        elif name in TINY_MODELS or name in TINY_MASKED_MODELS:
            model = (build_tiny_masked_lm(TINY_MASKED_MODELS[name], seed=seed, dtype=torch_dtype) if masked
                     else build_tiny_model(TINY_MODELS[name], seed=seed, dtype=torch_dtype))
            if quantization != "none":
                # bitsandbytes quantizes in from_pretrained only: go through a folder. The float tensors
                # stay mapped copy-on-write from its safetensors file, so ZO edits never reach the file
                # and deleting it is safe (Linux keeps a deleted file's pages while mapped; on systems
                # that refuse to delete a mapped file the folder is left behind, not an error).
                with tempfile.TemporaryDirectory(prefix="zo_scale_tiny_", ignore_cleanup_errors=True) as folder:
                    model.save_pretrained(folder)
                    model = _from_pretrained(folder, torch_dtype, quantization, device, masked=masked)
        elif random_arch is not None:
            model = _random_model(random_arch, torch_dtype, seed, len(tokenizer), quantization)
        else:
            model = _from_pretrained(source, torch_dtype, quantization, device, masked=masked)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise _not_loadable(name, weights, err) from err
    if masked and tokenizer.mask_token_id is None:
        raise ModelLoadError(f"model {name!r} is a masked LM ({type(model).__name__}) but its tokenizer has no mask "
                             "token: prompt-based fine-tuning scores the label words at the mask")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quantization == "none":
        model = model.to(device)
    elif quantization == "int8":
        quiet_int8_cast_warning()
    else:
        keep_4bit_layout(model)
    return model.eval(), tokenizer

