"""`load_model`: one entry point for built-in models, local folders and hub ids."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from zo_scale.models.smollm2 import SMOLLM2_NAME, smollm2_folder
from zo_scale.models.tiny import TINY_ARCHS, build_byte_tokenizer, build_tiny_model

TINY_MODELS = {f"tiny-{arch}": arch for arch in TINY_ARCHS}
BUILTIN_MODELS = (SMOLLM2_NAME, *TINY_MODELS)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(ValueError):
    """A model that cannot be loaded: not built in, and not a loadable local folder or hub id."""


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype for "float32"/"fp32", "bfloat16"/"bf16" or "float16"/"fp16"."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}") from None


def load_model(
    name: str, dtype: str = "float32", device: str = "cpu", seed: int = 0, weights: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched forward passes.

    `name` is a built-in (see `BUILTIN_MODELS`), a local HF folder or a hub id. `seed` only affects
    the randomly initialised tiny models. `weights`: a folder saved by ``save_pretrained`` (e.g. a
    checkpoint) to take the weights from instead; the tokenizer still comes from `name`. The model
    comes back in eval mode on `device`; the tokenizer pads on the left and always has a pad token.
    """
    torch_dtype = resolve_dtype(dtype)
    source = str(smollm2_folder()) if name == SMOLLM2_NAME else name
    try:
        tokenizer = build_byte_tokenizer() if name in TINY_MODELS else AutoTokenizer.from_pretrained(source)
        if weights is not None:
            model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch_dtype)
        elif name in TINY_MODELS:
            model = build_tiny_model(TINY_MODELS[name], seed=seed, dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        reason = next(iter(str(err).strip().splitlines()), type(err).__name__)
        raise ModelLoadError(
            f"cannot load model {name!r}{f' with weights from {weights}' if weights else ''}: it is not a built-in "
            f"name ({', '.join(BUILTIN_MODELS)}) nor a loadable local folder or hub id ({reason})"
        ) from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer
