"""Model architectures without weights: the shipped configs of the models zo-scale is sized for, any
local config or hub id, built on the meta device (for planning) or randomly initialised (``random:``).

The shipped files (``zo_scale/configs/architectures/<name>.json``) are the public ``config.json`` of
each family member, cut to the fields that fix the shapes: OPT-1.3B to 175B, LLaMA-2-7B/13B/70B,
Llama-3-8B/70B, Mistral-7B (v0.1) and Qwen2.5-72B. Building one on the meta device allocates
nothing, so the planner reads a 70B model's parameter shapes in about a second.

``model.name=random:<architecture>`` trains such a model from a random init with the byte tokenizer
of the tiny models: a real-sized model on the real code paths (ZeRO-3, offload, checkpoints) without
downloading weights. Its loss means nothing; its memory and bytes moved are those of the real model.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

RANDOM_PREFIX = "random:"
_SHIPPED = resources.files("zo_scale") / "configs" / "architectures"

# LoRA target modules by ``config.model_type``: the attention query and value projections (as in MeZO).
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}
ARCHITECTURES = tuple(sorted(p.name.removesuffix(".json") for p in _SHIPPED.iterdir() if p.name.endswith(".json")))


def architecture_config(source: str) -> PretrainedConfig:
    """The model config of a shipped architecture name (see ``ARCHITECTURES``), a ``config.json`` file,
    a folder holding one, or a hub id. Raises ValueError naming the shipped names when none of these fit."""
    shipped = _SHIPPED / f"{source}.json"
    try:
        if shipped.is_file():
            return AutoConfig.from_pretrained(str(shipped))
        path = Path(source)
        if path.is_file():
            return AutoConfig.from_pretrained(str(path))
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        reason = next(iter(str(err).strip().splitlines()), type(err).__name__)
        raise ValueError(f"no model architecture {source!r}: not a shipped name ({', '.join(ARCHITECTURES)}), "
                         f"a config.json, a folder with one, or a reachable hub id ({reason})") from None


def meta_model(config: PretrainedConfig, dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """``config``'s causal LM with every tensor on the meta device: shapes and dtypes, no storage."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def random_model(config: PretrainedConfig, dtype: torch.dtype, seed: int) -> PreTrainedModel:
    """``config``'s causal LM with transformers' random init, seeded (the caller's RNG state is left as it was).

    Under a live ``HfDeepSpeedConfig`` (ZeRO-3) transformers builds each parameter inside
    ``deepspeed.zero.Init``: the model is partitioned (and, with NVMe offload, swapped out) as it is
    built and never exists whole in memory.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
