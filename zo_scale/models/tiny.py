"""Tiny randomly initialised causal and masked LMs and their byte-level tokenizers, built in code for fast tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN = "<pad>", "<s>", "</s>", "<mask>"
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

# Encoders for prompt-based masked-LM fine-tuning. Dropout off for the same reason as OPT's above.
_MASKED_ARCHS: dict[str, type[PretrainedConfig]] = {"roberta": RobertaConfig, "bert": BertConfig}
TINY_MASKED_ARCHS = tuple(_MASKED_ARCHS)
# The label words of the built-in tasks' prompts (both spellings: after a space, and after a newline),
# each one token of the masked tokenizer: masked-LM scoring reads one label word at the mask.
MASKED_LABEL_WORDS = (" great", " terrible", " Yes", " No", " Maybe", "Yes", "No", "Maybe")


def _merges_for(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges that make each word one token: its bytes joined left to right, then the leading space
    ("Ġ") joined to the whole word, so " Yes" cannot stop at "ĠY" + "es" when "Yes" is also a word."""
    to_symbols = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = to_symbols(word)[0][0]
        space, body = ("Ġ", symbols[1:]) if symbols.startswith("Ġ") else ("", symbols)
        steps = [(body[:i], body[i]) for i in range(1, len(body))] + ([(space, body)] if space else [])
        merges += [m for m in steps if m not in merges]
    return merges


def build_byte_tokenizer(label_words: Sequence[str] = (), mask: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: `<pad>`, `<s>`, `</s>`, then one token per byte (259 tokens).

    Empty BPE merges mean every byte is its own token, so any text encodes and decodes exactly.
    `label_words` (e.g. " great") each become one more token, by merges that join their bytes; `mask`
    adds a `<mask>` token and wraps every encoding as ``<s> ... </s>``, as RoBERTa's tokenizer does.
    The byte tokens keep their ids either way.
    """
    # Sorted so that token ids do not depend on the order the library returns the alphabet in.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _merges_for(label_words)
    merged = [a + b for a, b in merges]
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *alphabet, *merged))}
    backend = Tokenizer(BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = [*SPECIAL_TOKENS, MASK_TOKEN] if mask else list(SPECIAL_TOKENS)
    backend.add_special_tokens(special)
    if mask:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
            special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        mask_token=MASK_TOKEN if mask else None,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
    )
    for word in label_words:  # the merges above are built to guarantee this; a wrong merge order would not
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise AssertionError(f"label word {word!r} encodes to {len(ids)} tokens, not 1")
    return tokenizer


def _tiny_settings(tokenizer: PreTrainedTokenizerFast) -> dict[str, object]:
    """The config fields every tiny model shares: its size, and the tokenizer's vocabulary and special ids."""
    return {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


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
    settings = {**_tiny_settings(tokenizer), "max_position_embeddings": MAX_POSITIONS, **arch_defaults, **overrides}
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


def build_masked_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny masked LMs' tokenizer: the byte tokenizer with `<mask>` and the built-in label words."""
    return build_byte_tokenizer(MASKED_LABEL_WORDS, mask=True)


def build_tiny_masked_lm(
    arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object
) -> PreTrainedModel:
    """A small random masked LM, `arch` "roberta" or "bert", sized for :func:`build_masked_tokenizer`.

    Defaults as :func:`build_tiny_model` (hidden 64, 2 layers, 4 heads, intermediate 128), dropout 0.
    RoBERTa numbers positions from pad_token_id + 1 and skips padding; BERT numbers them from 0
    whatever the padding, which is why masked-LM batches are padded on the right.
    """
    if arch not in _MASKED_ARCHS:
        raise ValueError(f"unknown tiny masked-LM architecture {arch!r}; choose one of {', '.join(TINY_MASKED_ARCHS)}")
    tokenizer = build_masked_tokenizer()
    settings = {
        **_tiny_settings(tokenizer),
        "intermediate_size": 128,
        # RoBERTa's first position is pad_token_id + 1 (positions are offset past the padding index).
        "max_position_embeddings": MAX_POSITIONS + tokenizer.pad_token_id + 2,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        **overrides,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForMaskedLM.from_config(_MASKED_ARCHS[arch](**settings), dtype=dtype)
