"""Model and tokenizer loading: built-in tiny models, SmolLM2-135M from GGUF, local folders, hub ids."""

from zo_scale.models.loading import BUILTIN_MODELS, ModelLoadError, load_model, resolve_dtype
from zo_scale.models.smollm2 import cache_dir, smollm2_folder
from zo_scale.models.tiny import TINY_ARCHS, build_byte_tokenizer, build_tiny_model

__all__ = [
    "BUILTIN_MODELS",
    "TINY_ARCHS",
    "ModelLoadError",
    "build_byte_tokenizer",
    "build_tiny_model",
    "cache_dir",
    "load_model",
    "resolve_dtype",
    "smollm2_folder",
]
