"""Score multiple-choice examples with a causal LM: mean log-likelihood of each option's continuation.

Each option becomes one sequence ``context + continuation`` (token ids of the two parts joined, so the
continuation's tokens are well defined), left-padded so every continuation ends at the last position.
Then only the last K + 1 positions need logits (``logits_to_keep``), K = longest continuation: the
LM head over a 50k vocabulary at every position would cost as much as several layers.

When all options share the context and each continuation is one token (SST-2's " great" /
" terrible"), one sequence per example suffices: the scores are the log-probabilities of the option
tokens at the last position. Same numbers, half the forwards.

Masked LMs score their examples (:class:`MaskedExample`) by the label word at the mask instead
(:mod:`zo_scale.models.masked_scoring`); :func:`option_scores` and what builds on it take either.

Losses (both in nats, averaged over the batch):
- ``"ce"``: cross-entropy over the options' scores, -log softmax(scores)[label] (MeZO's classification loss);
- ``"lm"``: -mean log p(correct continuation | context), the plain LM loss on the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zo_scale.models.masked_scoring import MaskedExample, masked_option_scores
from zo_scale.tasks import Example

LOSSES = ("ce", "lm")


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example: per option (context ids, continuation ids), and the label."""

    options: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    label: int

    @property
    def length(self) -> int:
        return max(len(ctx) + len(cont) for ctx, cont in self.options)

    @property
    def shared_single_token(self) -> bool:
        contexts = {ctx for ctx, _ in self.options}
        return len(contexts) == 1 and all(len(cont) == 1 for _, cont in self.options)


def encode(tokenizer: object, examples: Sequence[Example], max_length: int = 256) -> list[EncodedExample]:
    """Tokenize once, up front. Contexts keep their last tokens when context + continuation > max_length."""
    out = []
    special = set(getattr(tokenizer, "all_special_ids", ()))
    for ex in examples:
        options = []
        for ctx, cont in zip(ex.contexts, ex.continuations, strict=True):
            ctx_ids = tokenizer(ctx, add_special_tokens=True)["input_ids"]
            cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
            if not cont_ids:
                raise ValueError(f"continuation {cont!r} tokenizes to nothing; choose other label words")
            if special.intersection(cont_ids):
                raise ValueError(f"continuation {cont!r} contains the tokenizer's special token(s) "
                                 f"{tokenizer.convert_ids_to_tokens(sorted(special.intersection(cont_ids)))}: a label "
                                 "word must be text the model reads, not padding or an end-of-text marker")
            if len(cont_ids) >= max_length:
                raise ValueError(f"continuation {cont!r} has {len(cont_ids)} tokens, max_length is {max_length}")
            ctx_ids = ctx_ids[-(max_length - len(cont_ids)) :]
            options.append((tuple(ctx_ids), tuple(cont_ids)))
        out.append(EncodedExample(tuple(options), ex.label))
    return out


def _left_pad(seqs: list[tuple[int, ...]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def option_scores(
    model: torch.nn.Module, batch: Sequence[EncodedExample] | Sequence[MaskedExample], pad_id: int
) -> torch.Tensor:
    """Mean log-likelihood of every option's continuation, shape (batch, max options), -inf where an
    example has fewer options than the widest one in the batch; for masked examples, the label word's
    log-probability at the mask."""
    if isinstance(batch[0], MaskedExample):
        return masked_option_scores(model, batch, pad_id)
    device = next(model.parameters()).device
    n_opt = max(len(ex.options) for ex in batch)
    scores = torch.full((len(batch), n_opt), float("-inf"), device=device)
    if all(ex.shared_single_token for ex in batch):
        ids, mask = _left_pad([ex.options[0][0] for ex in batch], pad_id, device)
        logprobs = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float().log_softmax(-1)
        for i, ex in enumerate(batch):
            option_ids = torch.tensor([cont[0] for _, cont in ex.options], device=device)
            scores[i, : len(ex.options)] = logprobs[i, option_ids]
        return scores

    seqs = [ctx + cont for ex in batch for ctx, cont in ex.options]
    cont_lens = torch.tensor([len(cont) for ex in batch for _, cont in ex.options], device=device)
    k = int(cont_lens.max())
    ids, mask = _left_pad(seqs, pad_id, device)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=k + 1).logits[:, :-1].float()  # (N, K, V)
    targets = ids[:, -k:]  # (N, K): the last K tokens, predicted by the K kept positions before them
    token_lp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    is_cont = torch.arange(k, device=device).unsqueeze(0) >= (k - cont_lens).unsqueeze(1)  # last len tokens
    per_seq = (token_lp * is_cont).sum(-1) / cont_lens
    flat = 0
    for i, ex in enumerate(batch):
        scores[i, : len(ex.options)] = per_seq[flat : flat + len(ex.options)]
        flat += len(ex.options)
    return scores


def batch_loss(scores: torch.Tensor, labels: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """The training loss of a batch from its option scores (see the module docstring), a 0-dim tensor."""
    if loss == "ce":
        return F.cross_entropy(scores, labels)
    if loss == "lm":
        return -scores.gather(1, labels.unsqueeze(1)).mean()
    raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")


def labels_of(
    batch: Sequence[EncodedExample] | Sequence[MaskedExample], device: torch.device | str = "cpu"
) -> torch.Tensor:
    return torch.tensor([ex.label for ex in batch], device=device)


@torch.no_grad()  # not inference_mode: ZeRO-3's gather hooks write parameters in place during the forward
def correct(
    model: torch.nn.Module, examples: Sequence[EncodedExample] | Sequence[MaskedExample], pad_id: int,
    batch_size: int = 16,
) -> list[bool]:
    """For each example, in input order: is its highest-scoring option the label?
    Runs ceil(len(examples) / batch_size) batched scorings, whatever the examples."""
    # Batches of similar length waste less compute on padding; the order does not change the result.
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    hits = [False] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = [examples[i] for i in chunk]
        predicted = option_scores(model, batch, pad_id).argmax(-1).cpu()
        for i, ok in zip(chunk, (predicted == labels_of(batch)).tolist(), strict=True):
            hits[i] = ok
    return hits


def accuracy(
    model: torch.nn.Module, examples: Sequence[EncodedExample] | Sequence[MaskedExample], pad_id: int,
    batch_size: int = 16,
) -> float:
    """Fraction of examples whose highest-scoring option is the label."""
    if not examples:
        raise ValueError("accuracy of an empty example list")
    return sum(correct(model, examples, pad_id, batch_size)) / len(examples)
