"""Model and tokenizer loading: built-in tiny causal and masked LMs, SmolLM2-135M from GGUF, local folders, hub ids;
bitsandbytes int8/NF4 base models and their scales as ZO-trainable tensors (bitsandbytes imported lazily)."""

from zo_scale.models.architectures import ARCHITECTURES, RANDOM_PREFIX, architecture_config, meta_model
from zo_scale.models.loading import BUILTIN_MODELS, ModelLoadError, load_model, model_head, resolve_dtype
from zo_scale.models.quantized import QUANTIZATIONS, keep_4bit_layout, quantized_scales
from zo_scale.models.smollm2 import cache_dir, smollm2_folder
from zo_scale.models.tiny import (
    TINY_ARCHS,
    TINY_MASKED_ARCHS,
    build_byte_tokenizer,
    build_masked_tokenizer,
    build_tiny_masked_lm,
    build_tiny_model,
)

__all__ = [
    "ARCHITECTURES",
    "BUILTIN_MODELS",
    "QUANTIZATIONS",
    "RANDOM_PREFIX",
    "TINY_ARCHS",
    "TINY_MASKED_ARCHS",
    "ModelLoadError",
    "architecture_config",
    "build_byte_tokenizer",
    "build_masked_tokenizer",
    "build_tiny_masked_lm",
    "build_tiny_model",
    "cache_dir",
    "keep_4bit_layout",
    "load_model",
    "model_head",
    "meta_model",
    "quantized_scales",
    "resolve_dtype",
    "smollm2_folder",
]
