"""Tiny randomly initialised causal LMs and a byte-level tokenizer, built in code for fast tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
MAX_POSITIONS = 512

_ARCHS: dict[str, tuple[type[PretrainedConfig], dict[str, object]]] = {
    # OPT's default dropout of 0.1 would make the two forward passes of a ZO step see different
    # functions whenever the model is left in train mode.
    "opt": (OPTConfig, {"ffn_dim": 128, "dropout": 0.0}),
    "llama": (LlamaConfig, {"intermediate_size": 128, "num_key_value_heads": 2}),
    "mistral": (MistralConfig, {"intermediate_size": 128, "num_key_value_heads": 2}),
}
TINY_ARCHS = tuple(_ARCHS)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token byte-level tokenizer: `<pad>`, `<s>`, `</s>`, then one token per byte.

    Empty BPE merges mean every byte is its own token, so any text encodes and decodes exactly.
    """
    # Sorted so that token ids do not depend on the order the library returns the alphabet in.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *alphabet))}
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
    )


def build_tiny_model(
    arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object
) -> PreTrainedModel:
    """A small random `arch` model ("opt", "llama" or "mistral") sized for the byte tokenizer.

    Defaults: hidden 64, 2 layers, 4 heads (2 kv heads), intermediate 128, 512 positions.
    `overrides` are config fields, e.g. `num_hidden_layers=4`. The same seed gives the same weights;
    the caller's global RNG state is left untouched.
    """
    if arch not in _ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    config_cls, arch_defaults = _ARCHS[arch]
    tokenizer = build_byte_tokenizer()
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_POSITIONS,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **arch_defaults,
        **overrides,
    }
    if arch == "opt":
        settings.setdefault("word_embed_proj_dim", settings["hidden_size"])
    config = config_cls(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Built in `dtype` rather than cast afterwards, which keeps the rotary inv_freq buffer in fp32.
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def learnable_token_batch(rows: int = 4, length: int = 32, distinct: int = 8, seed: int = 0) -> torch.Tensor:
    """Token ids (rows, length) drawn from ``distinct`` byte tokens, for tests that need a falling loss.

    A randomly initialised tiny model predicts all 259 tokens about uniformly (loss ~ ln 259 = 5.56);
    a batch over the whole vocabulary would leave nothing to learn, a few tokens give the loss a
    direction to fall in.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = torch.randperm(256, generator=g)[:distinct] + len(SPECIAL_TOKENS)  # byte tokens only
    return vocab[torch.randint(0, distinct, (rows, length), generator=g)]
