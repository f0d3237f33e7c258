"""Score multiple-choice examples with a masked LM: log p(label word at the mask | prompt).

The prompt (:mod:`zo_scale.tasks.masked_templates`) holds one mask slot; it is tokenized with the
tokenizer's mask token in that slot and its special tokens (``<s> ... </s>``), and each option's
label word must be one token (LM-BFF's restriction, Gao et al. 2021: a word that splits into two
pieces has no single mask to fill). Option i scores

.. math::
    s_i = \\log \\mathrm{softmax}(W h_{mask})[v_i],

the LM head's log-probability of label word v_i at the mask position. Cross-entropy over the options
(``"ce"`` of :func:`zo_scale.models.scoring.batch_loss`) is then LM-BFF's and MeZO's prompt-based
fine-tuning loss, the softmax over the label words' logits alone (the full-vocabulary normaliser
cancels). The head's vocabulary projection runs at the mask positions only: at every position it
would cost B x T x V (64 x 128 x 50k for RoBERTa-large) for B values that are read.

Batches are padded on the right: BERT numbers positions from 0 whatever the padding, so left
padding would move every token; RoBERTa numbers them past its padding either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from zo_scale.tasks import Example
from zo_scale.tasks.masked_templates import MASK_SLOT


@dataclass(frozen=True)
class MaskedExample:
    """Token ids of one masked-LM example: the prompt with its special tokens and one mask token, the
    mask's position in it, one vocabulary id per option (its label word), and the label."""

    ids: tuple[int, ...]
    mask_at: int
    label_ids: tuple[int, ...]
    label: int

    @property
    def length(self) -> int:
        return len(self.ids)


def _label_word_id(tokenizer: object, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"label word {word!r} is {len(ids)} tokens for this tokenizer ({pieces}); masked-LM scoring "
                         "reads one token at the mask: choose label words that are single tokens")
    return ids[0]


def encode_masked(tokenizer: object, examples: Sequence[Example], max_length: int = 256) -> list[MaskedExample]:
    """Tokenize once, up front. A prompt over `max_length` tokens loses tokens from its start (after
    the leading special tokens) as long as the mask stays; the text after the mask is kept."""
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError("the tokenizer has no mask token: masked-LM scoring needs one")
    out = []
    for ex in examples:
        context = ex.contexts[0]
        if set(ex.contexts) != {context}:
            raise ValueError("a masked-LM example has one prompt for all its options; this one's options have "
                             "different contexts")
        if context.count(MASK_SLOT) != 1:
            raise ValueError(f"a masked-LM prompt needs the mask slot {MASK_SLOT} exactly once, got "
                             f"{context.count(MASK_SLOT)} in {context[:80]!r}")
        ids = tokenizer(context.replace(MASK_SLOT, tokenizer.mask_token), add_special_tokens=True)["input_ids"]
        if ids.count(mask_id) != 1:
            raise ValueError(f"the prompt {context[:80]!r} encodes to {ids.count(mask_id)} mask tokens, not 1 (does "
                             "its text hold the tokenizer's mask token?)")
        excess = len(ids) - max_length
        if excess > 0:
            lead = next(i for i, t in enumerate(ids) if t not in tokenizer.all_special_ids)
            if lead + excess >= ids.index(mask_id):
                raise ValueError(f"the prompt {context[:80]!r} has {len(ids)} tokens and its text after the mask does "
                                 f"not fit in task.max_length={max_length}")
            ids = ids[:lead] + ids[lead + excess :]
        label_ids = tuple(_label_word_id(tokenizer, word) for word in ex.continuations)
        out.append(MaskedExample(tuple(ids), ids.index(mask_id), label_ids, ex.label))
    return out


@contextlib.contextmanager
def _vocabulary_projection_at(model: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, the output embedding (the head's projection onto the vocabulary) sees only
    position positions[b] of row b: its input (B, T, H) becomes (B, 1, H)."""
    rows = torch.arange(len(positions), device=positions.device)

    def at_positions(module: torch.nn.Module, args: tuple) -> tuple:
        if args[0].shape[0] != len(positions):
            raise ValueError(f"the vocabulary projection got {args[0].shape[0]} rows for {len(positions)} mask "
                             "positions: "
                             "masked-LM scoring needs the whole batch in one call (the perturbed forward, "
                             "perturb='in_forward', is not supported for masked LMs)")
        return (args[0][rows, positions].unsqueeze(1), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(at_positions)
    try:
        yield
    finally:
        handle.remove()


def masked_option_scores(model: torch.nn.Module, batch: Sequence[MaskedExample], pad_id: int) -> torch.Tensor:
    """log p(label word of each option at the mask), shape (batch, max options), -inf where an example
    has fewer options than the widest one in the batch."""
    device = next(model.parameters()).device
    width = max(ex.length for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        ids[i, : ex.length] = torch.tensor(ex.ids)
        mask[i, : ex.length] = 1
    positions = torch.tensor([ex.mask_at for ex in batch], device=device)
    with _vocabulary_projection_at(model, positions):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, 1, V)
    logprobs = logits[:, 0].float().log_softmax(-1)
    n_opt = max(len(ex.label_ids) for ex in batch)
    scores = torch.full((len(batch), n_opt), float("-inf"), device=device)
    for i, ex in enumerate(batch):
        scores[i, : len(ex.label_ids)] = logprobs[i, torch.tensor(ex.label_ids, device=device)]
    return scores
