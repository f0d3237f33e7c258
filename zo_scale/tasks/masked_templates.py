"""Prompts for masked LMs (RoBERTa, BERT): one prompt per example with a mask slot that a label word fills.

An Example for a masked LM has the same fields as a causal one: every option shares one context,
which holds :data:`MASK_SLOT` exactly once, and the continuations are the label words (" great",
" terrible"). The model scores option i by log p(label word i at the mask | prompt).

Two sources of such Examples:

- LM-BFF's manual templates (Gao et al. 2021, "Making Pre-trained Language Models Better Few-shot
  Learners", the prompts MeZO's medium-model experiments use), for SST-2 and RTE:
  SST-2 ``<s> {sentence} It was<mask>.</s>`` with " great" / " terrible"; RTE
  ``<s> {premise without its final punctuation}?<mask>, {hypothesis, first letter lowered}</s>`` with
  " Yes" / " No"; for the hub-only tasks of MeZO's medium models, SST-5 as SST-2 with five words, MNLI as
  RTE with " Yes" / " Maybe" / " No", TREC ``<s><mask>: {question}</s>`` with the six coarse classes'
  words. The special tokens come from the tokenizer, not the template.
- Any causal template whose options share the context (:func:`mask_after`): the mask goes where the
  continuation would start, so MeZO's SST-2 prompt becomes ``{sentence} It was<mask>``. Tasks whose
  options have different contexts (COPA, WinoGrande) have no single mask to fill and are refused.
"""

from __future__ import annotations

from zo_scale.tasks.example import Example, TaskDataError
from zo_scale.tasks.templates import NLI_WORDS, SST5_WORDS, _text, _verbalized, trec_with

# Where the tokenizer's mask token goes; text, so that templates stay tokenizer-independent.
MASK_SLOT = "{mask}"


def mask_after(example: Example, task: str) -> Example:
    """The masked-LM form of a causal Example: its shared context with the mask slot appended."""
    contexts = set(example.contexts)
    if len(contexts) != 1:
        raise TaskDataError(f"{task}: its options have different contexts, so there is no single prompt whose mask "
                            "a label word could fill; masked-LM scoring needs one prompt per example")
    (context,) = contexts
    return Example(
        contexts=(context + MASK_SLOT,) * len(example.continuations),
        continuations=example.continuations,
        label=example.label,
    )


def _strip_final_punctuation(text: str) -> str:
    text = text.rstrip()
    return text[:-1] if text[-1:] in ".?!,;:" else text


def sst2(row: dict) -> Example:
    sentence = _text("SST-2", row, "sentence").strip()
    return _verbalized("SST-2", row, f"{sentence} It was{MASK_SLOT}.", (" terrible", " great"), ("0", "1"))


def _nli(task: str, row: dict, words: tuple[str, ...], names: tuple) -> Example:
    """LM-BFF's entailment prompt: premise (its final punctuation dropped) ? <mask> , hypothesis."""
    premise = _strip_final_punctuation(_text(task, row, "premise"))
    hypothesis = _text(task, row, "hypothesis").strip()
    context = f"{premise}?{MASK_SLOT}, {hypothesis[:1].lower()}{hypothesis[1:]}"
    return _verbalized(task, row, context, words, names)


def rte(row: dict) -> Example:
    return _nli("RTE", row, ("Yes", "No"), ("entailment", "not_entailment"))


def sst5(row: dict) -> Example:
    sentence = _text("SST-5", row, "text").strip()
    return _verbalized("SST-5", row, f"{sentence} It was{MASK_SLOT}.", SST5_WORDS, tuple(range(5)))


def mnli(row: dict) -> Example:
    return _nli("MNLI", row, NLI_WORDS, tuple(range(3)))


def trec(row: dict) -> Example:
    return trec_with(row, lambda question: f"{MASK_SLOT}: {question}")
